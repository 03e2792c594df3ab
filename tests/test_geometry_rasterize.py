"""Polygon rasterisation by pixel centres, with exact, hand-checked pixel sets."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon

from dannucnet.errors import InputError
from dannucnet.geometry.rasterize import rasterize_mask, rasterize_polygons


def _pixels(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(c), int(r)) for r, c in zip(*np.nonzero(mask))}


def test_squares_give_exact_pixel_sets() -> None:
    lab = rasterize_polygons([shapely.box(2, 3, 5, 7), shapely.box(6.2, 1.4, 8.6, 2.6)], (10, 10))
    assert lab.dtype == np.int32
    assert _pixels(lab == 1) == {(c, r) for c in range(2, 5) for r in range(3, 7)}
    # centres (6.5, 1.5), (7.5, 1.5), (6.5, 2.5), (7.5, 2.5) lie inside; (8.5, ·) inside too
    assert _pixels(lab == 2) == {(c, r) for c in (6, 7, 8) for r in (1, 2)}
    # a square too small to hold any pixel centre paints nothing
    assert rasterize_polygons([shapely.box(3.6, 3.6, 4.4, 4.4)], (10, 10)).max() == 0


def test_centres_on_edges_are_half_open() -> None:
    # box through pixel centres: left/top edges in, right/bottom edges out (like Rect)
    lab = rasterize_polygons([shapely.box(1.5, 1.5, 4.5, 3.5)], (6, 6))
    assert _pixels(lab == 1) == {(c, r) for c in (1, 2, 3) for r in (1, 2)}
    # two boxes sharing an edge through centres: no pixel claimed twice, none lost
    lab = rasterize_polygons([shapely.box(0.5, 0.5, 3.5, 2.5), shapely.box(3.5, 0.5, 5.5, 2.5)], (4, 6))
    assert _pixels(lab == 1) == {(c, r) for c in (0, 1, 2) for r in (0, 1)}
    assert _pixels(lab == 2) == {(c, r) for c in (3, 4) for r in (0, 1)}


def test_overlap_order_origin_scale_and_clipping() -> None:
    a, b = shapely.box(0, 0, 4, 4), shapely.box(2, 2, 6, 6)
    first = rasterize_polygons([a, b], (8, 8))
    last = rasterize_polygons([a, b], (8, 8), first_wins=False)
    assert first[3, 3] == 1 and last[3, 3] == 2 and first[5, 5] == last[5, 5] == 2
    # level-0 box (100, 200)-(108, 216) at downsample 4: array pixels cols 0..1, rows 0..3
    lab = rasterize_polygons([shapely.box(100, 200, 108, 216)], (6, 6), origin=(100, 200), scale=4)
    assert _pixels(lab == 1) == {(c, r) for c in (0, 1) for r in range(4)}
    # partly outside the raster: clipped, no error
    lab = rasterize_polygons([None, Polygon(), shapely.box(-5, -5, 2, 2)], (4, 4))
    assert _pixels(lab == 3) == {(0, 0), (1, 0), (0, 1), (1, 1)} and lab.max() == 3


def test_holes_multipolygons_and_triangles() -> None:
    ring = shapely.box(0, 0, 6, 6).difference(shapely.box(2, 2, 4, 4))
    m = rasterize_mask(ring, (6, 6))
    assert m.sum() == 32 and not m[2:4, 2:4].any()
    multi = MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(3, 3, 4, 5)])
    assert _pixels(rasterize_polygons([multi], (6, 6)) == 1) == {(0, 0), (3, 3), (3, 4)}
    tri = Polygon([(0, 0), (10, 0), (0, 10)])
    m = rasterize_mask(tri, (10, 10))
    expected = {(c, r) for c in range(10) for r in range(10) if (c + 0.5) + (r + 0.5) < 10}
    assert _pixels(m) == expected
    # a sequence is a union
    assert rasterize_mask([shapely.box(0, 0, 2, 2), shapely.box(1, 1, 3, 3)], (4, 4)).sum() == 7


def test_matches_pointwise_contains_on_random_polygons() -> None:
    rng = np.random.default_rng(0)
    polys = [
        shapely.Point(rng.uniform(0, 120, 2)).buffer(rng.uniform(2, 15), quad_segs=int(rng.integers(1, 6)))
        for _ in range(30)
    ]
    shape, origin, scale = (70, 90), (-3.3, 7.1), 1.7
    lab = rasterize_polygons(polys, shape, origin=origin, scale=scale)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    xs, ys = origin[0] + scale * (cols + 0.5), origin[1] + scale * (rows + 0.5)
    expected = np.zeros(shape, np.int32)
    for i in reversed(range(len(polys))):
        expected[shapely.contains_xy(polys[i], xs, ys)] = i + 1
    assert np.array_equal(lab, expected)
    union = rasterize_mask(shapely.union_all(polys), shape, origin=origin, scale=scale)
    assert np.array_equal(union, expected > 0)


def test_large_region_mask_and_errors() -> None:
    big = shapely.Point(1000, 1000).buffer(900)
    m = rasterize_mask(big, (2000, 2000))
    assert m.sum() == pytest.approx(big.area, rel=1e-3)
    assert rasterize_mask(None, (3, 3)).sum() == 0
    with pytest.raises(InputError):
        rasterize_mask(big, (10, 10), scale=0)
    with pytest.raises(InputError):
        rasterize_polygons([big], (10, 10, 3))
