"""Segmentation metrics against hand-worked cases, a slow reference, and the degenerate cases."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from dannucnet.evaluate import metrics
from dannucnet.evaluate.metrics import (
    SCORE_NAMES,
    aji,
    drop_outside,
    instance_scores,
    overlap,
    pixel_scores,
    score_labels,
)

# Hand-worked example (4 x 6 pixels).
#
#   truth            prediction
#   1 1 1 . 2 2      1 1 5 . 2 2
#   1 1 1 . 2 2      1 1 5 . 2 2
#   . . . . . .      . . . . 2 2
#   3 3 . . . .      . . . . . 4
#
# Areas: truth 1 = 6, 2 = 4, 3 = 2 (12 px); prediction 1 = 4, 5 = 2, 2 = 6, 4 = 1 (13 px).
# Pixels: TP = 6 (nucleus 1, split in two) + 4 (nucleus 2) = 10, FP = 2 + 1 = 3, FN = 2 (nucleus 3).
#   precision = 10/13, recall = 10/12, F1 = 2*10 / (2*10 + 3 + 2) = 20/25 = 0.8, Jaccard = 10/15.
# AJI: true 1 pairs with pred 1 (IoU 4/6 beats pred 5's 2/6): C += 4, U += 6.
#      true 2 pairs with pred 2 (IoU 4/6):                       C += 4, U += 6.
#      true 3 touches nothing:                                   U += 2.
#      preds never paired, 5 and 4:                              U += 2 + 1.
#      AJI = 8 / 17.
# PQ: pairs above IoU 0.5: (1,1) and (2,2), both IoU 2/3 -> TP = 2, FP = 4 - 2 = 2, FN = 3 - 2 = 1.
#     DQ = 2 / (2 + 0.5*2 + 0.5*1) = 4/7, SQ = 2/3, PQ = 8/21.
# Detection (IoU >= 0.5): the same 2 pairs -> precision 2/4, recall 2/3, F1 = 2*2 / (3 + 4) = 4/7.
TRUTH = np.array(
    [
        [1, 1, 1, 0, 2, 2],
        [1, 1, 1, 0, 2, 2],
        [0, 0, 0, 0, 0, 0],
        [3, 3, 0, 0, 0, 0],
    ],
    dtype=np.int32,
)
PRED = np.array(
    [
        [1, 1, 5, 0, 2, 2],
        [1, 1, 5, 0, 2, 2],
        [0, 0, 0, 0, 2, 2],
        [0, 0, 0, 0, 0, 4],
    ],
    dtype=np.int32,
)


def test_hand_worked_pixel_scores() -> None:
    s = pixel_scores(TRUTH, PRED)
    assert (s.tp, s.fp, s.fn) == (10, 3, 2)
    assert s.precision == pytest.approx(10 / 13)
    assert s.recall == pytest.approx(10 / 12)
    assert s.f1 == pytest.approx(0.8)
    assert s.jaccard == pytest.approx(10 / 15)


def test_precision_and_recall_are_the_right_way_round() -> None:
    """Over-prediction lowers precision, not recall (the paper's script had them swapped)."""
    truth = np.zeros((10, 10), np.int32)
    truth[2:4, 2:4] = 1
    pred = np.zeros_like(truth)
    pred[1:5, 1:5] = 1
    s = pixel_scores(truth, pred)
    assert s.recall == 1.0
    assert s.precision == pytest.approx(4 / 16)


def test_hand_worked_instance_scores() -> None:
    s = instance_scores(TRUTH, PRED)
    assert s.aji == pytest.approx(8 / 17)
    assert (s.tp, s.fp, s.fn) == (2, 2, 1)
    assert s.dq == pytest.approx(4 / 7)
    assert s.sq == pytest.approx(2 / 3)
    assert s.pq == pytest.approx(8 / 21)
    assert s.det_precision == pytest.approx(2 / 4)
    assert s.det_recall == pytest.approx(2 / 3)
    assert s.det_f1 == pytest.approx(4 / 7)
    assert (s.n_true, s.n_pred) == (3, 4)


def test_scores_do_not_depend_on_id_values() -> None:
    """Relabelling (large, sparse, shuffled ids) changes nothing; covers the np.unique path for huge ids."""
    lut_true = np.array([0, 70_000, 3, 2**31 - 1], dtype=np.int64)
    lut_pred = np.array([0, 12, 2**31 - 1, 0, 9, 70_000], dtype=np.int64)  # ids 1, 2, 4, 5 in use
    a = score_labels(TRUTH, PRED)
    b = score_labels(lut_true[TRUTH], lut_pred[PRED])
    assert a == b


def test_iou_exactly_half_counts_for_detection_but_not_for_pq() -> None:
    # truth: 2 px; prediction: 1 of them -> IoU = 1/2 exactly.
    truth = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 0, 0]])
    s = instance_scores(truth, pred)
    assert s.pq == 0.0 and s.tp == 0
    assert s.det_f1 == 1.0


