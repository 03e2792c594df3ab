"""PlanRegion: the chunk plan and the pixel-size verdict, for a client that reads pixels itself.

The QuPath script reads pixels with QuPath and sends them chunk by chunk; how a
parent is cut into chunks, which pixel size is believable and at which
downsample to read are decided here, by the very code the slide path runs
(:func:`dannucnet.pipeline.slide.plan_slide`, :func:`dannucnet.slides.mpp.combine_xy`),
so a parent is chunked alike by every door and the script holds no copy of the
rules. Only the per-chunk clip is added: the ROI cut to the chunk's core (plus
one pixel), which decides ownership exactly as the whole ROI would (a kept
centroid lies in the core, at least a pixel inside that box) while keeping each
request small whatever the size of the annotation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import shapely
from shapely.geometry.base import BaseGeometry

from dannucnet.geometry.ownership import Chunk, Rect
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.qupath.regions import fix_geometry
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service.convert import rect_from_proto, rect_to_proto
from dannucnet.service.limits import MAX_COORDINATE
from dannucnet.service.status import invalid
from dannucnet.service.wkb import check_area_wkb
from dannucnet.slides.mpp import combine_xy

if TYPE_CHECKING:
    from dannucnet.engine.tiling import WindowGrid

__all__ = ["plan_region", "pixel_size_verdict"]

CLIP_PAD_PX = 1.0  # the clip box reaches one level-0 pixel beyond the core (see the module docstring)


@dataclass(frozen=True)
class _Extent:
    """What ``plan_slide`` needs of an image whose pixels stay with the client: size and pixel size."""

    width: int
    height: int
    mpp: float

    def require_mpp(self) -> float:
        return self.mpp


def pixel_size_verdict(request: pb.PlanRegionRequest) -> tuple[float | None, str]:
    """(µm/px, where it came from), or (None, why none is usable); the user's value wins."""
    if request.HasField("pixel_size_microns"):
        value = request.pixel_size_microns
        return combine_xy(value, value, "the requested pixelSizeMicrons")
    width = request.image_pixel_width_microns if request.HasField("image_pixel_width_microns") else None
    height = request.image_pixel_height_microns if request.HasField("image_pixel_height_microns") else None
    return combine_xy(width, height, "the image's calibration")


def plan_region(
    request: pb.PlanRegionRequest, model_mpp: float, options: SegmentOptions, windows: WindowGrid | None = None
) -> pb.PlanRegionResponse:
    """The plan of one parent; ``options`` are the segmentation options the chunks will be sent with."""
    from dannucnet.pipeline.slide import plan_slide  # the pipeline pulls in torch: only when planning

    width, height = _image_size(request)
    answer = pb.PlanRegionResponse(model_pixel_size_microns=float(model_mpp))
    mpp, source = pixel_size_verdict(request)
    if mpp is None:
        answer.pixel_size_problem = source
        return answer
    answer.pixel_size_microns, answer.pixel_size_source = mpp, source
    if request.HasField("chunk_size"):
        options = dataclasses.replace(options, chunk_size=int(request.chunk_size))
    # The client reads every planned chunk itself; the server has no pixels to find background in.
    options = dataclasses.replace(options, skip_background=False)
    region = rect_from_proto(request.region, "region") if request.HasField("region") else None
    roi = _roi(request.roi_wkb) if request.roi_wkb else None
    if not _meets_image(region, roi, width, height):
        from dannucnet.engine import scale_to_model

        answer.downsample = 1.0 / scale_to_model(mpp, model_mpp)  # plan_slide's rule
        return answer  # nothing of the parent lies in the image: nothing to read
    # an _Extent is not an ImageSource, but plan_slide reads only width, height and require_mpp() of one
    # when skip_background is off (set above)
    plan = plan_slide(_Extent(width, height, mpp), model_mpp, region,  # type: ignore[arg-type]
                      [roi] if roi is not None else None, options, windows)
    answer.downsample = plan.downsample
    for chunk in plan.chunks:
        planned = _planned(chunk, plan.clip)
        if planned is not None:
            answer.chunks.append(planned)
    return answer


def _image_size(request: pb.PlanRegionRequest) -> tuple[int, int]:
    """The image's level-0 size: positive, and at most ``MAX_COORDINATE`` (QuPath's sizes are Java ints)."""
    if not (0 < request.image_width <= MAX_COORDINATE and 0 < request.image_height <= MAX_COORDINATE):
        raise invalid(
            f"imageWidth × imageHeight is {request.image_width} × {request.image_height}: send the image's "
            f"level-0 size in pixels, 1 to {MAX_COORDINATE:.0f} (QuPath: server.getWidth(), server.getHeight())"
        )
    return int(request.image_width), int(request.image_height)


def _roi(data: bytes) -> BaseGeometry:
    """The parent's area from WKB, repaired when drawn self-intersecting; refused when it has none.

    The bytes are walked (:func:`~dannucnet.service.wkb.check_area_wkb`) before shapely parses them, as for
    every WKB a request carries: a deeply nested GeometryCollection would crash GEOS (rc −11).
    """
    check_area_wkb(data, "roiWkb")
    try:
        geom = shapely.from_wkb(data)
    except Exception as exc:  # noqa: BLE001 - shapely raises GEOSException and friends
        raise invalid(f"roiWkb is not valid WKB ({len(data)} bytes): {exc}") from None
    bounds = geom.bounds if geom is not None and not geom.is_empty else (math.nan,) * 4
    if not all(math.isfinite(v) for v in bounds):
        raise invalid("roiWkb is empty or has non-finite coordinates: send the annotation's polygon")
    area, _ = fix_geometry(geom)
    if area is None:
        raise invalid(f"roiWkb is a {geom.geom_type} without area: send an area annotation (polygon)")
    return area


def _meets_image(region: Rect | None, roi: BaseGeometry | None, width: int, height: int) -> bool:
    image = Rect(0, 0, width, height)
    if region is not None and region.intersection(image).is_empty:
        return False
    if roi is not None:
        x0, y0, x1, y1 = roi.bounds
        box = Rect.from_bounds(x0, y0, x1, y1).to_int()
        return not box.intersection(image if region is None else region.intersection(image)).is_empty
    return True


def _planned(chunk: Chunk, clip: BaseGeometry | None) -> pb.PlannedChunk | None:
    """The chunk as sent to the client, with its clip; None when it can own nothing (no area shared)."""
    clip_wkb = b""
    if clip is not None:
        box = chunk.core.expand(CLIP_PAD_PX).to_polygon()
        if not clip.contains(box):
            part, _ = fix_geometry(clip.intersection(box))
            if part is None:
                return None
            clip_wkb = shapely.to_wkb(part)
    return pb.PlannedChunk(read=rect_to_proto(chunk.read.to_int()), core=rect_to_proto(chunk.core), clip_wkb=clip_wkb)
