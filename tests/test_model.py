"""The network matches MODEL_SPEC.md: parameter counts, shapes, loss values, card and weights I/O."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dannucnet.errors import ModelError
from dannucnet.model import (
    DANNucNet,
    ModelCard,
    ModelConfig,
    bce_loss,
    count_parameters,
    dan_nucnet_loss,
    load_model,
    save_model,
)
from dannucnet.model.network import avg_pool_same, max_pool_same


def test_parameter_counts_match_the_released_graph():
    trainable, bn_buffers = count_parameters(DANNucNet())
    assert trainable == 9_245_109
    assert trainable + bn_buffers == 9_250_933


def test_paper_channel_reduction_flag():
    trainable, bn_buffers = count_parameters(DANNucNet(ModelConfig(channel_reduction=8)))
    assert trainable == 9_274_529
    assert trainable + bn_buffers == 9_280_353


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(spatial_attention=False),
        ModelConfig(channel_attention=False),
        ModelConfig(block="plain"),
        ModelConfig(spatial_attention=False, channel_attention=False),
    ],
    ids=["no-spatial", "no-channel", "plain-blocks", "no-attention"],
)
def test_ablations_build_and_have_fewer_parameters(config):
    full, _ = count_parameters(DANNucNet())
    ablated = DANNucNet(config).eval()
    assert count_parameters(ablated)[0] < full
    with torch.no_grad():
        assert ablated(torch.rand(1, 3, 32, 48)).shape == (1, 1, 32, 48)


@pytest.mark.parametrize("size", [(16, 16), (64, 96), (256, 256), (128, 320)])
def test_output_shape_follows_input(size):
    net = DANNucNet().eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 1, *size)
    assert torch.isfinite(out).all()


def test_sides_not_multiple_of_16_are_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        DANNucNet().eval()(torch.rand(1, 3, 40, 32))


def test_same_pools_match_tf_semantics():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # TF 'same' 2x2/s1 ignores the padded bottom row / right column
    assert avg_pool_same(x).flatten().tolist() == [2.5, 3.0, 3.5, 4.0]
    assert max_pool_same(x).flatten().tolist() == [4.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_same_equals_the_pooling_kernel(channels_last):
    # the shifted-maxima form must be bit-identical to the kernel it replaces, ties and odd sides included
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (2, 5, 9, 14)).float()
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    reference = torch.nn.functional.max_pool2d(torch.nn.functional.pad(x, (0, 1, 0, 1), mode="replicate"), 2, 1)
    assert torch.equal(max_pool_same(x), reference)


def test_loss_against_hand_computed_values():
    # t = [1, 0], p = [0.8, 0.2], as logits.
    p = torch.tensor([0.8, 0.2])
    logits = torch.log(p / (1 - p)).view(1, 1, 1, 2)
    t = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # Dice over the batch: 1 - (2*0.8 + 1) / (1 + 1.0 + 1) = 1 - 2.6/3
    d = 1 - 2.6 / 3
    # per-pixel Jaccard with smooth 100, x100:
    j1 = 100 * (1 - 100.8 / 101.0)  # t=1, p=0.8 -> 100*0.2/101
    j2 = 100 * (1 - 100.0 / 100.2)  # t=0, p=0.2 -> 100*0.2/100.2
    expected = (j1 * d / (j1 + d) + j2 * d / (j2 + d)) / 2
    assert math.isclose(expected, 0.0798, abs_tol=5e-4)  # the hand-worked figure
    assert dan_nucnet_loss(logits, t).item() == pytest.approx(expected, rel=1e-5)


def test_loss_is_zero_free_of_nan_when_perfect_and_empty():
    logits = torch.full((1, 1, 4, 4), -30.0)
    t = torch.zeros(1, 1, 4, 4)
    value = dan_nucnet_loss(logits, t)
    assert torch.isfinite(value) and value.item() < 1e-6


def test_loss_ignores_pixels_outside_the_valid_mask():
    logits = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    valid = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    changed = t.clone()
    changed[..., 1, :] = 1 - changed[..., 1, :]  # flip labels where invalid
    assert dan_nucnet_loss(logits, t, valid).item() == pytest.approx(dan_nucnet_loss(logits, changed, valid).item())
    assert bce_loss(logits, t, valid).item() == pytest.approx(math.log(2), rel=1e-6)


def test_gradients_flow_to_every_parameter():
    net = DANNucNet()
    loss = dan_nucnet_loss(net(torch.rand(2, 3, 32, 32)), (torch.rand(2, 1, 32, 32) > 0.5).float())
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing


def test_card_and_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    net = DANNucNet(ModelConfig(channel_reduction=8)).eval()
    card = ModelCard(name="roundtrip", version="3", mpp=0.5, trained=True, metrics={"f1": 0.5})
    save_model(tmp_path, net, card, half=False)
    loaded = load_model(str(tmp_path))
    assert loaded.card.name == "roundtrip" and loaded.card.mpp == 0.5 and loaded.card.metrics == {"f1": 0.5}
    assert loaded.network.config.channel_reduction == 8
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), loaded.network(x))


def test_fp16_files_keep_values_beyond_fp16_range_in_fp32(tmp_path):
    """A bottleneck BatchNorm variance of 10⁵ overflows fp16 (max 65504); stored as inf it would
    silence its channel, so such tensors stay fp32 while the rest is halved."""
    net = DANNucNet(ModelConfig()).eval()
    with torch.no_grad():
        net.bottleneck[-1].running_var[:3] = torch.tensor([1e5, 7e4, 2.0])
    save_model(tmp_path, net, ModelCard(name="big", version="1", trained=True))
    loaded = load_model(str(tmp_path)).network.state_dict()
    assert torch.equal(loaded["bottleneck.4.running_var"][:3], torch.tensor([1e5, 7e4, 2.0]))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "weights.safetensors"), "pt") as f:
        assert f.get_tensor("bottleneck.4.running_var").dtype == torch.float32
        assert f.get_tensor("bottleneck.0.weight").dtype == torch.float16


def test_reviving_overflowed_batchnorm_channels_keeps_the_network_output():
    """Channels whose variance is inf output their bias; revived, they get measured statistics and a
    zero scale, so the output is unchanged and the scale can learn again."""
    from dannucnet.model.weights import overflowed_channels
    from dannucnet.train.revive import revive_overflowed_channels

    torch.manual_seed(0)
    net = DANNucNet(ModelConfig()).eval()
    bn = net.bottleneck[-1]
    with torch.no_grad():
        bn.running_var[::3] = float("inf")
        bn.weight.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = net(x)
    assert set(overflowed_channels(net)) == {"bottleneck.4"}
    revived = revive_overflowed_channels(net, [torch.rand(2, 3, 64, 64) for _ in range(3)])
    assert revived == len(range(0, bn.num_features, 3))
    assert torch.isfinite(bn.running_var).all() and bn.running_var[::3].ge(0).all() and bn.running_var[::3].gt(0).any()
    assert bn.weight[::3].eq(0).all() and bn.weight[1::3].ne(0).all()
    with torch.no_grad():
        assert torch.allclose(net(x), before, atol=1e-6)
    assert not overflowed_channels(net) and revive_overflowed_channels(net, [x]) == 0


def test_loading_refuses_a_card_that_does_not_match_the_weights(tmp_path):
    save_model(tmp_path, DANNucNet(), ModelCard(name="m", version="1"))
    card = json.loads((tmp_path / "model_card.json").read_text())
    card["architecture"]["channel_reduction"] = 8
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not match the architecture"):
        load_model(str(tmp_path))


def test_unknown_model_and_broken_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model")
    (tmp_path / "model_card.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(str(tmp_path))
    (tmp_path / "model_card.json").write_text(json.dumps({"name": "x", "version": "1"}))
    (tmp_path / "weights.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="safetensors"):
        load_model(str(tmp_path))


def test_distance_head_adds_one_output_channel_from_its_own_branch():
    base, _ = count_parameters(DANNucNet())
    net = DANNucNet(ModelConfig(distance_head=True)).eval()
    assert count_parameters(net)[0] == base + 2 * (32 * 32 * 9 + 32) + (32 + 1)  # two 3x3 convs and a 1x1 filter
    with torch.no_grad():
        assert net(torch.rand(1, 3, 32, 48)).shape == (1, 2, 32, 48)
    assert ModelConfig.from_dict(ModelConfig(distance_head=True).to_dict()).outputs == 2
    old_card = {k: v for k, v in ModelConfig().to_dict().items() if k != "distance_head"}
    assert ModelConfig.from_dict(old_card).outputs == 1
