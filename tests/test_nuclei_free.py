"""Issue 20: the shipped model must not invent nuclei in nuclei-free fields (fat, loose stroma).

The fields are eosin only (slides.nuclei_free): every nucleus found is false.
With the 1.x colour transform (spread stretched up to ×2 and the mean pulled all
the way to the training average) the same weights invented ≈ 3600 nuclei/mm² on
such stroma (bench_colour.py); the card's clamped transform must find almost none.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dannucnet.engine import Predictor
from dannucnet.engine.colour import colour_transform, lab_stats
from dannucnet.pipeline import SegmentOptions, segment_region
from dannucnet.slides.nuclei_free import make_fat_like, make_stroma_like

SIZE = 256  # 64 µm square at 0.25 µm/px: parts of a few adipocytes, about ten fibres


def _count(predictor: Predictor, rgb: np.ndarray) -> int:
    return len(segment_region(predictor, rgb, mpp=0.25, options=SegmentOptions()).nuclei)


@pytest.mark.parametrize("make", [make_fat_like, make_stroma_like])
def test_shipped_model_finds_no_nuclei_in_eosin_only_fields(shipped, make):
    counts = [_count(shipped, make(SIZE, seed)) for seed in range(2)]
    assert sum(counts) <= 1, counts


def test_the_old_unclamped_transform_invents_nuclei_on_the_same_stroma(shipped):
    """Pins the failure: the test above can fail, and does with the 1.x transform."""
    card_colour = shipped.colour
    assert card_colour is not None
    try:
        shipped.colour = dataclasses.replace(card_colour, max_scale=2.0, max_shift=None, min_dark_share=0.0)
        assert sum(_count(shipped, make_stroma_like(SIZE, seed)) for seed in range(2)) >= 5
    finally:
        shipped.colour = card_colour


def test_the_card_clamps_the_spread_of_a_faint_field(shipped):
    mean, std, _ = lab_stats(make_stroma_like(SIZE, 0))
    scale, _ = colour_transform(mean, std, shipped.colour)
    assert np.all(scale <= shipped.colour.max_scale) and shipped.colour.max_scale <= 1.25

