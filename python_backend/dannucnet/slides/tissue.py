"""Tissue mask from a low-resolution read, so whole-slide runs skip empty glass.

Why both saturation and optical density: stained tissue is coloured
(saturation) but very pale stroma is barely saturated yet still absorbs light
(optical density), and glass is neither. Otsu picks the split per slide (stain
strength varies), clamped to a sane range so an all-tissue or all-glass image is
not split in half. Morphology removes dust and fills small holes (lumens,
fat) that are still worth segmenting around.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from dannucnet.slides.reader import ImageSource

# Clamp for the per-slide Otsu threshold on saturation (0..255).
_SAT_MIN, _SAT_MAX = 14, 45
# Mean optical density (natural log) above which a pixel is tissue whatever its colour.
_OD_TISSUE = 0.35
# Pixels darker than this on every channel are scanner padding or pen, not tissue.
_BLACK = 25
# Longest side of the mask when the pixel size is unknown.
_FALLBACK_SIDE = 2048


def _rect_tuple(rect: Any) -> tuple[float, float, float, float]:
    """Accept ``geometry.ownership.Rect`` (x, y, width, height) or a plain 4-tuple."""
    if hasattr(rect, "width") and hasattr(rect, "x"):
        return float(rect.x), float(rect.y), float(rect.width), float(rect.height)
    x, y, w, h = rect
    return float(x), float(y), float(w), float(h)


@dataclass
class TissueMask:
    """Boolean tissue mask; mask pixel (c, r) covers level-0 [c·d, (c+1)·d) × [r·d, (r+1)·d)."""

    mask: np.ndarray
    downsample: float
    _integral: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        self._integral = cv2.integral(self.mask.astype(np.uint8), sdepth=cv2.CV_32S)

    @property
    def fraction(self) -> float:
        """Fraction of the whole image that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction_in(self, rect: Any) -> float:
        """Fraction of a level-0 rectangle covered by tissue (outside the image counts as glass)."""
        x, y, w, h = _rect_tuple(rect)
        if w <= 0 or h <= 0:
            return 0.0
        d = self.downsample
        mh, mw = self.mask.shape
        c0 = min(max(int(math.floor(x / d)), 0), mw)
        r0 = min(max(int(math.floor(y / d)), 0), mh)
        c1 = min(max(int(math.ceil((x + w) / d)), 0), mw)
        r1 = min(max(int(math.ceil((y + h) / d)), 0), mh)
        if c1 <= c0 or r1 <= r0:
            return 0.0
        ii = self._integral
        count = int(ii[r1, c1] - ii[r0, c1] - ii[r1, c0] + ii[r0, c0])
        # mask pixels counted cover up to (c1-c0)(r1-r0) d² of level 0; scale to the rect's area
        covered = (c1 - c0) * (r1 - r0) * d * d
        inside = count / ((c1 - c0) * (r1 - r0))
        return float(min(1.0, inside * min(covered, w * h) / (w * h)))

    def has_tissue(self, rect: Any, min_fraction: float = 0.01) -> bool:
        """True when at least ``min_fraction`` of the rectangle is tissue."""
        return self.fraction_in(rect) >= min_fraction


def tissue_mask(source: ImageSource, mpp_target: float = 8.0) -> TissueMask:
    """Tissue mask at about ``mpp_target`` µm/px (or ~2048 px long side if the pixel size is unknown)."""
    if source.mpp is not None:
        d = max(1.0, mpp_target / source.mpp)
    else:
        d = max(1.0, max(source.width, source.height) / _FALLBACK_SIDE)
    # keep the mask at least 32 px on its short side, so small images still work
    d = min(d, max(1.0, min(source.width, source.height) / 32))
    rgb = source.read_region(0, 0, source.width, source.height, downsample=d)
    mask = tissue_from_rgb(rgb, um_per_px=(source.mpp * d) if source.mpp else None)
    return TissueMask(mask=mask, downsample=d)


def tissue_from_rgb(rgb: np.ndarray, um_per_px: float | None = None) -> np.ndarray:
    """Tissue mask of an RGB uint8 thumbnail."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], 3)
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=2)
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    t = float(np.clip(otsu, _SAT_MIN, _SAT_MAX))
    mask = (sat > t) | (od > _OD_TISSUE)
    mask &= rgb.max(axis=2) > _BLACK
    # morphology scaled to physical size when known (~24 µm close, ~16 µm open)
    scale = um_per_px if um_per_px else 8.0
    k_close = max(1, int(round(24.0 / scale)))
    k_open = max(1, int(round(16.0 / scale)))
    m = mask.astype(np.uint8)
    if k_close > 1:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_close, k_close)))
    if k_open > 1:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_open, k_open)))
    # drop specks below ~0.005 mm² and fill holes below the same size
    min_px = max(4, int(5000.0 / (scale * scale)))
    m = _drop_small(m, min_px)
    m = 1 - _drop_small(1 - m, min_px)
    # pad by ~16 µm: skipping a chunk with tissue loses nuclei, reading glass only costs time
    k_pad = 2 * max(1, int(round(8.0 / scale))) + 1
    m = cv2.dilate(m.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_pad, k_pad)))
    return m.astype(bool)


def _drop_small(m: np.ndarray, min_px: int) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    if n <= 1:
        return m.astype(np.uint8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[lab].astype(np.uint8)
