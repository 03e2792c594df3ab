"""Polygons → pixel labels and masks, by pixel centres.

The inverse of :mod:`dannucnet.geometry.polygons`: a pixel belongs to a polygon
when its centre ``(c + 0.5, r + 0.5)``, mapped to ``origin + scale * centre``,
lies inside it. A centre exactly on an outline is decided half-open, like
:class:`~dannucnet.geometry.ownership.Rect` (a point on a left or top edge is
in, on a right or bottom edge is out), so two polygons sharing an edge never
both claim a pixel and an annotation traced through pixel centres rasterises
the same way every time.

One vectorised scanline pass serves every polygon at once: each edge is
crossed with the pixel-centre rows it spans, crossings are sorted per polygon
and row and paired (even–odd, so holes stay holes), and the pairs become runs
of pixels. No per-polygon Python loop, no per-pixel geometry test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from dannucnet.errors import InputError

__all__ = ["rasterize_polygons", "rasterize_mask", "polygon_runs"]


def _check(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    if len(shape) != 2 or shape[0] < 0 or shape[1] < 0:
        raise InputError(f"raster shape must be (height, width), got {tuple(shape)}")
    if not scale > 0:
        raise InputError(f"scale (downsample) must be positive, got {scale}")
    return int(shape[0]), int(shape[1])


def _polygon_parts(geoms: Sequence[BaseGeometry | None]) -> tuple[np.ndarray, np.ndarray]:
    """Polygon pieces of each geometry and the index of the geometry each came from."""
    arr = np.empty(len(geoms), dtype=object)
    arr[:] = list(geoms)
    present = ~(shapely.is_missing(arr) | shapely.is_empty(arr))
    idx = np.flatnonzero(present)
    arr = arr[idx]
    invalid = ~shapely.is_valid(arr)
    if invalid.any():
        arr[invalid] = shapely.make_valid(arr[invalid])
    # two levels: make_valid can nest multipolygons inside a collection
    parts, src = shapely.get_parts(arr, return_index=True)
    parts, src2 = shapely.get_parts(parts, return_index=True)
    src = idx[src[src2]]
    is_poly = shapely.get_type_id(parts) == 3
    return parts[is_poly], src[is_poly]


def polygon_runs(
    geoms: Sequence[BaseGeometry | None],
    shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel runs inside each geometry: ``(index, row, col_start, col_stop)``, stop exclusive.

    Runs are clipped to the raster; geometry ``i`` may give many runs per row
    (concave shapes, holes, multipolygons).
    """
    h, w = _check(shape, scale)
    empty = np.zeros(0, np.int64)
    if len(geoms) == 0 or h == 0 or w == 0:
        return empty, empty, empty, empty
    parts, src = _polygon_parts(geoms)
    if parts.size == 0:
        return empty, empty, empty, empty
    rings, part_of_ring = shapely.get_rings(parts, return_index=True)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    # to array-pixel coordinates, where the centre of pixel (c, r) is (c + 0.5, r + 0.5)
    xy = (coords - (float(origin[0]), float(origin[1]))) / scale
    same = ring_of[1:] == ring_of[:-1]  # rings are closed: consecutive points form the edges
    x0, y0 = xy[:-1][same, 0], xy[:-1][same, 1]
    x1, y1 = xy[1:][same, 0], xy[1:][same, 1]
    edge_geom = src[part_of_ring[ring_of[:-1][same]]]
    # an edge crosses the centre rows r with ylo <= r + 0.5 < yhi (horizontal edges cross none)
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    r_first = np.maximum(np.ceil(ylo - 0.5), 0).astype(np.int64)
    r_stop = np.minimum(np.ceil(yhi - 0.5), h).astype(np.int64)
    n = np.maximum(r_stop - r_first, 0)
    total = int(n.sum())
    if total == 0:
        return empty, empty, empty, empty
    e = np.repeat(np.arange(n.size), n)
    rows = r_first[e] + (np.arange(total) - np.repeat(np.cumsum(n) - n, n))
    yc = rows + 0.5
    xs = x0[e] + (yc - y0[e]) * (x1[e] - x0[e]) / (y1[e] - y0[e])
    g = edge_geom[e]
    order = np.lexsort((xs, rows, g))
    g, rows, xs = g[order], rows[order], xs[order]
    # every ring crosses a row an even number of times, so sorted crossings pair up in order
    x_in, x_out = xs[0::2], xs[1::2]
    g, rows = g[0::2], rows[0::2]
    # pixel c is in when x_in <= c + 0.5 < x_out
    c_start = np.clip(np.ceil(x_in - 0.5), 0, w).astype(np.int64)
    c_stop = np.clip(np.ceil(x_out - 0.5), 0, w).astype(np.int64)
    keep = c_stop > c_start
    return g[keep], rows[keep], c_start[keep], c_stop[keep]


def rasterize_mask(
    geometry: BaseGeometry | Sequence[BaseGeometry] | None,
    shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie inside ``geometry`` (region / ignore masks).

    A sequence is treated as the union of its members.
    """
    h, w = _check(shape, scale)
    if geometry is None:
        return np.zeros((h, w), bool)
    geoms = [geometry] if isinstance(geometry, BaseGeometry) else list(geometry)
    _, rows, c0, c1 = polygon_runs(geoms, (h, w), origin, scale)
    # run starts +1, run stops −1, prefix sum along the row: > 0 inside any run
    diff = np.zeros((h, w + 1), np.int32)
    np.add.at(diff, (rows, c0), 1)
    np.add.at(diff, (rows, c1), -1)
    return np.cumsum(diff[:, :w], axis=1) > 0


def rasterize_polygons(
    polygons: Sequence[BaseGeometry | None],
    shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    first_wins: bool = True,
) -> np.ndarray:
    """int32 label image: polygon ``i`` paints id ``i + 1`` on the pixels whose centres it contains.

    Where polygons overlap, the earlier one keeps the pixel (``first_wins``) or
    the later one takes it. ``None`` or empty entries leave their id unused.
    """
    h, w = _check(shape, scale)
    g, rows, c0, c1 = polygon_runs(list(polygons), (h, w), origin, scale)
    lengths = c1 - c0
    total = int(lengths.sum())
    if total == 0:
        return np.zeros((h, w), np.int32)
    run = np.repeat(np.arange(lengths.size), lengths)
    flat = rows[run] * w + c0[run] + (np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    ids = (g[run] + 1).astype(np.int32)
    if first_wins:
        out = np.full(h * w, np.iinfo(np.int32).max, np.int32)
        np.minimum.at(out, flat, ids)
        out[out == np.iinfo(np.int32).max] = 0
    else:
        out = np.zeros(h * w, np.int32)
        np.maximum.at(out, flat, ids)
    return out.reshape(h, w)
