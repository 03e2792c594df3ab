"""Regions and slides → nuclei: the engine, geometry and slide reading put together."""

from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.region import RegionResult, segment_region
from dannucnet.pipeline.slide import SlidePlan, plan_slide, segment_slide
from dannucnet.pipeline.types import Nucleus

__all__ = ["Nucleus", "RegionResult", "SegmentOptions", "SlidePlan", "plan_slide", "segment_region", "segment_slide"]
