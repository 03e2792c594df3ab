"""A narrower network started from a wider one's weights and taught by its outputs (train/distill.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dannucnet.errors import InputError
from dannucnet.model import DANNucNet, ModelConfig, load_model
from dannucnet.train.distill import Teacher, narrowed
from dannucnet.train.loop import LOSSES, TrainConfig, objective, taught_loss, total_loss, train


def _wide(seed: int = 0, **overrides) -> DANNucNet:
    torch.manual_seed(seed)
    network = DANNucNet(ModelConfig(bn_momentum=0.1, distance_head=True, **overrides))
    with torch.no_grad():  # trained-looking BatchNorm statistics, different per channel
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return network.eval()


def test_narrowing_to_the_same_width_keeps_the_network_exactly():
    wide = _wide()
    same = narrowed(wide, wide.config).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(same(x), wide(x))


def test_each_layer_keeps_its_first_channels_and_a_concatenation_keeps_the_first_of_each_half():
    wide = _wide()
    narrow = narrowed(wide, ModelConfig(**{**wide.config.to_dict(), "base_filters": 16}))
    w, n = wide.state_dict(), narrow.state_dict()
    # the first level's 1x1 conv: 3 input channels (nothing cut, scale 1), outputs 0..15 of 32
    assert torch.equal(n["encoders.0.deep.0.0.weight"], w["encoders.0.deep.0.0.weight"][:16])
    # the second level's input comes from the first level's 32 channels, cut to 16: scaled ×2
    assert torch.allclose(n["encoders.1.shortcut.0.weight"], 2 * w["encoders.1.shortcut.0.weight"][:32, :16])
    # the residual fusion reads cat[deep (32), shortcut (32)]: channels 0..15 and 32..47
    fuse_w, fuse_n = w["encoders.0.fuse.weight"], n["encoders.0.fuse.weight"]
    assert fuse_n.shape == (16, 32, 3, 3)
    assert torch.allclose(fuse_n[:, :16], 2 * fuse_w[:16, :16])
    assert torch.allclose(fuse_n[:, 16:], 2 * fuse_w[:16, 32:48])
    # the attention decoder's fusion reads cat[gated skip, upsampled]: the same rule
    dec_w, dec_n = w["decoders.3.fuse.0.weight"], n["decoders.3.fuse.0.weight"]
    assert torch.allclose(dec_n[:, 16:], 2 * dec_w[:16, 32:48])
    # a transposed convolution's inputs are its first dimension: 512 of the bottleneck's become 256
    assert torch.allclose(n["ups.0.conv.weight"], 2 * w["ups.0.conv.weight"][:256, :128])
    # BatchNorm statistics and biases are cut, never scaled
    assert torch.equal(n["encoders.0.deep.0.2.running_var"], w["encoders.0.deep.0.2.running_var"][:16])
    assert torch.equal(n["encoders.0.fuse.bias"], w["encoders.0.fuse.bias"][:16])
    with torch.no_grad():
        assert narrow(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_only_narrower_and_otherwise_equal_networks_are_made():
    wide = _wide(base_filters=16)
    with pytest.raises(InputError, match="only narrow"):
        narrowed(wide, ModelConfig(**{**wide.config.to_dict(), "base_filters": 32}))
    with pytest.raises(InputError, match="only narrow"):
        narrowed(wide, ModelConfig(**{**wide.config.to_dict(), "block": "plain"}))


@pytest.fixture(scope="module")
def teacher(training_set, tmp_path_factory):
    """A model folder with the distance head (one step at lr 0: its weights are the initial ones)."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    cfg = TrainConfig(data=str(training_set), out=str(out), split="train", epochs=1, steps_per_epoch=1, batch_size=2,
                      patch_size=64, val_fraction=0.4, seed=1, device="cpu", lr=0.0,
                      architecture={"distance_head": True}, command="test")
    train(cfg, report=lambda _msg: None)
    return cfg


def test_the_taught_loss_is_smallest_at_the_teachers_own_answer(teacher):
    """Cross-entropy on the teacher's probabilities plus the distance loss on its distances: at the teacher's
    own logits the first is the entropy of its probabilities and the second 0; any other answer costs more."""
    coach = Teacher(teacher.out, torch.device("cpu"), 64, ModelConfig(distance_head=True))
    x = torch.rand(2, 3, 64, 64)
    own = coach.forward(x).float()
    p = torch.sigmoid(own[:, :1]).double()
    entropy = float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())
    assert taught_loss(coach, own, x, teacher.distance_weight) == pytest.approx(entropy, rel=1e-4, abs=1e-6)
    for shift in ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0)):
        other = own + torch.tensor(shift).view(1, 2, 1, 1)
        assert taught_loss(coach, other, x, teacher.distance_weight) > entropy + 1e-3
    strip = torch.rand(2, 3, 48, 64)  # a validation patch from a short held-out strip: not a square window
    probability, distance = coach.targets(strip)
    assert probability.shape == distance.shape == (2, 1, 48, 64)


