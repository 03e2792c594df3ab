"""The unit every door of the pipeline hands out: one nucleus, one polygon."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from shapely.geometry import Polygon


@dataclass
class Nucleus:
    """A segmented nucleus in level-0 (full-resolution) pixel coordinates of its image.

    ``measurements`` uses the names QuPath's Cell detection writes because the
    dict goes unchanged into QuPath's measurement list. With ``cell`` set the
    object is a QuPath cell: ``cell`` its ROI, ``polygon`` its nucleus ROI.
    """

    polygon: Polygon
    probability: float
    measurements: dict[str, float] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    cell: Polygon | None = None  # the cell around the nucleus (QuPath cell object) when cells were asked for

    @property
    def centroid(self) -> tuple[float, float]:
        c = self.polygon.centroid
        return (c.x, c.y)
