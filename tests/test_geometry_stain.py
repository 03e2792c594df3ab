"""Colour deconvolution: lossless round trip, sensible stain separation."""

from __future__ import annotations

import numpy as np
import pytest

from dannucnet.errors import InputError
from dannucnet.geometry.stain import (
    hed_to_rgb,
    hematoxylin_od,
    od_to_rgb,
    rgb_to_hed,
    rgb_to_od,
    stain_matrix,
)


def test_od_round_trip_is_exact_for_all_grey_levels() -> None:
    levels = np.arange(256, dtype=np.uint8)
    rgb = np.stack([levels, levels[::-1], levels], axis=-1)
    od = rgb_to_od(rgb)
    assert od.dtype == np.float32 and od[255, 0] == 0.0 and od[0, 0] == pytest.approx(np.log10(256))
    assert np.array_equal(od_to_rgb(od), rgb)


def test_hed_round_trip_random_image() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    conc = rgb_to_hed(rgb)
    assert conc.shape == (64, 48, 3) and conc.dtype == np.float32
    back = hed_to_rgb(conc)
    assert back.dtype == np.uint8
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 1


def test_stains_separate_and_jitter_changes_colour() -> None:
    pure_h = od_to_rgb(np.float32(0.8) * stain_matrix()[0].astype(np.float32))[None, None]
    pure_e = od_to_rgb(np.float32(0.8) * stain_matrix()[1].astype(np.float32))[None, None]
    h, e = rgb_to_hed(pure_h)[0, 0], rgb_to_hed(pure_e)[0, 0]
    assert h[0] == pytest.approx(0.8, abs=0.01) and abs(h[1]) < 0.01
    assert e[1] == pytest.approx(0.8, abs=0.01) and abs(e[0]) < 0.01
    assert hematoxylin_od(pure_h)[0, 0] == pytest.approx(h[0])
    assert hematoxylin_od(np.full((2, 2, 3), 255, np.uint8)).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    # scaling the H amount (training's stain jitter) darkens the nucleus colour
    conc = rgb_to_hed(pure_h)
    conc[..., 0] *= 1.5
    assert (hed_to_rgb(conc).astype(int) < pure_h.astype(int)).any()


def test_bad_inputs() -> None:
    with pytest.raises(InputError):
        rgb_to_hed(np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError):
        stain_matrix(np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    with pytest.raises(InputError):
        hed_to_rgb(np.zeros((2, 2), np.float32))