def test_the_teacher_is_asked_the_unpainted_patch_when_it_is_given(teacher):
    """With --pigment the teacher answers for each patch before its dots (``teacher_input``); the
    annotations' share of the loss still scores the network's own input."""
    coach = Teacher(teacher.out, torch.device("cpu"), 64, ModelConfig(distance_head=True))
    painted = torch.rand(2, 3, 64, 64)
    clean = painted.clone()
    clean[:, :, 16:48, 16:48] = 1.0  # where the dots were: glass
    mask, valid = (torch.rand(2, 1, 64, 64) > 0.7).float(), torch.ones(2, 1, 64, 64)
    tensors = (painted, mask, valid, torch.rand(2, 1, 64, 64))
    logits = torch.randn(2, 2, 64, 64)
    loss_fn = LOSSES["dan"]
    own = total_loss(loss_fn, logits, tensors, 0.5)
    for asked in (clean, painted):
        expected = 0.6 * own + 0.4 * taught_loss(coach, logits, asked, 0.5)
        got = objective(loss_fn, logits, tensors, 0.5, coach, 0.4, teacher_input=asked)
        assert float(got) == float(expected)
    assert float(objective(loss_fn, logits, tensors, 0.5, coach, 0.4)) == float(
        objective(loss_fn, logits, tensors, 0.5, coach, 0.4, teacher_input=painted))
    # the two inputs get different answers (this tiny teacher's differ little), so the checks above tell them apart
    assert float(taught_loss(coach, logits, clean, 0.5)) != float(taught_loss(coach, logits, painted, 0.5))


def test_the_teacher_remembers_only_the_very_same_validation_batch(teacher):
    """Validation runs the frozen teacher on fixed patches every epoch; with ``remember`` it runs once per
    batch, and an input that differs by one value gets a fresh answer."""
    coach = Teacher(teacher.out, torch.device("cpu"), 64, ModelConfig(distance_head=True))
    x = torch.rand(2, 3, 48, 64)
    first = coach.targets(x, remember=True)
    again = coach.targets(x.clone(), remember=True)
    assert again[0] is first[0] and again[1] is first[1]
    changed = x.clone()
    changed[1, 2, 47, 63] += 0.5
    fresh = coach.targets(changed, remember=True)
    assert fresh[0] is not first[0]
    assert not torch.equal(fresh[0], first[0])
    plain = coach.targets(x)  # training batches are never remembered
    assert plain[0] is not first[0] and torch.equal(plain[0], first[0])
    logits = torch.randn(2, 2, 48, 64)
    assert float(taught_loss(coach, logits, x, 0.5, remember=True)) == float(taught_loss(coach, logits, x, 0.5))


def test_a_narrow_student_trains_from_its_teacher(teacher, tmp_path):
    messages: list[str] = []
    student = TrainConfig(**{**teacher.__dict__, "out": str(tmp_path / "student"), "init_from": teacher.out,
                             "teacher": teacher.out, "lr": 1e-3, "epochs": 2, "steps_per_epoch": 2,
                             "architecture": {"distance_head": True, "base_filters": 16}})
    train(student, report=messages.append)
    assert any(m.startswith("taught by teacher (") for m in messages)
    assert any("starting from the weights" in m for m in messages)
    card = json.loads((tmp_path / "student" / "model_card.json").read_text())
    assert card["architecture"]["base_filters"] == 16 and card["training"]["config"]["teacher"] == teacher.out
    assert all(np.isfinite(h["train_loss"]) for h in card["training"]["history"])
    network = load_model(str(tmp_path / "student")).network
    assert network.encoders[0].fuse.weight.shape == (16, 32, 3, 3)


