"""Per-nucleus measurements: exact values on hand-made shapes, µm scaling, label statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely

from dannucnet.errors import InputError
from dannucnet.geometry.measurements import MEASUREMENT_NAMES, measure_nuclei
from dannucnet.geometry.polygons import labels_to_polygons
from dannucnet.geometry.stain import hematoxylin_od


def test_square_without_pixel_size() -> None:
    m = measure_nuclei({3: shapely.box(0, 0, 10, 10)}, mpp_level0=None)
    assert set(m) == {3}
    v = m[3]
    assert v["Area px^2"] == pytest.approx(100)
    assert v["Circularity"] == pytest.approx(math.pi / 4)
    assert v["Solidity"] == pytest.approx(1.0)
    assert not any("µm" in k for k in v)  # no pixel size, no µm entries
    assert "Detection probability" not in v and "Hematoxylin OD mean" not in v


def test_square_with_pixel_size_and_sequence_input() -> None:
    m = measure_nuclei([shapely.box(0, 0, 10, 10), shapely.Point(0, 0).buffer(20, quad_segs=64)], mpp_level0=0.25)
    sq, disc = m[1], m[2]
    assert sq["Area px^2"] == pytest.approx(100)
    assert sq["Area µm^2"] == pytest.approx(6.25)
    assert sq["Perimeter µm"] == pytest.approx(10.0)
    assert sq["Max diameter µm"] == pytest.approx(10 * math.sqrt(2) * 0.25)
    assert disc["Circularity"] == pytest.approx(1.0, abs=0.02)  # measured on the 1-px simplified outline
    assert disc["Max diameter µm"] == pytest.approx(40 * 0.25, rel=1e-3)
    assert set(sq) <= set(MEASUREMENT_NAMES)


def test_concave_shape_solidity() -> None:
    l_shape = shapely.Polygon([(0, 0), (2, 0), (2, 1), (1, 1), (1, 2), (0, 2)])  # area 3, hull 3.5
    v = measure_nuclei({1: l_shape}, mpp_level0=None)[1]
    assert v["Solidity"] == pytest.approx(3 / 3.5)


def test_probability_and_hematoxylin_means_from_labels() -> None:
    labels = np.zeros((20, 30), np.int32)
    labels[2:8, 2:8] = 1
    labels[10:18, 15:25] = 2
    prob = np.zeros(labels.shape, np.float32)
    prob[labels == 1] = 0.9
    prob[labels == 2] = np.linspace(0.6, 0.8, int((labels == 2).sum()), dtype=np.float32)
    rgb = np.full(labels.shape + (3,), 230, np.uint8)
    rgb[labels == 1] = (60, 40, 140)  # dark purple: haematoxylin
    rgb[labels == 2] = (230, 120, 180)  # pink: eosin
    # polygons at downsample 2: level-0 areas are 4× the pixel counts
    polys = labels_to_polygons(labels, origin=(100, 100), scale=2.0)
    m = measure_nuclei(polys, labels, prob, rgb, mpp_level0=0.5)
    assert m[1]["Area px^2"] == pytest.approx(36 * 4)
    assert m[1]["Area µm^2"] == pytest.approx(36 * 4 * 0.25)
    assert m[1]["Detection probability"] == pytest.approx(0.9)
    assert m[2]["Detection probability"] == pytest.approx(0.7, abs=1e-6)
    h = hematoxylin_od(rgb)
    assert m[1]["Hematoxylin OD mean"] == pytest.approx(float(h[labels == 1].mean()), rel=1e-5)
    assert m[1]["Hematoxylin OD mean"] > m[2]["Hematoxylin OD mean"] + 0.3
    # ids with no pixels get no NaN entries
    m = measure_nuclei({1: polys[1], 9: shapely.box(0, 0, 4, 4)}, labels, prob, None, None)
    assert "Detection probability" in m[1] and "Detection probability" not in m[9]


def test_vectorised_over_many_and_errors() -> None:
    rng = np.random.default_rng(0)
    polys = {i: shapely.Point(rng.uniform(0, 1000, 2)).buffer(rng.uniform(5, 15)) for i in range(1, 2001)}
    m = measure_nuclei(polys, mpp_level0=0.25)
    assert len(m) == 2000 and all(0.9 < v["Circularity"] <= 1.0 for v in m.values())
    assert measure_nuclei({}, mpp_level0=0.25) == {}
    with pytest.raises(InputError):
        measure_nuclei(polys, mpp_level0=0)
    with pytest.raises(InputError):
        measure_nuclei({1: shapely.box(0, 0, 1, 1)}, np.zeros((4, 4), np.int32), np.zeros((5, 5), np.float32))


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_traced_disc_reads_round_at_any_downsample(scale: float) -> None:
    """Pixel-staircase outlines must not bias perimeter/circularity (the staircase is ~4/π too long)."""
    import cv2

    lab = np.zeros((80, 80), np.int32)
    cv2.circle(lab, (40, 40), 16, 1, -1)
    polys = labels_to_polygons(lab, origin=(7.0, 9.0), scale=scale)
    v = measure_nuclei(polys, lab, mpp_level0=0.25)[1]
    assert v["Area px^2"] == pytest.approx(int((lab > 0).sum()) * scale**2)  # area stays exact
    assert v["Circularity"] > 0.95 and v["Solidity"] > 0.95
    true_perimeter_um = 2 * math.pi * 16.5 * scale * 0.25
    assert v["Perimeter µm"] == pytest.approx(true_perimeter_um, rel=0.03)
    assert v["Max diameter µm"] == pytest.approx(33 * scale * 0.25, rel=0.05)
    # the outline pixel can be given instead of inferred, with the same result
    w = measure_nuclei(polys, mpp_level0=0.25, outline_px=scale)[1]
    assert w["Perimeter µm"] == pytest.approx(v["Perimeter µm"])
