"""Probability → instances: threshold, holes, specks, and splitting touching nuclei."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dannucnet.errors import InputError
from dannucnet.geometry.instances import fill_holes, label_nuclei, labels_from_mask


def _soft(mask: np.ndarray) -> np.ndarray:
    """A probability map like a network's: the mask with blurred edges."""
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0)


def _two_discs(radius: int, centre_distance: float) -> np.ndarray:
    size = 6 * radius
    m = np.zeros((size, size), np.uint8)
    c = size // 2
    cv2.circle(m, (int(round(c - centre_distance / 2)), c), radius, 1, -1)
    cv2.circle(m, (int(round(c + centre_distance / 2)), c), radius, 1, -1)
    return m


def _ellipse(a: int, b: int, angle: float) -> np.ndarray:
    m = np.zeros((3 * a, 3 * a), np.uint8)
    cv2.ellipse(m, (3 * a // 2, 3 * a // 2), (a, b), angle, 0, 360, 1, -1)
    return m


@pytest.mark.parametrize("radius", [10, 15, 22, 30])  # 5–15 µm nuclei at 0.25 µm/px
@pytest.mark.parametrize("ratio", [1.6, 1.9])
def test_two_touching_discs_become_two(radius: int, ratio: float) -> None:
    m = _two_discs(radius, ratio * radius)
    assert labels_from_mask(m).max() == 1  # one blob before splitting
    lab = label_nuclei(_soft(m))
    assert lab.dtype == np.int32 and lab.max() == 2
    # the cut runs through the neck: each half holds one disc centre and about half the area
    areas = np.bincount(lab.ravel())[1:]
    assert areas.min() / areas.max() > 0.8
    size = m.shape[0]
    c = size // 2
    d = ratio * radius
    left, right = lab[c, int(c - d / 2)], lab[c, int(c + d / 2)]
    assert {left, right} == {1, 2}


@pytest.mark.parametrize("a,b", [(14, 10), (24, 10), (36, 12), (45, 15), (30, 8)])
@pytest.mark.parametrize("angle", [0, 30, 45, 80])
def test_isolated_ellipse_stays_one(a: int, b: int, angle: float) -> None:
    lab = label_nuclei(_soft(_ellipse(a, b, angle)))
    assert lab.max() == 1


def test_fills_holes_and_respects_max_hole() -> None:
    m = np.zeros((80, 80), np.uint8)
    cv2.circle(m, (40, 40), 25, 1, -1)
    m[38:42, 38:42] = 0  # 16 px hole
    m[20:30, 35:45] = 0  # 100 px hole
    lab = label_nuclei(m.astype(np.float32), split=False, max_hole_px=None)
    assert lab.max() == 1 and lab[40, 40] == 1 and lab[25, 40] == 1
    lab = label_nuclei(m.astype(np.float32), split=False)  # default: small holes filled
    assert lab[40, 40] == 1 and lab[25, 40] == 1
    lumen = np.zeros((120, 120), np.uint8)
    cv2.circle(lumen, (60, 60), 50, 1, -1)
    cv2.circle(lumen, (60, 60), 30, 0, -1)  # a 2,800 px lumen inside a ring of tissue
    assert label_nuclei(lumen.astype(np.float32), split=False)[60, 60] == 0
    lab = label_nuclei(m.astype(np.float32), split=False, max_hole_px=50)
    assert lab[40, 40] == 1 and lab[25, 40] == 0
    # a pocket open to the image border is not a hole
    ring = np.zeros((20, 20), bool)
    ring[:, :3] = ring[:3, :] = ring[-3:, :] = True
    assert not fill_holes(ring)[10, 10]


def test_drops_specks_and_thresholds() -> None:
    p = np.zeros((100, 100), np.float32)
    p[10:13, 10:13] = 0.9  # 9 px speck
    p[50:60, 50:60] = 0.9  # 100 px nucleus
    p[70:80, 10:20] = 0.4  # below threshold
    lab = label_nuclei(p, min_area_px=16)
    assert lab.max() == 1 and lab[55, 55] == 1 and lab[11, 11] == 0 and lab[75, 15] == 0
    assert label_nuclei(p, threshold=0.3, min_area_px=16).max() == 2
    assert label_nuclei(p, min_area_px=4).max() == 2


def test_labels_are_sequential_and_split_can_be_off() -> None:
    m = np.zeros((200, 300), np.uint8)
    m[:, :] = 0
    m[30:90, 30:150] = _two_discs(20, 34)[30:90, 0:120]
    cv2.circle(m, (230, 140), 18, 1, -1)
    lab = label_nuclei(_soft(m))
    assert sorted(np.unique(lab).tolist()) == [0, 1, 2, 3]
    assert label_nuclei(_soft(m), split=False).max() == 2


def test_empty_and_bad_input() -> None:
    assert label_nuclei(np.zeros((64, 64), np.float32)).max() == 0
    assert label_nuclei(np.zeros((0, 0), np.float32)).shape == (0, 0)
    with pytest.raises(InputError):
        label_nuclei(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InputError):
        label_nuclei(np.zeros((4, 4), np.float32), threshold=1.5)


def test_split_recovers_touching_nuclei_in_a_crowded_field() -> None:
    """A field of jittered ellipses, many touching: splitting must recover most of them."""
    rng = np.random.default_rng(3)
    size, step = 512, 34
    truth = np.zeros((size, size), np.int32)
    k = 0
    for cy in range(step // 2, size, step):
        for cx in range(step // 2, size, step):
            k += 1
            a = int(rng.uniform(14, 21))
            b = int(a * rng.uniform(0.6, 1.0))
            x, y = cx + int(rng.uniform(-6, 6)), cy + int(rng.uniform(-6, 6))
            layer = np.zeros_like(truth, np.uint8)
            cv2.ellipse(layer, (x, y), (a, b), rng.uniform(0, 180), 0, 360, 1, -1)
            truth[(layer > 0) & (truth == 0)] = k
    merged = labels_from_mask(truth > 0).max()
    lab = label_nuclei(_soft(truth > 0))
    # match by IoU > 0.5
    g, p = truth.ravel().astype(np.int64), lab.ravel().astype(np.int64)
    both = (g > 0) & (p > 0)
    inter = np.bincount(g[both] * (p.max() + 1) + p[both], minlength=(g.max() + 1) * (p.max() + 1))
    inter = inter.reshape(g.max() + 1, p.max() + 1)
    ag, ap = np.bincount(g), np.bincount(p)
    gi, pi = np.nonzero(inter)
    iou = inter[gi, pi] / (ag[gi] + ap[pi] - inter[gi, pi])
    matched = int((iou > 0.5).sum())
    assert merged < 0.6 * k  # the field really has many touching nuclei
    assert matched >= 0.85 * k
    assert lab.max() <= 1.05 * k  # and is not over-split


def test_a_predicted_distance_splits_touching_nuclei_without_a_neck() -> None:
    """Two 20x16 nuclei side by side make one 40x16 rectangle: no neck, so the mask alone keeps
    one object; a distance map with a hill in each (what the distance head predicts) gives two."""
    mask = np.zeros((40, 60), np.uint8)
    mask[12:28, 10:50] = 1
    prob = mask.astype(np.float32)
    distance = np.zeros_like(prob)
    yy, xx = np.mgrid[0:40, 0:60]
    for cx in (20, 40):
        hill = np.clip(1 - np.maximum(np.abs(xx - cx + 0.5) / 10, np.abs(yy - 19.5) / 8), 0, 1)
        distance = np.maximum(distance, hill * (np.abs(xx - cx + 0.5) < 10))
    assert label_nuclei(prob).max() == 1
    labels = label_nuclei(np.dstack([prob, distance]))
    assert labels.max() == 2
    assert set(np.unique(labels[20, 12:29])) == {1} or set(np.unique(labels[20, 12:29])) == {2}
    assert abs(int((labels == 1).sum()) - int((labels == 2).sum())) <= 16
    with pytest.raises(InputError, match="H×W×2"):
        label_nuclei(np.zeros((5, 5, 3), np.float32))
