"""A PNG overlay of nucleus outlines on the image, for a quick look without QuPath.

Drawn incrementally as chunks arrive, on a canvas of bounded size, so an
overlay of a whole slide costs a thumbnail's memory, not the slide's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from dannucnet.atomic import write_bytes
from dannucnet.errors import OutputError
from dannucnet.geometry.ownership import Rect
from dannucnet.pipeline.types import Nucleus
from dannucnet.slides import ImageSource

OUTLINE_BGR = (40, 230, 40)


class OverlayCanvas:
    def __init__(self, source: ImageSource, region: Rect, max_side: int = 2048) -> None:
        region = region.to_int()
        self.region = region
        self.downsample = max(1.0, max(region.width, region.height) / max_side)
        rgb = source.read_region(int(region.x), int(region.y), int(region.width), int(region.height),
                                 downsample=self.downsample)
        self.canvas = np.ascontiguousarray(rgb[..., ::-1])  # OpenCV draws in BGR
        self.thickness = 1 if self.downsample > 1.5 else 2

    def draw(self, nuclei: Iterable[Nucleus]) -> None:
        shift = 2  # sub-pixel precision for cv2: coordinates × 4
        rings = []
        for n in nuclei:
            xy = np.asarray(n.polygon.exterior.coords)
            px = (xy - (self.region.x, self.region.y)) / self.downsample - 0.5  # edges → pixel centres
            rings.append(np.round(px * (1 << shift)).astype(np.int32))
        if rings:
            cv2.polylines(self.canvas, rings, True, OUTLINE_BGR, self.thickness, cv2.LINE_AA, shift)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        ok, encoded = cv2.imencode(".png", self.canvas)
        if not ok:
            raise OutputError(f"could not encode the overlay for {path}")
        return write_bytes(path, encoded.tobytes())
