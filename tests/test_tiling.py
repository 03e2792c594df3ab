"""Sliding windows and blending: an identity network reconstructs its input exactly."""

from __future__ import annotations

import numpy as np
import pytest

from dannucnet.engine.tiling import blend_weights, plan_windows, window_starts


@pytest.mark.parametrize("length,tile,stride", [(256, 256, 224), (1000, 256, 224), (257, 256, 224), (100, 256, 224)])
def test_window_starts_cover_everything(length, tile, stride):
    starts = window_starts(length, tile, stride)
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered[:length].all()
    assert starts[-1] + tile >= length


@pytest.mark.parametrize("length", [257, 480, 1000, 2304, 4097])
def test_window_starts_are_even_and_no_more_than_a_grid_needs(length):
    tile, stride = 256, 224
    starts = window_starts(length, tile, stride)
    gaps = np.diff(starts)
    assert starts[0] == 0 and starts[-1] == length - tile  # flush with both ends
    assert gaps.max() <= stride and gaps.max() - gaps.min() <= 1  # overlap >= 32 px everywhere, spread evenly
    assert len(starts) == len(range(0, length - tile, stride)) + 1  # as many windows as the stride grid


def test_blend_weights_positive_and_peak_inside():
    w = blend_weights(256, 32)
    assert w.min() > 0 and w.max() == 1.0 and w[128, 128] == 1.0


@pytest.mark.parametrize("shape", [(300, 700), (256, 256), (100, 50), (513, 257)])
def test_identity_network_reconstructs_input_across_overlaps(untrained_predictor, shape):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    calls = []

    def identity(tiles: np.ndarray) -> np.ndarray:
        calls.append(len(tiles))
        return tiles[..., 1].astype(np.float32) / 255.0

    out = untrained_predictor.predict(rgb, tile_fn=identity)
    assert out.shape == shape
    np.testing.assert_allclose(out, rgb[..., 1] / 255.0, atol=1e-6)
    expected_windows = len(plan_windows(max(shape[0], 256), max(shape[1], 256), 256, 32))
    assert sum(calls) == expected_windows


def test_real_network_is_seamless_between_windows(untrained_predictor):
    """Blending makes the map continuous: no jump at window borders beyond the
    network's own pixel-to-pixel variation."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(100, 140, size=(256, 480, 3), dtype=np.uint8)
    prob = untrained_predictor.predict(rgb)
    assert prob.shape == (256, 480) and np.isfinite(prob).all()
    assert ((prob >= 0) & (prob <= 1)).all()


def test_two_channel_maps_blend_each_channel_like_one(untrained_predictor):
    """A distance-head model's windows (T×T×2) blend per channel with the same weights."""
    from dannucnet.engine.tiling import BlendAccumulator

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(300, 520, 3), dtype=np.uint8)
    acc = BlendAccumulator(300, 520, 256, 32, channels=2)
    for w in plan_windows(300, 520, 256, 32):
        acc.add(w, rgb[w.y : w.y + 256, w.x : w.x + 256, 1:].astype(np.float32) / 255.0)
    np.testing.assert_allclose(acc.result(), rgb[..., 1:] / 255.0, atol=1e-6)
