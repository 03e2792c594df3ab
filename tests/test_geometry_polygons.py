"""Labels → polygons along outer pixel edges; rasterising them at pixel centres gives the labels back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon

from dannucnet.errors import InputError
from dannucnet.geometry.instances import labels_from_mask
from dannucnet.geometry.polygons import labels_to_polygons, largest_polygon, mask_to_polygon
from dannucnet.geometry.rasterize import rasterize_polygons


def _random_blobs(seed: int, size: int = 256) -> np.ndarray:
    """Irregular blobs: thresholded smoothed noise, 4-connected labels."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(size=(size, size)).astype(np.float32), (0, 0), 4.0)
    return labels_from_mask(noise > np.quantile(noise, 0.7), min_area_px=4)


def _ellipses(seed: int, size: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.int32)
    for k in range(1, 41):
        layer = np.zeros((size, size), np.uint8)
        a = int(rng.uniform(6, 25))
        cv2.ellipse(
            layer, (int(rng.uniform(0, size)), int(rng.uniform(0, size))),
            (a, max(2, int(a * rng.uniform(0.4, 1)))), rng.uniform(0, 180), 0, 360, 1, -1,
        )
        lab[(layer > 0) & (lab == 0)] = k  # touching and clipped by the image border too
    # overlaps can cut an ellipse in two; nuclei from label_nuclei are always one 4-connected piece
    out = np.zeros_like(lab)
    for k in range(1, 41):
        pieces = labels_from_mask(lab == k)
        out[pieces > 0] = pieces[pieces > 0] + out.max()
    return out


def _roundtrip_scores(lab: np.ndarray, origin=(0.0, 0.0), scale=1.0) -> tuple[float, np.ndarray, dict]:
    polys = labels_to_polygons(lab, origin=origin, scale=scale)
    ids = sorted(polys)
    back = rasterize_polygons([polys[i] for i in ids], lab.shape, origin=origin, scale=scale)
    lut = np.zeros(int(lab.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    ref = lut[lab]
    fg, fb = lab > 0, back > 0
    dice = 2 * (fg & fb).sum() / (fg.sum() + fb.sum())
    n = len(ids) + 1
    inter = np.bincount(ref[(ref == back) & (ref > 0)], minlength=n)[1:]
    union = np.bincount(ref.ravel(), minlength=n)[1:] + np.bincount(back.ravel(), minlength=n)[1:] - inter
    return float(dice), inter / union, polys


@pytest.mark.parametrize("make", [_random_blobs, _ellipses])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_is_near_exact(make, seed: int) -> None:
    lab = make(seed)
    dice, iou, polys = _roundtrip_scores(lab)
    # every nucleus that has pixels gets a polygon (a label split in pieces keeps its largest)
    present = set(np.unique(lab).tolist()) - {0}
    assert set(polys) == present
    assert dice >= 0.98
    assert iou.min() >= 0.85
    assert np.mean(iou == 1.0) > 0.9  # nearly all exact
    for p in polys.values():
        assert isinstance(p, Polygon) and p.is_valid and not p.interiors


@pytest.mark.parametrize("origin,scale", [((1000.0, 2000.0), 1.0), ((12.5, -3.25), 4.0), ((100.0, 50.0), 0.37)])
def test_round_trip_with_origin_and_scale(origin, scale: float) -> None:
    lab = _ellipses(5)
    dice, iou, polys = _roundtrip_scores(lab, origin, scale)
    assert dice >= 0.98 and iou.min() >= 0.85
    plain = labels_to_polygons(lab)
    for i, p in polys.items():
        expected = shapely.transform(plain[i], lambda xy: xy * scale + origin)
        assert p.equals_exact(expected, 1e-9)
        assert p.area == pytest.approx(plain[i].area * scale**2)


def test_outlines_follow_pixel_edges() -> None:
    lab = np.zeros((12, 12), np.int32)
    lab[2:5, 3:7] = 1  # 4 wide, 3 tall rectangle: columns 3..6, rows 2..4
    lab[8, 8] = 2  # a single pixel
    lab[7:10, 1:4] = 3
    lab[8, 2] = 0  # hole: polygons have none
    polys = labels_to_polygons(lab)
    assert polys[1].equals(shapely.box(3, 2, 7, 5))
    assert polys[2].equals(shapely.box(8, 8, 9, 9))
    assert polys[3].equals(shapely.box(1, 7, 4, 10)) and not polys[3].interiors
    # L shape: the concave corner is an exact pixel corner
    lab = np.zeros((6, 6), np.int32)
    lab[1:4, 1] = 1
    lab[3, 2:4] = 1
    p = labels_to_polygons(lab, simplify_px=0)[1]
    assert p.equals(Polygon([(1, 1), (2, 1), (2, 3), (4, 3), (4, 4), (1, 4)]))
    assert p.area == 5


def test_disconnected_label_keeps_largest_piece_and_ids_filter() -> None:
    lab = np.zeros((20, 20), np.int32)
    lab[2:8, 2:8] = 4
    lab[12:14, 12:14] = 4  # smaller second piece of the same label
    lab[15:18, 2:5] = 7
    lab[0, 19] = 9
    lab[1, 18] = 9  # two pixels touching only at a corner
    polys = labels_to_polygons(lab)
    assert polys[4].equals(shapely.box(2, 2, 8, 8))
    assert polys[9].is_valid and polys[9].area == 1
    assert set(labels_to_polygons(lab, ids=[7, 99])) == {7}
    assert mask_to_polygon(lab == 7).equals(shapely.box(2, 15, 5, 18))


def test_largest_polygon_and_errors() -> None:
    bowtie = Polygon([(0, 0), (2, 2), (2, 0), (0, 2)])
    fixed = largest_polygon(bowtie)
    assert fixed.is_valid and fixed.area == pytest.approx(1.0)
    assert largest_polygon(Polygon()) is None
    assert labels_to_polygons(np.zeros((5, 5), np.int32)) == {}
    with pytest.raises(InputError):
        labels_to_polygons(np.zeros((5, 5), np.float32))
    with pytest.raises(InputError):
        labels_to_polygons(np.zeros((5, 5), np.int32), scale=0)


def test_simplification_reduces_vertices_within_half_a_pixel() -> None:
    lab = _ellipses(7)
    exact = labels_to_polygons(lab, simplify_px=0)
    simple = labels_to_polygons(lab)
    assert sum(len(p.exterior.coords) for p in simple.values()) < sum(len(p.exterior.coords) for p in exact.values())
    for i, p in simple.items():
        assert p.hausdorff_distance(exact[i]) <= 0.5 + 1e-9
