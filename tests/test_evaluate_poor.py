"""Issue 20's metric in ``evaluate``: pixel precision on the nuclei-poor crops, each segmented alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dannucnet.evaluate.poor import PoorScore, crop_side, poor_crops_of, poor_line, score_poor_crops
from dannucnet.evaluate.runner import evaluate_model
from dannucnet.formats.dataset import DatasetWriter, load_dataset
from dannucnet.pipeline import SegmentOptions
from dannucnet.slides.nuclei_free import make_stroma_like
from dannucnet.slides.synthetic import make_synthetic_he


def _dense_left(rows: int, cols: int) -> np.ndarray:
    """Labels: 8 px discs every 20 px in the left 256 columns (about 40 % nucleus), nothing right of them."""
    labels = np.zeros((rows, cols), np.int32)
    yy, xx = np.mgrid[0:rows, 0:cols]
    n = 0
    for cy in range(10, rows, 20):
        for cx in range(10, 256, 20):
            n += 1
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = n
    return labels


def test_the_poor_crops_are_the_sparse_64_um_squares_not_half_ignored():
    labels = _dense_left(512, 512)
    region = np.ones(labels.shape, bool)
    region[384:, 256:] = False  # a vague area: the bottom-right square is half of it
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    assert crop_side(0.25) == 256 and crop_side(0.5) == 128
    keys = [c.key for c in poor_crops_of(rgb, labels, region, 0.25, "im")]
    assert keys == ["im@256,0", "im@256,128"]  # x 0 and 128 hold the dense half; y 256 is half vague
    assert [c.key for c in poor_crops_of(rgb, labels, None, 0.25, "im")] == ["im@256,0", "im@256,128", "im@256,256"]
    # at 0.5 µm/px the same 64 µm square is 128 px
    assert all(c.truth.shape == (128, 128) for c in poor_crops_of(rgb, labels, None, 0.5, "im"))
    assert list(poor_crops_of(rgb, labels, None, 0.25, "im", share=0.0)) == []


def test_the_pooled_precision_counts_only_annotated_region_pixels():
    truth = np.zeros((256, 256), np.int32)
    truth[10:20, 10:20] = 1
    counted = np.ones_like(truth, bool)
    counted[:, 250:] = False  # 2 % vague: the crop is kept
    crop = poor_crops_of(np.zeros((256, 256, 3), np.uint8), truth, counted, 0.25, "im")
    (c,) = list(crop)
    predicted = np.zeros_like(truth)
    predicted[10:20, 10:20] = 1  # 100 true pixels
    predicted[100:110, 100:105] = 2  # 50 false pixels
    predicted[100:200, 250:256] = 3  # in the vague area: not counted
    score = PoorScore()
    score.add(c, predicted, found=3)
    assert (score.true_pixels, score.false_pixels) == (100, 50)
    assert score.precision == pytest.approx(100 / 150)
    d = score.to_dict()
    area = 256 * 250 * (0.25e-3) ** 2
    assert d["found_per_mm2"] == pytest.approx(3 / area) and d["annotated_per_mm2"] == pytest.approx(1 / area)
    assert "pixel precision 0.667" in poor_line(d)
    assert PoorScore().precision == 1.0  # nothing called: nothing invented
    assert "none in this split" in poor_line(PoorScore().to_dict())


@pytest.fixture(scope="module")
def half_stroma(tmp_path_factory) -> list:
    """One 256 x 768 image: dense synthetic H&E on the left 256 columns, eosin-only stroma on the rest."""
    he = make_synthetic_he(256, 256, seed=3, density=6000.0)
    rgb = np.concatenate([he.rgb, make_stroma_like(512, seed=1)[:256]], axis=1)
    labels = np.concatenate([he.labels, np.zeros((256, 512), he.labels.dtype)], axis=1)
    root = tmp_path_factory.mktemp("poor") / "set"
    writer = DatasetWriter(root)
    writer.add("half", rgb, labels, organ="Synthetic")
    writer.close(mpp=0.25, splits={"all": ["half"]})
    return load_dataset(root).select("all")


def test_evaluate_scores_the_stroma_crops_and_sees_invented_nuclei(shipped, half_stroma):
    """The shipped model leaves the stroma crops nearly empty; the 1.x colour transform invents nuclei on
    them (test_nuclei_free), and the metric shows it: the precision can fail."""
    result = evaluate_model(shipped, half_stroma)
    poor = result.nuclei_poor
    assert poor is not None and poor["crops"] >= 3  # x = 256, 384, 512: all stroma (x = 128 is sparse too)
    assert poor["found_per_mm2"] <= poor["annotated_per_mm2"] + 100 and poor["pixel_precision"] >= 0.9
    card_colour = shipped.colour
    try:
        shipped.colour = dataclasses.replace(card_colour, max_scale=2.0, max_shift=None, min_dark_share=0.0)
        old = evaluate_model(shipped, half_stroma).nuclei_poor
    finally:
        shipped.colour = card_colour
    assert old["false_pixels"] > poor["false_pixels"] + 1000 and old["found_per_mm2"] > 2 * poor["found_per_mm2"]
    assert old["pixel_precision"] < 0.5  # measured 0.19 against the card's 0.9997
    # scored alone, the same crops give the same pooled numbers as inside evaluate
    sample = half_stroma[0]
    crops = poor_crops_of(sample.load_image(), sample.load_labels(), None, 0.25, sample.stem)
    again = score_poor_crops(shipped, crops, SegmentOptions(threshold=shipped.card.threshold)).to_dict()
    assert again == poor
    assert evaluate_model(shipped, half_stroma, poor_share=None).nuclei_poor is None