def test_merged_prediction_aji_by_hand() -> None:
    # Two 2-px truths, one 4-px prediction covering both (a merge):
    #   truth 1 1 2 2      pred 7 7 7 7
    # Both truths pair with pred 1 (IoU 2/4): C = 2 + 2, U = 4 + 4 (the prediction counted for each pair).
    # AJI = 4/8 = 0.5; PQ: no IoU > 0.5 -> 0; pixel F1 = 1.
    truth = np.array([[1, 1, 2, 2]])
    pred = np.array([[7, 7, 7, 7]])
    s = score_labels(truth, pred)
    assert s["aji"] == pytest.approx(0.5)
    assert s["pq"] == 0.0
    assert s["f1"] == 1.0


def test_empty_prediction_scores_zero_not_nan() -> None:
    s = score_labels(TRUTH, np.zeros_like(TRUTH))
    for name in SCORE_NAMES:
        assert not math.isnan(s[name]), name
    assert s["f1"] == s["jaccard"] == s["precision"] == s["recall"] == 0.0
    assert s["aji"] == s["pq"] == s["dq"] == s["det_f1"] == 0.0
    assert s["n_pred"] == 0 and s["n_true"] == 3


def test_empty_truth_with_prediction_scores_zero() -> None:
    s = score_labels(np.zeros_like(PRED), PRED)
    for name in SCORE_NAMES:
        assert s[name] == 0.0, name


def test_both_empty_is_perfect_agreement() -> None:
    z = np.zeros((5, 5), np.int32)
    s = score_labels(z, z)
    for name in SCORE_NAMES:
        assert s[name] == 1.0, name


def test_perfect_prediction_scores_one() -> None:
    s = score_labels(TRUTH, TRUTH)
    for name in SCORE_NAMES:
        assert s[name] == pytest.approx(1.0), name


def _aji_reference(truth: np.ndarray, pred: np.ndarray) -> float:
    """Literal loop over true nuclei, as in the MoNuSeg description (slow, obviously right)."""
    inter_sum = union_sum = 0
    used: set[int] = set()
    for i in np.unique(truth[truth > 0]):
        g = truth == i
        best = None
        for j in np.unique(pred[g & (pred > 0)]):
            s = pred == j
            inter, union = int((g & s).sum()), int((g | s).sum())
            if best is None or inter / union > best[0]:
                best = (inter / union, inter, union, int(j))
        if best is None:
            union_sum += int(g.sum())
        else:
            inter_sum += best[1]
            union_sum += best[2]
            used.add(best[3])
    for j in np.unique(pred[pred > 0]):
        if int(j) not in used:
            union_sum += int((pred == j).sum())
    return inter_sum / union_sum


def _blobs(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(2, 9, size=2)
        labels[r : r + h, c : c + w] = k  # later blobs overwrite: ragged, overlapping shapes
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_aji_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth, pred = _blobs(rng, (40, 40), 25), _blobs(rng, (40, 40), 30)
    assert aji(overlap(truth, pred)) == pytest.approx(_aji_reference(truth, pred))


def test_dense_and_sparse_contingency_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    truth, pred = _blobs(rng, (60, 60), 40), _blobs(rng, (60, 60), 45)
    dense = score_labels(truth, pred)
    monkeypatch.setattr(metrics, "_DENSE_LIMIT", 0)
    assert score_labels(truth, pred) == dense


def test_ignore_mask_drops_outside_pixels_and_nuclei() -> None:
    truth = np.zeros((10, 20), np.int32)
    truth[1:4, 1:4] = 1  # inside the region
    truth[1:4, 14:17] = 2  # outside: nobody annotated there, so the model's miss must not count
    pred = np.zeros_like(truth)
    pred[1:4, 1:4] = 5  # correct
    pred[6:9, 9:13] = 6  # 3 of its 4 columns outside: dropped, not a false alarm
    ignore = np.zeros(truth.shape, bool)
    ignore[:, 10:] = True
    plain, masked = score_labels(truth, pred), score_labels(truth, pred, ignore)
    assert plain["f1"] < 1 and plain["pq"] < 1
    for name in SCORE_NAMES:
        assert masked[name] == pytest.approx(1.0), name
    assert masked["n_true"] == 1 and masked["n_pred"] == 1
    kept = drop_outside(pred, ignore)
    assert set(np.unique(kept)) == {0, 5}


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        score_labels(np.zeros((3, 3), np.int32), np.zeros((3, 4), np.int32))


def test_1000px_with_1800_nuclei_scores_well_under_a_second() -> None:
    truth = np.zeros((1000, 1000), np.int32)
    k = 0
    for r in range(0, 989, 23):
        for c in range(0, 989, 23):
            if k == 1800:
                break
            k += 1
            truth[r : r + 18, c : c + 18] = k
    pred = np.roll(truth, 1, axis=1)  # every nucleus 1 px to the right: IoU = 17/19
    start = time.perf_counter()
    s = score_labels(truth, pred)
    elapsed = time.perf_counter() - start
    assert s["n_true"] == s["n_pred"] == 1800
    assert s["sq"] == pytest.approx(17 / 19)
    assert s["aji"] == pytest.approx(17 / 19)
    assert s["det_f1"] == 1.0
    assert elapsed < 0.5, f"scoring took {elapsed:.2f} s"
