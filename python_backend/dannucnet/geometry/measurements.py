"""Per-nucleus measurements, in QuPath's naming style.

Shape measurements come from the level-0 polygons (what the user sees in
QuPath); intensity measurements from the label image at array resolution,
whose pixels are exactly the pixel centres inside those polygons. Everything is
computed for all nuclei at once: shapely 2's vectorised functions for shape,
``scipy.ndimage`` label statistics for intensities.

Names carry their units, as QuPath shows them; µm entries appear only when the
pixel size is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from dannucnet.errors import InputError
from dannucnet.geometry.stain import hematoxylin_od

__all__ = ["measure_nuclei", "MEASUREMENT_NAMES"]

AREA_PX = "Area px^2"
AREA_UM = "Area µm^2"
PERIMETER_UM = "Perimeter µm"
CIRCULARITY = "Circularity"
SOLIDITY = "Solidity"
MAX_DIAMETER_UM = "Max diameter µm"
PROBABILITY = "Detection probability"
HEMATOXYLIN = "Hematoxylin OD mean"

MEASUREMENT_NAMES = (
    AREA_PX, AREA_UM, PERIMETER_UM, CIRCULARITY, SOLIDITY, MAX_DIAMETER_UM, PROBABILITY, HEMATOXYLIN,
)


def _max_diameters(hulls: np.ndarray) -> np.ndarray:
    """Largest vertex-to-vertex distance of each convex hull (the Feret diameter).

    Hulls are sorted by vertex count and handled in blocks padded to the block's
    largest hull, so all pairwise distances are one array expression per block.
    """
    coords, idx = shapely.get_coordinates(hulls, return_index=True)
    out = np.zeros(len(hulls), np.float64)
    if coords.size == 0:
        return out
    counts = np.bincount(idx, minlength=len(hulls))
    starts = np.cumsum(counts) - counts
    order = np.argsort(counts, kind="stable")
    order = order[counts[order] >= 2]
    block = 256
    for s in range(0, order.size, block):
        sel = order[s : s + block]
        k = int(counts[sel].max())
        # pad each hull by repeating its first vertex (adds no new distance)
        pos = np.minimum(np.arange(k)[None, :], counts[sel][:, None] - 1)
        p = coords[starts[sel][:, None] + pos]  # (m, k, 2)
        d2 = ((p[:, :, None, :] - p[:, None, :, :]) ** 2).sum(-1)
        out[sel] = np.sqrt(d2.max(axis=(1, 2)))
    return out


def _label_means(
    labels: np.ndarray, ids: np.ndarray, prob: np.ndarray | None, rgb: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Mean probability and haematoxylin OD inside each label (NaN for ids without pixels).

    Only labelled pixels are touched: one bincount per quantity instead of a pass
    over the whole image per statistic.
    """
    if prob is not None and np.shape(prob) != labels.shape:
        raise InputError(f"probability map {np.shape(prob)} and labels {labels.shape} must have the same shape")
    if rgb is not None and (np.ndim(rgb) != 3 or np.shape(rgb)[:2] != labels.shape or np.shape(rgb)[2] != 3):
        raise InputError(f"RGB image {np.shape(rgb)} must be H×W×3 with H×W = labels {labels.shape}")
    fg = labels > 0
    lab = labels[fg].astype(np.int64)
    n = max(int(lab.max(initial=0)), int(ids.max(initial=0))) + 1
    counts = np.bincount(lab, minlength=n).astype(np.float64)
    valid = (ids >= 0) & (ids < n)
    safe = np.where(valid, ids, 0)

    def mean_of(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(lab, weights=values.astype(np.float64), minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            m = sums[safe] / counts[safe]
        return np.where(valid & (counts[safe] > 0), m, np.nan)

    out: dict[str, np.ndarray] = {}
    if prob is not None:
        out[PROBABILITY] = mean_of(np.asarray(prob)[fg])
    if rgb is not None:
        out[HEMATOXYLIN] = mean_of(hematoxylin_od(np.asarray(rgb)[fg]))
    return out


def _outline_pixel(area: np.ndarray, labels: np.ndarray | None, ids: np.ndarray) -> float:
    """Size (level-0 px) of the pixel grid the outlines trace, from polygon area vs. label pixel count.

    Pixel-edge outlines enclose exactly their label's pixels, so area = count × step².
    """
    if labels is None:
        return 1.0
    counts = np.bincount(np.asarray(labels)[np.asarray(labels) > 0].astype(np.int64).ravel())
    ok = (ids > 0) & (ids < counts.size)
    n = counts[ids[ok]].sum() if ok.any() else 0
    if n == 0:
        return 1.0
    step = float(np.sqrt(area[ok].sum() / n))
    return step if np.isfinite(step) and step > 0 else 1.0


def measure_nuclei(
    polygons_level0: Mapping[int, BaseGeometry] | Sequence[BaseGeometry],
    labels: np.ndarray | None = None,
    prob: np.ndarray | None = None,
    rgb: np.ndarray | None = None,
    mpp_level0: float | None = None,
    *,
    outline_px: float | None = None,
) -> dict[int, dict[str, float]]:
    """Measurements per nucleus id.

    ``polygons_level0`` maps label id → polygon (a sequence means ids 1..N).
    ``labels`` is the instance image at array resolution, whose ids match; with it
    ``prob`` (same shape) gives "Detection probability" and ``rgb`` (same H×W)
    gives "Hematoxylin OD mean". ``mpp_level0`` (µm per level-0 pixel) adds the
    µm entries. Non-finite values are left out rather than written as NaN.

    Area is the outline's exact area. Perimeter, circularity and solidity are taken
    on the outline simplified by one outline pixel (``outline_px``, level-0 px;
    inferred from ``labels`` when given, else 1): a pixel staircase is ~4/π longer
    than the boundary it follows, which would cap a disc's circularity near 0.6–0.75.
    Straight-sided shapes are unchanged (a 10×10 square keeps perimeter 40).
    """
    if isinstance(polygons_level0, Mapping):
        ids = np.fromiter((int(k) for k in polygons_level0.keys()), np.int64, len(polygons_level0))
        geoms = list(polygons_level0.values())
    else:
        geoms = list(polygons_level0)
        ids = np.arange(1, len(geoms) + 1, dtype=np.int64)
    if len(geoms) == 0:
        return {}
    if mpp_level0 is not None and not mpp_level0 > 0:
        raise InputError(f"pixel size must be positive µm/px, got {mpp_level0}")
    if outline_px is not None and not outline_px >= 0:
        raise InputError(f"outline pixel size must be zero or positive, got {outline_px}")
    arr = np.empty(len(geoms), dtype=object)
    arr[:] = geoms

    area = shapely.area(arr)
    step = _outline_pixel(area, labels, ids) if outline_px is None else float(outline_px)
    # topology-preserving: plain Douglas-Peucker collapses small concave shapes
    smooth = shapely.simplify(arr, step, preserve_topology=True) if step > 0 else arr
    smooth_area = shapely.area(smooth)
    perimeter = shapely.length(smooth)
    hulls = shapely.convex_hull(arr)
    hull_area = shapely.area(hulls)
    with np.errstate(divide="ignore", invalid="ignore"):
        circularity = np.where(perimeter > 0, 4.0 * np.pi * smooth_area / perimeter**2, np.nan)
        solidity = np.where(hull_area > 0, np.minimum(smooth_area / hull_area, 1.0), np.nan)
    columns: dict[str, np.ndarray] = {AREA_PX: area}
    if mpp_level0 is not None:
        columns[AREA_UM] = area * mpp_level0**2
        columns[PERIMETER_UM] = perimeter * mpp_level0
    columns[CIRCULARITY] = np.minimum(circularity, 1.0)
    columns[SOLIDITY] = solidity
    if mpp_level0 is not None:
        columns[MAX_DIAMETER_UM] = _max_diameters(hulls) * mpp_level0

    if labels is not None and (prob is not None or rgb is not None):
        columns.update(_label_means(np.asarray(labels), ids, prob, rgb))

    return rows_by_id(ids, columns)


def rows_by_id(ids: np.ndarray, columns: dict[str, np.ndarray]) -> dict[int, dict[str, float]]:
    """Per-object dicts from one array per measurement, non-finite values left out (QuPath shows NaN as missing)."""
    names = list(columns)
    table = np.column_stack([columns[n] for n in names]).astype(np.float64)
    finite = np.isfinite(table)
    out: dict[int, dict[str, float]] = {}
    for i, nid in enumerate(ids.tolist()):
        row, ok = table[i].tolist(), finite[i]
        out[nid] = {n: v for n, v, good in zip(names, row, ok) if good}
    return out
