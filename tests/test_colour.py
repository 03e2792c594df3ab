"""Colour normalisation: statistics onto the reference, brightness invariance, glass untouched, same in every path."""

from __future__ import annotations

import numpy as np
import pytest

from dannucnet.engine.colour import ColourReference, lab_stats, normalise_colour, reference_from
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
