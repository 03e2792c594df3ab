"""Sliding windows and blending: an identity network reconstructs its input exactly."""

from __future__ import annotations

import numpy as np
import pytest

from dannucnet.engine.tiling import GlassMap, blend_weights, cheapest_window, plan_windows, window_starts


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


@pytest.mark.parametrize("side, expected", [
    (1000, 256),   # 5 × 5 windows of 256 (1.64 M network px) against 3 × 3 of 512 (2.36 M)
    (2432, 512),   # a slide chunk's read cut to fill 512² windows: 5 × 5 of 512 against 11 × 11 of 256
    (200, 256),    # smaller than either: one padded window, the small one
    (288, 512),    # 2 × 2 of 256 or one of 512: the same pixels, the larger window wins the tie
])
def test_cheapest_window_runs_the_fewest_network_pixels(side, expected):
    assert cheapest_window(side, side, (512, 256), 32) == expected
    assert cheapest_window(side, side, (256, 512), 32) == expected  # the order given does not matter
    cost = {t: len(plan_windows(max(side, t), max(side, t), t, 32)) * t * t for t in (256, 512)}
    assert cost[expected] == min(cost.values())


def test_windows_of_glass_do_not_count_towards_the_cheapest_side():
    """992² = two 512² windows a side (1.05 M network px) or five 256² (1.64 M); with tissue in one corner
    only, one 256² window (65 k) beats one 512² (262 k); with none, nothing runs and the larger side wins."""
    rgb = np.full((992, 992, 3), 240, np.uint8)
    assert cheapest_window(992, 992, (512, 256), 32, GlassMap(rgb)) == 512
    rgb[:100, :100] = (150, 60, 140)
    assert cheapest_window(992, 992, (512, 256), 32) == 512
    assert cheapest_window(992, 992, (512, 256), 32, GlassMap(rgb)) == 256
    rgb[400:600, 400:600] = (150, 60, 140)  # the middle too: four 512² windows (1.05 M), 1 + 9 of 256² (655 k)
    assert cheapest_window(992, 992, (512, 256), 32, GlassMap(rgb)) == 256


def test_glass_is_looked_at_only_inside_the_image_of_a_padded_window():
    rgb = np.full((100, 700, 3), 240, np.uint8)  # shorter than a window: padded to 256 rows
    windows = plan_windows(256, 700, 256, 32)
    assert GlassMap(rgb).blank(windows, 256) == [True] * len(windows)
    rgb[99, 699] = 0
    assert GlassMap(rgb).blank(windows, 256) == [True] * (len(windows) - 1) + [False]


def test_a_predictor_cuts_each_image_into_its_cheapest_windows():
    """A card window larger than the training patch: big images get the big windows, small ones the patch."""
    import torch

    from dannucnet.engine import Predictor
    from dannucnet.model import LoadedModel, ModelCard
    from dannucnet.model.network import DANNucNet, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(base_filters=16, depth=2)
    card = ModelCard(name="small", version="0", architecture=config.to_dict(), tile_size=64, window=128)
    model = LoadedModel(network=DANNucNet(config).eval(), card=card, source="built-in")
    predictor = Predictor(model, device="cpu", overlap=16)
    assert predictor.tile == 128 and predictor.sides == (128, 64)
    seen: list[int] = []

    def network(tiles):
        seen.append(tiles.shape[1])
        return predictor.predict_tiles(tiles)

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (56, 60, 3), dtype=np.uint8)  # one padded window either way: the patch
    large = rng.integers(0, 256, (352, 352, 3), dtype=np.uint8)  # 3 × 3 windows of 128 against 7 × 7 of 64
    for image, side in ((small, 64), (large, 128)):
        seen.clear()
        got = predictor.predict(image, tile_fn=network)
        assert set(seen) == {side} and predictor.window_for(*image.shape[:2]) == side
        fixed = Predictor(model, device="cpu", overlap=16, tile_size=side)
        assert fixed.sides == (side,)  # a side asked for is the only one
        np.testing.assert_array_equal(got, fixed.predict(image))
