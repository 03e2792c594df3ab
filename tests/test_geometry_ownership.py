"""Chunk planning and ownership: every pixel in exactly one core, every nucleus kept once."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from dannucnet.engine.tiling import WindowGrid
from dannucnet.errors import InputError
from dannucnet.geometry.ownership import Chunk, Rect, centroids_of, owned, owned_mask, plan_chunks

GRID = WindowGrid(256, 32)  # the 256² training patch: windows of images that are not slide chunks


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


@pytest.mark.parametrize("aligned", [False, True], ids=["equal", "window-aligned"])
@pytest.mark.parametrize(
    "region,size,margin",
    [
        (Rect(0, 0, 1000, 700), 256, 64),
        (Rect(13, 7, 517, 260), 128, 32),
        (Rect(0, 0, 100, 100), 1000, 10),
        (Rect(5.5, 2.25, 300.5, 99.75), 64.5, 8),
        (Rect(0, 0, 1200, 800), 300, 16),
    ],
)
def test_cores_partition_region_exactly(region: Rect, size: float, margin: float, aligned: bool) -> None:
    bounds = Rect(0, 0, 1200, 800)
    chunks = plan_chunks(region, size, margin, bounds, WindowGrid(64, 8).span if aligned else None)
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


def _axis(chunks: list[Chunk]) -> list[Chunk]:
    """The chunks of the first row."""
    return [c for c in chunks if c.core.y == chunks[0].core.y]


def _windows_along(chunks: list[Chunk], grid: WindowGrid) -> int:
    return sum(grid.count(int(c.read.to_int().width)) for c in _axis(chunks))


@pytest.mark.parametrize("margin", [0, 64, 128])
def test_window_aligned_chunks_never_cost_more_windows(margin: int) -> None:
    """Against equal pieces, on every axis length from one chunk to ten, inside an image and at its edge."""
    bounds = Rect(0, 0, 30000, 300)
    fewer = 0
    for length in range(100, 20500, 97):
        for x in (0, 1000):  # at the image's edge (no margin to read before) and inside it
            region = Rect(x, 0, length, 300)
            equal = plan_chunks(region, 2048, margin, bounds)
            aligned = plan_chunks(region, 2048, margin, bounds, GRID.span)
            assert sum(c.core.width for c in _axis(aligned)) == length
            assert all(c.core.width <= 2048 and float(c.core.x).is_integer() for c in aligned)
            assert all(c.read == c.core.expand(margin).clip(bounds) for c in aligned)
            cost, before = _windows_along(aligned, GRID), _windows_along(equal, GRID)
            assert cost <= before, (length, x)
            fewer += cost < before
    assert fewer > 100  # and usually fewer: 20× slides' 2176 px reads need 10 windows where 9 can do


def test_window_aligned_chunks_on_a_20x_and_a_40x_slide_axis() -> None:
    """The counts the docstrings give: 64 px margins (0.5 µm/px) and 128 px (0.25 µm/px)."""
    for side, margin, before, after in [(6144, 64, 30, 29), (40960, 64, 200, 192), (40960, 128, 218, 203)]:
        image = Rect(0, 0, side, 256)
        equal = plan_chunks(image, 2048, margin, image)
        aligned = plan_chunks(image, 2048, margin, image, GRID.span)
        assert (_windows_along(equal, GRID), _windows_along(aligned, GRID)) == (before, after)
        widths = [c.core.width for c in _axis(aligned)]
        assert min(widths) >= 0.8 * max(widths)  # windows spread evenly: no sliver of a chunk


def test_512_windows_in_3072_chunks_run_fewer_network_pixels_on_a_whole_slide() -> None:
    """The shipped plan (512² windows, 3072 px cores) against the earlier one (256², 2048) on a 40960 px axis:
    49,152 → 45,568 network px at 64 px margins (20×) and 51,968 → 47,616 at 128 px (40×), i.e. 1.44 → 1.24
    and 1.61 → 1.35 network px per slide px over the whole slide."""
    big = WindowGrid(512, 32)
    image = Rect(0, 0, 40960, 256)
    for margin, before, after in [(64, 192 * 256, 89 * 512), (128, 203 * 256, 93 * 512)]:
        earlier = plan_chunks(image, 2048, margin, image, GRID.span)
        shipped = plan_chunks(image, 3072, margin, image, big.span)
        assert _windows_along(earlier, GRID) * 256 == before
        assert _windows_along(shipped, big) * 512 == after < before
        assert all(c.core.width <= 3072 for c in shipped)


def test_window_grid_span_and_count_agree() -> None:
    for n in range(1, 40):
        assert GRID.count(GRID.span(n)) == n and GRID.count(GRID.span(n) + 1) == n + 1
    assert GRID.count(10) == 1  # a short axis is padded to one window


def test_window_aligned_plan_falls_back_to_equal_pieces_where_it_cannot_align() -> None:
    region = Rect(0, 0, 10, 7)
    # a core under a pixel, and a fractional region: equal pieces
    assert plan_chunks(region, 0.5, 0.1, None, GRID.span) == plan_chunks(region, 0.5, 0.1)
    frac = Rect(0.5, 0.25, 999.5, 699.5)  # each axis fractional (an integral one is still aligned)
    assert plan_chunks(frac, 300, 16, None, GRID.span) == plan_chunks(frac, 300, 16)
