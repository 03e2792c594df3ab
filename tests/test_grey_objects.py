"""Issue 20: objects too grey to be stained nuclei are dropped, by the rule in the model card, on every runner."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dannucnet.errors import ModelError
from dannucnet.geometry.grey_objects import GreyRule, drop_grey, object_colours
from dannucnet.model.card import ModelCard
from dannucnet.pipeline import SegmentOptions, segment_region
from dannucnet.slides.synthetic import make_synthetic_he

RULE = GreyRule(max_chroma=14.0, min_lightness=15.7)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Four 20 px squares on a pale pink ground: purple (a nucleus), mid grey (pigment on glass), black, brown."""
    rgb = np.full((60, 120, 3), (235, 200, 215), np.uint8)
    labels = np.zeros((60, 120), np.int32)
    for i, colour in enumerate([(110, 60, 150), (120, 120, 125), (20, 20, 22), (120, 80, 40)], start=1):
        x = 10 + 28 * (i - 1)
        rgb[20:40, x:x + 20] = colour
        labels[20:40, x:x + 20] = i
    return rgb, labels


def test_grey_objects_go_and_the_others_keep_their_ids():
    rgb, labels = _scene()
    chroma, lightness = object_colours(labels, rgb)
    assert chroma[1] > 40 and chroma[2] < 5 and chroma[3] < 5 and chroma[4] > 30  # purple, grey, black, brown
    assert lightness[3] < 15.7 < lightness[2]
    out = drop_grey(labels, rgb, RULE)
    assert set(np.unique(out)) == {0, 1, 3, 4}  # the grey square goes; black is as dark as a dense nucleus: kept
    assert np.array_equal(out[labels != 2], labels[labels != 2]) and not out[labels == 2].any()
    assert drop_grey(labels, rgb, None) is labels
    with pytest.raises(ValueError, match="differ in size"):
        drop_grey(labels, rgb[:30], RULE)


def test_the_card_holds_the_rule_and_refuses_a_bad_one(tmp_path):
    from dannucnet.model.registry import resolve_model_dir

    shipped = ModelCard.load(resolve_model_dir("dannucnet-monuseg"))
    assert GreyRule.from_card(shipped.grey_objects) == RULE
    for bad in ({"max_chroma": 14}, {"max_chroma": -1, "min_lightness": 10}, {"max_chroma": "14", "min_lightness": 10},
                [14, 15.7]):
        (tmp_path / "model_card.json").write_text(json.dumps({"name": "m", "version": "1", "grey_objects": bad}))
        with pytest.raises(ModelError, match="grey_objects"):
            ModelCard.load(tmp_path)
    (tmp_path / "model_card.json").write_text(json.dumps({"name": "m", "version": "1", "grey_objects": None}))
    assert ModelCard.load(tmp_path).grey_objects is None


def test_segment_region_and_the_slide_runner_apply_the_cards_rule(shipped, tmp_path):
    """A rule that calls every object grey leaves nothing; none keeps them all: the card decides on each runner."""
    from dannucnet.pipeline import segment_slide
    from dannucnet.slides import open_image
    from dannucnet.slides.synthetic import write_synthetic_slide

    rgb = make_synthetic_he(256, 256, seed=5, density=4000.0).rgb
    slide_path = tmp_path / "s.tif"
    write_synthetic_slide(slide_path, (256, 256), seed=5, mpp=0.25)
    card = shipped.card
    counts = {}
    try:
        for name, rule in (("none", None), ("all", {"max_chroma": 150.0, "min_lightness": 0.0})):
            shipped.model.card = dataclasses.replace(card, grey_objects=rule)
            region = len(segment_region(shipped, rgb, mpp=0.25, options=SegmentOptions()).nuclei)
            with open_image(slide_path) as source:
                slide = sum(len(batch) for batch in segment_slide(shipped, source, options=SegmentOptions()))
            counts[name] = (region, slide)
    finally:
        shipped.model.card = card
    assert min(counts["none"]) >= 4 and counts["all"] == (0, 0), counts  # measured (13, 5) without a rule
