"""Colour normalisation: statistics onto the reference, brightness invariance, glass untouched, same in every path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dannucnet.engine.colour import (
    ColourReference,
    colour_transform,
    dark_share,
    lab_stats,
    normalise_colour,
    reference_from,
)
from dannucnet.slides.synthetic import make_synthetic_he


@pytest.fixture(scope="module")
def he():
    return make_synthetic_he(320, 320, seed=4, tissue_fraction=1.0).rgb


def test_reference_round_trip_and_validation():
    ref = ColourReference(mean=(140.0, 150.0, 118.0), std=(40.0, 8.0, 7.0))
    assert ColourReference.from_dict(ref.to_dict()) == ref
    assert ColourReference.from_dict(None) is None
    with pytest.raises(ValueError, match="unknown"):
        ColourReference.from_dict({"method": "macenko", "mean": [1, 2, 3], "std": [1, 1, 1]})
    with pytest.raises(ValueError, match="positive"):
        ColourReference.from_dict({"method": "reinhard-lab", "mean": [1, 2, 3], "std": [1, 0, 1]})
    avg = reference_from([(np.array([100.0, 150, 120]), np.array([30.0, 8, 6])),
                          (np.array([140.0, 154, 116]), np.array([50.0, 10, 8]))])
    assert avg.mean == (120.0, 152.0, 118.0) and avg.std == (40.0, 9.0, 7.0)


def test_statistics_land_on_the_reference(he):
    m, s, share = lab_stats(he)
    assert share > 0.5
    ref = ColourReference(mean=tuple(m * [0.8, 1.0, 1.02]), std=tuple(s * 1.2))
    out = normalise_colour(he, ref)
    m2, s2, _ = lab_stats(out)
    assert np.allclose(m2, ref.mean, atol=2.0) and np.allclose(s2, ref.std, rtol=0.1)


def test_darker_and_paler_copies_look_alike_after_normalising(he):
    m, s, _ = lab_stats(he)
    ref = ColourReference(mean=tuple(m), std=tuple(s))
    dark = (he.astype(np.float32) * 0.65).astype(np.uint8)
    pale = np.clip(he.astype(np.float32) * 0.7 + 60, 0, 255).astype(np.uint8)
    for shifted in (dark, pale):
        before = np.abs(shifted.astype(int) - he).mean()
        after = np.abs(normalise_colour(shifted, ref).astype(int) - he).mean()
        assert after < before / 3, (before, after)


def test_glass_and_empty_images_pass_unchanged(he):
    ref = ColourReference(mean=(120.0, 150.0, 118.0), std=(30.0, 8.0, 7.0))
    glass = np.full((64, 64, 3), 240, np.uint8)
    assert np.array_equal(normalise_colour(glass, ref), glass)  # no tissue: nothing to measure
    half = he.copy()
    half[:, :160] = 245
    out = normalise_colour(half, ref)
    assert np.array_equal(out[:, :160], half[:, :160]) and not np.array_equal(out[:, 160:], half[:, 160:])
    assert normalise_colour(he, None) is he


def test_predictor_refuses_a_broken_reference(untrained_predictor):
    from dataclasses import replace

    from dannucnet.engine import Predictor
    from dannucnet.errors import ModelError
    from dannucnet.model.weights import LoadedModel

    card = replace(untrained_predictor.card, colour_reference={"method": "reinhard-lab", "mean": [1, 2]})
    with pytest.raises(ModelError, match="colour_reference"):
        Predictor(LoadedModel(untrained_predictor.model.network, card, "test"), device="cpu")


def test_clamps_round_trip_and_are_validated():
    ref = ColourReference(mean=(140.0, 150.0, 118.0), std=(40.0, 8.0, 7.0), max_scale=1.25, max_shift=10.0,
                          min_dark_share=0.05)
    assert ColourReference.from_dict(ref.to_dict()) == ref
    old = ColourReference.from_dict({"method": "reinhard-lab", "mean": [1, 2, 3], "std": [1, 1, 1]})
    assert (old.max_scale, old.max_shift, old.min_dark_share) == (2.0, None, 0.0)  # 1.x cards read as before
    for bad in ({"max_scale": 0.5}, {"max_shift": -1}, {"min_dark_share": 1.0}):
        with pytest.raises(ValueError, match="max_scale"):
            ColourReference.from_dict({"method": "reinhard-lab", "mean": [1, 2, 3], "std": [1, 1, 1], **bad})


@settings(max_examples=60, deadline=None)
@given(
    mean=st.tuples(*[st.floats(0, 255)] * 3),
    std=st.tuples(*[st.floats(0.01, 80)] * 3),
    max_scale=st.floats(1.0, 4.0),
    max_shift=st.one_of(st.none(), st.floats(0, 60)),
)
def test_transform_never_leaves_its_clamp(mean, std, max_scale, max_shift):
    ref = ColourReference(mean=(139.0, 159.3, 116.2), std=(37.9, 7.0, 7.2), max_scale=max_scale, max_shift=max_shift)
    scale, shift = colour_transform(np.array(mean), np.array(std), ref)
    assert np.all(scale <= max_scale * (1 + 1e-9)) and np.all(scale >= 1 / max_scale * (1 - 1e-9))
    moved = np.array(mean) * scale + shift - np.array(mean)  # where the chunk's mean goes
    if max_shift is not None:
        assert np.all(np.abs(moved) <= max_shift + 1e-6)


def test_a_faint_chunk_is_stretched_no_further_than_the_clamp(he):
    """A nearly flat pink chunk (tiny a*/b* spread) would be scaled ×5 by plain Reinhard; the clamp holds it."""
    pink = np.zeros((64, 64, 3), np.uint8) + np.array([236, 200, 214], np.uint8)
    pink[::2] += np.array([0, 3, 2], np.uint8)  # a faint texture: spread ≈ 1 unit
    ref = ColourReference(mean=(139.0, 159.3, 116.2), std=(37.9, 7.0, 7.2), max_scale=1.25, max_shift=10.0)
    m0, s0, _ = lab_stats(pink)
    m1, s1, _ = lab_stats(normalise_colour(pink, ref))
    assert np.all(s1 <= s0 * 1.25 + 0.75)  # + rounding to 8 bits
    assert np.all(np.abs(m1 - m0) <= 10.0 + 0.75)


def test_a_chunk_without_dark_pixels_passes_unchanged(he):
    ref = ColourReference(mean=(139.0, 159.3, 116.2), std=(37.9, 7.0, 7.2), min_dark_share=0.05)
    pink = np.zeros((64, 64, 3), np.uint8) + np.array([225, 170, 200], np.uint8)
    assert dark_share(pink, ref) == 0.0
    assert np.array_equal(normalise_colour(pink, ref), pink)
    assert dark_share(he, ref) > 0.05 and not np.array_equal(normalise_colour(he, ref), he)
