"""Segmentation scores: the paper's pixel metrics and the instance metrics users feel.

Pixel F1 (Dice) and Jaccard are what the DAN-NucNet paper reports, but they
cannot see two touching nuclei merged into one object; a QuPath user can. So
every image is also scored with AJI (Kumar et al. 2017), panoptic quality
(Kirillov et al. 2019; PQ = DQ x SQ, pairs at IoU > 0.5) and detection F1 at
IoU >= 0.5.

Everything comes from one contingency table of (true id, predicted id) pixel
counts, built with ``np.bincount`` on paired ids, so a 1000 x 1000 image with
~1,800 nuclei per side scores in a few tens of milliseconds.

Degenerate cases are defined, never NaN: an empty prediction against nuclei
scores 0 everywhere, and an empty prediction against an empty truth scores 1
(nothing to find, nothing wrongly found). The paper's script drops F1 = 0
images from its averages; keeping every image defined is what lets us not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# A dense contingency table above this many cells (int64) falls back to np.unique
# on the overlapping pixels only: 5e7 cells = 400 MB would be too much memory.
_DENSE_LIMIT = 20_000_000

# A nucleus counts as outside the annotated region when less than this share of its pixels is inside.
REGION_INSIDE_SHARE = 0.5


@dataclass(frozen=True)
class PixelScores:
    """Foreground-vs-background agreement; precision = TP / predicted, recall = TP / true."""

    precision: float
    recall: float
    f1: float
    jaccard: float
    tp: int
    fp: int
    fn: int


@dataclass(frozen=True)
class InstanceScores:
    """Object-level agreement between two instance label maps."""

    aji: float
    pq: float
    dq: float
    sq: float
    det_precision: float
    det_recall: float
    det_f1: float
    n_true: int
    n_pred: int
    tp: int  # pairs at IoU > 0.5 (the PQ matches)
    fp: int
    fn: int


@dataclass(frozen=True)
class Overlap:
    """Sparse contingency table of two label maps.

    Ids are compacted to 1..n (0 = background); ``true_area[i]`` is the area of
    compact true id i+1, ``inter[k]`` the pixels shared by ``pair_true[k]`` and
    ``pair_pred[k]`` (compact ids counted from 0).
    """

    true_area: np.ndarray
    pred_area: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    inter: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.true_area[self.pair_true] + self.pred_area[self.pair_pred] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / np.maximum(self.union, 1)


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num) / float(den) if den > 0 else empty


def pixel_scores(truth: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> PixelScores:
    """Score foreground masks (any non-zero value is foreground).

    ``ignore`` marks pixels to leave out (outside the annotated region).
    Zero denominators follow one rule: a ratio is 1 when nothing could go
    wrong (e.g. no truth and no prediction) and 0 otherwise.
    """
    t = np.asarray(truth) != 0
    p = np.asarray(pred) != 0
    _check_shapes(t, p, ignore)
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        t, p = t[keep], p[keep]
    tp = int(np.count_nonzero(t & p))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    perfect = 1.0 if fp == 0 and fn == 0 else 0.0
    return PixelScores(
        precision=_ratio(tp, tp + fp, perfect),
        recall=_ratio(tp, tp + fn, perfect),
        f1=_ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        jaccard=_ratio(tp, tp + fp + fn, 1.0),
        tp=tp,
        fp=fp,
        fn=fn,
    )


def _check_shapes(a: np.ndarray, b: np.ndarray, ignore: np.ndarray | None) -> None:
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    if ignore is not None and np.shape(ignore) != a.shape:
        raise ValueError(f"ignore mask {np.shape(ignore)} differs from the label maps {a.shape}")


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber ids to 1..n in increasing order of the original id (0 stays 0).

    A lookup table through ``bincount`` is used when ids are small (the usual
    case), ``np.unique`` otherwise; either way the order of ids is kept, which
    makes ties in matching break towards the lower original id.
    """
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return flat.astype(np.int64), 0
    if flat.min() < 0:
        raise ValueError("instance labels must be non-negative")
    top = int(flat.max())
    if top < 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64) * present
        return lut[flat], int(present.sum())
    ids, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.astype(np.int64).ravel()
    if ids[0] != 0:
        inverse += 1
    return inverse, int(np.count_nonzero(ids))


