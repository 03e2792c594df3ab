"""Chunk planning and ownership: every pixel in exactly one core, every nucleus kept once."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from dannucnet.errors import InputError
from dannucnet.geometry.ownership import Chunk, Rect, centroids_of, owned, owned_mask, plan_chunks


def test_rect_basics() -> None:
    r = Rect(10, 20, 30, 40)
    assert (r.x1, r.y1) == (40, 60)
    assert not r.is_empty and Rect(0, 0, 0, 5).is_empty and Rect(0, 0, 5, -1).is_empty
    # half-open: left/top edges in, right/bottom edges out
    got = r.contains(np.array([10, 39.999, 40, 9.999, 20]), np.array([20, 59.999, 30, 30, 60]))
    assert got.tolist() == [True, True, False, False, False]
    assert r.intersection(Rect(30, 50, 100, 100)) == Rect(30, 50, 10, 10)
    assert r.intersection(Rect(100, 100, 5, 5)).is_empty
    assert r.expand(5) == Rect(5, 15, 40, 50)
    assert r.expand(5).clip(Rect(0, 0, 38, 100)) == Rect(5, 15, 33, 50)
    assert Rect(1.2, 2.7, 3.0, 0.5).to_int() == Rect(1, 2, 4, 2)
    assert Rect(3, 4, 5, 6).to_int() == Rect(3, 4, 5, 6)


@pytest.mark.parametrize(
    "region,size,margin",
    [
        (Rect(0, 0, 1000, 700), 256, 64),
        (Rect(13, 7, 517, 260), 128, 32),
        (Rect(0, 0, 100, 100), 1000, 10),
        (Rect(5.5, 2.25, 300.5, 99.75), 64.5, 8),
    ],
)
def test_cores_partition_region_exactly(region: Rect, size: float, margin: float) -> None:
    bounds = Rect(0, 0, 1200, 800)
    chunks = plan_chunks(region, size, margin, bounds)
    assert chunks and all(isinstance(c, Chunk) for c in chunks)
    assert sum(c.core.area for c in chunks) == pytest.approx(region.area)
    for c in chunks:
        assert c.core.width <= size + 1e-9 and c.core.height <= size + 1e-9
        assert c.read == c.core.expand(margin).clip(bounds)
        if float(region.x).is_integer() and float(region.width).is_integer():
            assert float(c.core.x).is_integer() and float(c.core.width).is_integer()
    # union of cores is the region, no overlaps (areas add up and union matches)
    union = shapely.union_all([c.core.to_polygon() for c in chunks])
    assert union.symmetric_difference(region.to_polygon()).area < 1e-6
    # every point of the region (incl. points exactly on core seams) owned once
    rng = np.random.default_rng(0)
    xs = rng.uniform(region.x, region.x1, 5000)
    ys = rng.uniform(region.y, region.y1, 5000)
    seams_x = np.array([c.core.x for c in chunks])
    seams_y = np.array([c.core.y for c in chunks])
    xs = np.concatenate([xs, seams_x, seams_x])
    ys = np.concatenate([ys, seams_y, np.full_like(seams_y, region.y)])
    counts = sum(owned_mask(np.column_stack([xs, ys]), c.core).astype(int) for c in chunks)
    assert counts.tolist() == [1] * len(xs)


def test_each_nucleus_owned_by_exactly_one_chunk() -> None:
    region = Rect(0, 0, 600, 400)
    chunks = plan_chunks(region, 150, 40, region.expand(100))
    rng = np.random.default_rng(1)
    nuclei = [shapely.Point(x, y).buffer(rng.uniform(3, 12)) for x, y in rng.uniform(0, 400, (300, 2))]
    cents = centroids_of(nuclei)
    assert cents.shape == (300, 2)
    total = np.zeros(len(nuclei), int)
    for c in chunks:
        mask = owned(nuclei, c.core)
        assert np.array_equal(mask, owned(cents, c.core))
        # an owned nucleus lies entirely inside the read window when margin > nucleus size
        for n in np.asarray(nuclei, dtype=object)[mask]:
            assert c.read.to_polygon().contains(n)
        total += mask
    assert total.tolist() == [1] * len(nuclei)


def test_plan_rejects_bad_arguments_and_empty_region() -> None:
    with pytest.raises(InputError):
        plan_chunks(Rect(0, 0, 10, 10), 0, 1)
    with pytest.raises(InputError):
        plan_chunks(Rect(0, 0, 10, 10), 5, -1)
    assert plan_chunks(Rect(0, 0, 0, 10), 5, 1) == []
    assert owned([], Rect(0, 0, 1, 1)).shape == (0,)