def test_teacher_settings_are_checked(training_set, tmp_path):
    """A share outside (0, 1] is refused; so is a teacher without the distance head for a student with one."""
    cfg = TrainConfig(data=str(training_set), out=str(tmp_path / "m"), split="train", epochs=1, steps_per_epoch=1,
                      batch_size=2, patch_size=64, device="cpu", teacher_weight=0.0, command="test")
    with pytest.raises(InputError, match="--teacher-weight"):
        train(cfg, report=lambda _msg: None)
    plain = tmp_path / "plain"
    train(TrainConfig(**{**cfg.__dict__, "out": str(plain), "teacher_weight": 0.5}), report=lambda _msg: None)
    headless = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "s"), "teacher_weight": 0.5,
                              "teacher": str(plain), "architecture": {"distance_head": True}})
    with pytest.raises(InputError, match="no distance head"):
        train(headless, report=lambda _msg: None)
    assert not (tmp_path / "s" / "weights.safetensors").exists()


def test_fine_tuning_keeps_the_init_models_network_unless_told():
    """``train --init-from M`` takes every architecture setting its flags leave out from M's card: the lite
    model keeps its 16 filters, 1.6 its distance head (both were refused as architecture changes without
    ``--base-filters`` / ``--distance-head``); a flag given still wins, and no model means the code's defaults."""
    from dannucnet.cli import build_parser
    from dannucnet.commands.train import run_architecture
    from dannucnet.errors import ModelError
    from dannucnet.model.card import ModelCard
    from dannucnet.model.registry import resolve_model_dir
    from dannucnet.train.loop import default_architecture

    def arch(*flags: str) -> dict:
        return run_architecture(build_parser().parse_args(["train", "--data", "d", "--out", "o", *flags]))

    for name in ("dannucnet-monuseg", "dannucnet-monuseg-20x-lite"):
        card = ModelCard.load(resolve_model_dir(name)).config.to_dict()
        assert arch("--init-from", name) == card
    assert arch("--init-from", "dannucnet-monuseg-20x-lite")["base_filters"] == 16
    assert arch("--init-from", "dannucnet-monuseg")["distance_head"] is True
    told = arch("--init-from", "dannucnet-monuseg", "--base-filters", "16", "--no-channel-attention",
                "--bn-momentum", "0.5")
    assert (told["base_filters"], told["channel_attention"], told["bn_momentum"]) == (16, False, 0.5)
    assert told["spatial_attention"] is True and told["distance_head"] is True
    assert arch() == default_architecture()
    assert arch("--distance-head", "--channel-reduction", "8") == {**default_architecture(), "distance_head": True,
                                                                    "channel_reduction": 8}
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        arch("--init-from", "no-such-model")


def test_the_readme_fine_tuning_command_runs_on_a_model_with_the_distance_head(teacher, tmp_path):
    """README's `dannucnet train --data … --out … --init-from MODEL`, no architecture flags, on a model with the
    distance head: it fine-tunes that network (it stopped with an architecture dump before); an ablation flag
    that contradicts the model is still refused, and nothing is written."""
    from dannucnet.cli import main
    from dannucnet.formats.dataset import DatasetWriter
    from dannucnet.slides.synthetic import make_synthetic_he

    data = tmp_path / "data"
    writer = DatasetWriter(data)
    for i in range(2):  # the CLI trains on 256² patches: images that hold one
        im = make_synthetic_he(272, 264, seed=200 + i)
        writer.add(f"img{i}", im.rgb, im.labels, organ="Synthetic")
    writer.close(mpp=0.25, splits={"train": ["img0", "img1"]}, provenance={"name": "synthetic"})
    common = ["train", "--data", str(data), "--split", "train", "--val-fraction", "0", "--epochs", "1",
              "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "--init-from", teacher.out]
    assert main([*common, "--out", str(tmp_path / "tuned")]) == 0
    card = json.loads((tmp_path / "tuned" / "model_card.json").read_text())
    assert card["architecture"] == load_model(teacher.out).card.config.to_dict()
    assert card["architecture"]["distance_head"] is True
    assert main([*common, "--out", str(tmp_path / "ablated"), "--no-channel-attention"]) == 2
    assert not (tmp_path / "ablated" / "weights.safetensors").exists()


def test_images_smaller_than_a_patch_are_refused_with_their_sizes(training_set, tmp_path, capsys):
    """The synthetic set's 192-row, 160-column images hold no 256² training patch: a clear error naming the largest and
    what to do, not a traceback, and nothing written."""
    from dannucnet.cli import main

    out = tmp_path / "m"
    assert main(["train", "--data", str(training_set), "--split", "train", "--out", str(out), "--epochs", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no training image has a 256 x 256 px area" in err
    assert "the largest is 134 x 160 px" in err  # 192 rows less the 30 % held out for validation, 160 columns
    assert "--val-fraction 0" in err and "Traceback" not in err
    assert not (out / "weights.safetensors").exists()