def overlap(truth: np.ndarray, pred: np.ndarray) -> Overlap:
    """Contingency table of two instance label maps of equal shape."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    _check_shapes(truth, pred, None)
    t, nt = compact_labels(truth)
    p, npred = compact_labels(pred)
    width = npred + 1
    cells = (nt + 1) * width
    if cells <= _DENSE_LIMIT:
        table = np.bincount(t * width + p, minlength=cells).reshape(nt + 1, width)
        true_area = table[1:].sum(axis=1)
        pred_area = table[:, 1:].sum(axis=0)
        rows, cols = np.nonzero(table[1:, 1:])
        inter = table[1:, 1:][rows, cols]
    else:
        true_area = np.bincount(t, minlength=nt + 1)[1:]
        pred_area = np.bincount(p, minlength=width)[1:]
        both = (t > 0) & (p > 0)
        codes, inter = np.unique(t[both] * width + p[both], return_counts=True)
        rows, cols = codes // width - 1, codes % width - 1
    return Overlap(
        true_area=true_area.astype(np.int64),
        pred_area=pred_area.astype(np.int64),
        pair_true=rows.astype(np.int64),
        pair_pred=cols.astype(np.int64),
        inter=inter.astype(np.int64),
    )


def drop_outside(labels: np.ndarray, ignore: np.ndarray, share: float = REGION_INSIDE_SHARE) -> np.ndarray:
    """Remove nuclei that lie mostly in ignored pixels (outside the annotated region).

    Such a nucleus can be neither a miss (nobody annotated it) nor a false
    alarm (it might be real); kept nuclei stay whole so their IoU is fair.
    """
    labels = np.asarray(labels)
    compact, n = compact_labels(labels)
    if n == 0:
        return labels
    inside = np.bincount(compact[~np.asarray(ignore, dtype=bool).ravel()], minlength=n + 1)
    area = np.bincount(compact, minlength=n + 1)
    keep = inside >= share * np.maximum(area, 1)
    keep[0] = False
    return np.where(keep[compact], labels.ravel(), 0).reshape(labels.shape)


def aji(ov: Overlap) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017).

    Each true nucleus is paired with the prediction of highest IoU with it
    (a prediction may serve several); the pair adds its intersection to C and
    its union to U. A true nucleus that no prediction touches adds its own area
    to U (the reading of the MoNuSeg and HoVer-Net code; Kumar's pseudo-code
    would pair it with an arbitrary non-touching prediction). Every prediction
    never paired adds its area to U. AJI = C / U.
    """
    nt, npred = ov.true_area.size, ov.pred_area.size
    if nt == 0 and npred == 0:
        return 1.0
    inter_sum = 0
    union_sum = int(ov.true_area.sum())
    used = np.zeros(npred, dtype=bool)
    if ov.inter.size:
        iou = ov.iou
        # Best pair per true nucleus: sort by true id, then IoU descending, then pred id.
        order = np.lexsort((ov.pair_pred, -iou, ov.pair_true))
        first = order[np.r_[True, np.diff(ov.pair_true[order]) != 0]]
        inter_sum = int(ov.inter[first].sum())
        # Paired true nuclei count their pair's union instead of their own area.
        union_sum += int((ov.union[first] - ov.true_area[ov.pair_true[first]]).sum())
        used[ov.pair_pred[first]] = True
    union_sum += int(ov.pred_area[~used].sum())
    return _ratio(inter_sum, union_sum, 1.0)


def _matches(ov: Overlap, min_iou: float, strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs with IoU above ``min_iou`` (greedy by IoU, then lower ids).

    For IoU > 0.5 a pair is unique by construction (each nucleus has at most
    one partner above one half); for IoU >= 0.5 exact ties could give two, so
    the greedy pass keeps the matching one-to-one.
    """
    iou = ov.iou
    ok = iou > min_iou if strict else iou >= min_iou
    idx = np.nonzero(ok)[0]
    if idx.size == 0:
        return idx, idx
    idx = idx[np.lexsort((ov.pair_pred[idx], ov.pair_true[idx], -iou[idx]))]
    t_seen: set[int] = set()
    p_seen: set[int] = set()
    keep = []
    for k in idx.tolist():
        ti, pj = int(ov.pair_true[k]), int(ov.pair_pred[k])
        if ti in t_seen or pj in p_seen:
            continue
        t_seen.add(ti)
        p_seen.add(pj)
        keep.append(k)
    keep_arr = np.asarray(keep, dtype=np.int64)
    return keep_arr, iou[keep_arr]


def instance_scores(truth: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> InstanceScores:
    """AJI, PQ (= DQ x SQ, pairs at IoU > 0.5) and detection F1 (pairs at IoU >= 0.5).

    With ``ignore``, nuclei of either side lying mostly in ignored pixels are
    dropped first (see :func:`drop_outside`).
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    _check_shapes(truth, pred, ignore)
    if ignore is not None:
        truth, pred = drop_outside(truth, ignore), drop_outside(pred, ignore)
    ov = overlap(truth, pred)
    nt, npred = int(ov.true_area.size), int(ov.pred_area.size)

    pq_pairs, pq_iou = _matches(ov, 0.5, strict=True)
    tp = int(pq_pairs.size)
    fp, fn = npred - tp, nt - tp
    nothing = nt == 0 and npred == 0
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, 1.0)
    sq = float(pq_iou.mean()) if tp else (1.0 if nothing else 0.0)

    det_pairs, _ = _matches(ov, 0.5, strict=False)
    dtp = int(det_pairs.size)
    return InstanceScores(
        aji=aji(ov),
        pq=dq * sq,
        dq=dq,
        sq=sq,
        det_precision=_ratio(dtp, npred, 1.0 if nt == 0 else 0.0),
        det_recall=_ratio(dtp, nt, 1.0 if npred == 0 else 0.0),
        det_f1=_ratio(2 * dtp, nt + npred, 1.0),
        n_true=nt,
        n_pred=npred,
        tp=tp,
        fp=fp,
        fn=fn,
    )


# Names of the per-image scores that are averaged (the rest are counts).
SCORE_NAMES = (
    "f1",
    "jaccard",
    "precision",
    "recall",
    "aji",
    "pq",
    "dq",
    "sq",
    "det_f1",
    "det_precision",
    "det_recall",
)


def score_labels(truth: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, float]:
    """All scores of one image as a flat JSON-ready dict (pixel + instance).

    ``truth`` and ``pred`` are instance label maps; the pixel metrics use
    their foreground. With ``ignore``, nuclei lying mostly in ignored pixels
    are dropped from both maps first, then ignored pixels are left out of the
    pixel metrics: the rim of an unannotated nucleus that pokes into the
    region is neither a false alarm nor a miss. Counts are prefixed so they
    never clash with scores.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    _check_shapes(truth, pred, ignore)
    if ignore is not None:
        truth, pred = drop_outside(truth, ignore), drop_outside(pred, ignore)
    px = pixel_scores(truth, pred, ignore)
    inst = instance_scores(truth, pred)
    out: dict[str, float] = {
        "f1": px.f1,
        "jaccard": px.jaccard,
        "precision": px.precision,
        "recall": px.recall,
    }
    d = asdict(inst)
    out.update({k: float(d[k]) for k in ("aji", "pq", "dq", "sq", "det_f1", "det_precision", "det_recall")})
    out.update(
        {
            "pixel_tp": px.tp,
            "pixel_fp": px.fp,
            "pixel_fn": px.fn,
            "n_true": inst.n_true,
            "n_pred": inst.n_pred,
            "match_tp": inst.tp,
            "match_fp": inst.fp,
            "match_fn": inst.fn,
        }
    )
    return out
