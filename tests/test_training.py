"""Training on synthetic data: the loop runs, resumes, writes a card; the model can learn."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from dannucnet.errors import InputError
from dannucnet.formats.dataset import load_dataset
from dannucnet.model import DANNucNet, ModelConfig, dan_nucnet_loss, load_model
from dannucnet.slides.synthetic import make_synthetic_he
from dannucnet.train.loop import TrainConfig, train
from dannucnet.train.patches import normalised_distance, separated_foreground


def test_overfits_a_single_tile():
    """A single synthetic tile is learnt to pixel F1 > 0.9 within a minute or two of CPU."""
    torch.manual_seed(0)
    im = make_synthetic_he(128, 128, seed=5)
    x = torch.from_numpy(im.rgb).permute(2, 0, 1)[None].float() / 255
    t = torch.from_numpy((im.labels > 0).astype(np.float32))[None, None]
    net = DANNucNet(ModelConfig(bn_momentum=0.1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses, f1, started = [], 0.0, time.monotonic()
    for step in range(200):
        logits = net(x)
        loss = dan_nucnet_loss(logits, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 9:
            pred = (logits.detach() > 0).float()
            f1 = float(2 * (pred * t).sum() / (pred.sum() + t.sum()))
            if f1 > 0.9 or time.monotonic() - started > 150:
                break
    assert losses[-1] < losses[0] * 0.5
    assert f1 > 0.9, f"pixel F1 {f1:.3f} after {len(losses)} steps"


def test_train_loop_writes_card_and_resumes(training_set, tmp_path):
    out = tmp_path / "model"
    cfg = TrainConfig(data=str(training_set), out=str(out), split="train", epochs=2, steps_per_epoch=2, batch_size=2,
                      patch_size=64, val_fraction=0.4, seed=1, device="cpu", command="test")
    train(cfg, report=lambda _msg: None)
    card = json.loads((out / "model_card.json").read_text())
    assert card["trained"] is True and card["mpp"] == 0.25
    assert card["training"]["epochs_run"] == 2 and len(card["training"]["history"]) == 2
    assert card["provenance"]["split"] == "train" and card["provenance"]["images"] == ["img0", "img1"]
    assert "licence" in card and card["training"]["hardware"]
    loaded = load_model(str(out))
    assert loaded.card.trained
    # resume: a longer run continues from the checkpoint instead of starting again
    messages: list[str] = []
    train(TrainConfig(**{**cfg.__dict__, "epochs": 3}), report=messages.append)
    assert any("resumed" in m and "epoch 2" in m for m in messages)
    assert len(json.loads((out / "model_card.json").read_text())["training"]["history"]) >= 2


def test_card_records_the_epochs_after_the_kept_one(training_set, tmp_path):
    # min_delta so large that only the first epoch counts as an improvement: epoch 1 is kept, epoch 2 still ran
    out = tmp_path / "model"
    cfg = TrainConfig(data=str(training_set), out=str(out), split="train", epochs=2, steps_per_epoch=1, batch_size=2,
                      patch_size=64, val_fraction=0.4, seed=1, device="cpu", command="test", min_delta=10.0)
    train(cfg, report=lambda _msg: None)
    training = json.loads((out / "model_card.json").read_text())["training"]
    assert training["best_epoch"] == 1 and training["epochs_run"] == 2
    assert [h["epoch"] for h in training["history"]] == [1, 2]
    assert training["run_wall_time_s"] >= training["wall_time_s"] > 0


def test_a_resumed_run_that_keeps_an_earlier_epoch_rebuilds_its_card_without_reading_it(training_set, tmp_path):
    """The card is built from the run's state, not read back: a resume that never beats epoch 1 writes the
    card of epoch 1's save (that run's command and settings) with the whole record, even over a broken card.
    A checkpoint from before checkpoints recorded the kept save gets the resumed run's settings."""
    out = tmp_path / "model"
    cfg = TrainConfig(data=str(training_set), out=str(out), split="train", epochs=2, steps_per_epoch=1, batch_size=2,
                      patch_size=64, val_fraction=0.4, seed=1, device="cpu", command="first", min_delta=10.0)
    train(cfg, report=lambda _msg: None)
    first = json.loads((out / "model_card.json").read_text())
    (out / "model_card.json").write_text("{ not json")
    train(TrainConfig(**{**cfg.__dict__, "epochs": 3, "command": "resumed"}), report=lambda _msg: None)
    card = json.loads((out / "model_card.json").read_text())
    training = card["training"]
    assert training["command"] == "first" and training["config"]["epochs"] == 2
    assert training["best_epoch"] == 1 and training["epochs_run"] == 3 and len(training["history"]) == 3
    assert training["wall_time_s"] == first["training"]["wall_time_s"]
    assert card["metrics"] == first["metrics"] and training["stop_reason"] == "max epochs reached"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["kept"]  # as written before checkpoints recorded the kept save
    torch.save(state, out / "checkpoint.pt")
    train(TrainConfig(**{**cfg.__dict__, "epochs": 4, "command": "older"}), report=lambda _msg: None)
    training = json.loads((out / "model_card.json").read_text())["training"]
    assert training["command"] == "older" and training["best_epoch"] == 1 and training["epochs_run"] == 4
    assert training["wall_time_s"] == round(training["history"][0]["seconds"], 1)


def test_dataset_folder_round_trip(training_set):
    ds = load_dataset(training_set)
    assert [s.stem for s in ds.select("train")] == ["img0", "img1"]
    sample = ds.samples[0]
    assert sample.organ == "Synthetic" and sample.mpp == 0.25
    assert sample.load_image().shape == (192, 160, 3)
    region = sample.load_region()
    assert region is not None and not region[:, :16].any() and region[:, 16:].all()
    assert sample.load_labels().max() > 0


def test_touching_nuclei_get_a_background_seam_in_the_target():
    """Pixels bordering a *different* nucleus become background; outer outlines and lone nuclei stay."""
    labels = np.zeros((7, 10), np.uint16)
    labels[1:6, 1:5] = 1  # touches nucleus 2 along column 4|5
    labels[1:6, 5:9] = 2
    labels[0, 0] = 0
    alone = np.zeros((7, 10), np.uint16)
    alone[2:5, 2:6] = 3
    seam = separated_foreground(labels)
    expected = (labels > 0).astype(np.uint8)
    expected[1:6, 4:6] = 0  # one column on each side of the contact
    assert np.array_equal(seam, expected)
    assert np.array_equal(separated_foreground(alone), (alone > 0).astype(np.uint8))
    diagonal = np.zeros((4, 4), np.uint16)
    diagonal[0:2, 0:2], diagonal[2:4, 2:4] = 1, 2  # corner contact counts as touching
    assert separated_foreground(diagonal)[1, 1] == 0 and separated_foreground(diagonal)[0, 0] == 1


def test_fine_tuning_starts_from_a_model_and_refuses_another_architecture(training_set, tmp_path):
    base = tmp_path / "base"
    cfg = TrainConfig(data=str(training_set), out=str(base), split="train", epochs=1, steps_per_epoch=1, batch_size=2,
                      patch_size=64, val_fraction=0.4, seed=1, device="cpu", command="test")
    train(cfg, report=lambda _msg: None)
    messages: list[str] = []
    tuned = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "tuned"), "init_from": str(base), "lr": 0.0})
    train(tuned, report=messages.append)
    assert any("starting from the weights" in m for m in messages)
    # lr 0: the weights are exactly the base model's, so they really were loaded
    a, b = load_model(str(base)).network.state_dict(), load_model(str(tmp_path / "tuned")).network.state_dict()
    batch_norm_stats = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith(batch_norm_stats))
    other = TrainConfig(**{**tuned.__dict__, "out": str(tmp_path / "other"), "architecture": {"block": "plain"}})
    with pytest.raises(InputError, match="architecture"):
        train(other, report=lambda _msg: None)


def test_distance_target_peaks_at_each_centre_and_falls_to_zero_between_touching_nuclei():
    labels = np.zeros((12, 24), np.uint16)
    labels[2:10, 2:12], labels[2:10, 12:22] = 1, 2  # two 8x10 nuclei sharing a border
    d = normalised_distance(labels)
    row = d[6]
    # worked by hand: distance inside the seam-separated mask, divided by each nucleus's own maximum (4)
    assert np.allclose(row[:12], [0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 0.75, 0.5, 0.25, 0])
    assert np.allclose(row[12:], [0, 0.25, 0.5, 0.75, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0])
    assert d[labels == 0].max() == 0 and d.max() == 1


def test_adding_a_distance_head_to_a_trained_model_and_training_it(training_set, tmp_path):
    """--init-from a one-output model with the distance head: every weight carries over; with
    distance_only the probability channel stays exactly the base model's while the new branch
    learns (the loss falls); training the whole network also runs; removing the head is refused."""
    from dannucnet.train.loop import _initial_weights

    base = tmp_path / "base"
    cfg = TrainConfig(data=str(training_set), out=str(base), split="train", epochs=1, steps_per_epoch=1, batch_size=2,
                      patch_size=64, val_fraction=0.4, seed=1, device="cpu", command="test")
    train(cfg, report=lambda _msg: None)
    base_net = load_model(str(base)).network.eval()
    headed = ModelConfig(**{**base_net.config.to_dict(), "distance_head": True})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(_initial_weights(str(base), headed).eval()(x)[:, :1], base_net(x))
    tuned = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "tuned"), "init_from": str(base), "epochs": 3,
                           "steps_per_epoch": 4, "lr": 3e-3, "architecture": {"distance_head": True},
                           "distance_only": True})
    train(tuned, report=lambda _msg: None)
    card = json.loads((tmp_path / "tuned" / "model_card.json").read_text())
    assert card["architecture"]["distance_head"] is True
    losses = [h["train_loss"] for h in card["training"]["history"]]
    assert losses[-1] < losses[0]
    tuned_net = load_model(str(tmp_path / "tuned")).network.eval()
    assert tuned_net.config.outputs == 2
    with torch.no_grad():
        assert torch.equal(tuned_net(x)[:, :1], base_net(x))
    whole = TrainConfig(**{**tuned.__dict__, "out": str(tmp_path / "whole"), "distance_only": False, "epochs": 1,
                           "steps_per_epoch": 1})
    train(whole, report=lambda _msg: None)
    with torch.no_grad():
        assert not torch.equal(load_model(str(tmp_path / "whole")).network.eval()(x)[:, :1], base_net(x))
    back = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "back"), "init_from": str(tmp_path / "tuned")})
    with pytest.raises(InputError, match="architecture"):
        train(back, report=lambda _msg: None)
    plain = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "plain"), "distance_only": True})
    with pytest.raises(InputError, match="distance head"):
        train(plain, report=lambda _msg: None)


def test_freeze_bn_keeps_the_loaded_batchnorm_statistics(training_set, tmp_path):
    base = tmp_path / "base"
    cfg = TrainConfig(data=str(training_set), out=str(base), split="train", epochs=1, steps_per_epoch=1, batch_size=2,
                      patch_size=64, val_fraction=0.4, seed=1, device="cpu", command="test")
    train(cfg, report=lambda _msg: None)
    before = load_model(str(base)).network.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    for freeze, out in ((True, "frozen"), (False, "moving")):
        tuned = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / out), "init_from": str(base),
                               "steps_per_epoch": 2, "freeze_bn": freeze})
        train(tuned, report=lambda _msg: None)
        after = load_model(str(tmp_path / out)).network.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in stats) is freeze


def test_weight_averaging_keeps_the_mean_of_the_epoch_end_weights_across_a_resume(training_set, tmp_path):
    """--average-from: the checkpoint carries the running mean, a resumed run keeps adding to it, and the
    card says which epochs were averaged and whether the mean was shipped (it is when it validates better)."""
    out = tmp_path / "swa"
    cfg = TrainConfig(data=str(training_set), out=str(out), split="train", epochs=2, steps_per_epoch=2, batch_size=2,
                      patch_size=64, val_fraction=0.4, seed=1, device="cpu", command="test", average_from=2)
    train(cfg, report=lambda _msg: None)
    epoch2 = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    messages: list[str] = []
    train(TrainConfig(**{**cfg.__dict__, "epochs": 3}), report=messages.append)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    epoch3, mean = state["model"], state["averaged"]
    for name, value in epoch3.items():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):  # parameters are averaged
            assert torch.allclose(mean[f"module.{name}"], (epoch2[name] + value) / 2, atol=1e-6), name
    average = json.loads((out / "model_card.json").read_text())["training"]["weight_average"]
    assert average["epochs"] == [2, 3] and average["count"] == 2
    assert any("mean of the weights of epochs 2-3" in m for m in messages)
    shipped = load_model(str(out)).network.state_dict()
    best = torch.load(out / "checkpoint.pt", weights_only=True)["best_epoch"]
    # the shipped weights are the mean (BatchNorm statistics re-measured) or else the best epoch's, as the card says
    weight = next(k for k in shipped if k.endswith("weight") and "bn" not in k)
    if average["shipped"]:
        assert torch.allclose(shipped[weight], mean[f"module.{weight}"].to(shipped[weight].dtype), atol=1e-3)
    else:
        assert best >= 1 and not torch.allclose(shipped[weight], mean[f"module.{weight}"], atol=1e-6)
    with pytest.raises(InputError, match="average-from"):
        train(TrainConfig(**{**cfg.__dict__, "average_from": 0}), report=lambda _msg: None)


def test_training_without_validation_uses_every_row_and_keeps_the_weight_mean(training_set, tmp_path):
    """--val-fraction 0: the final run on all the data. Nothing is held out, every epoch is logged without
    validation scores, nothing stops early, and the weight mean asked for is what ships."""
    out = tmp_path / "all-rows"
    messages: list[str] = []
    cfg = TrainConfig(data=str(training_set), out=str(out), split="train", epochs=3, steps_per_epoch=2, batch_size=2,
                      patch_size=64, val_fraction=0.0, seed=1, device="cpu", command="test", average_from=2,
                      stop_patience=1)
    train(cfg, report=messages.append)
    full_card = json.loads((out / "model_card.json").read_text())
    card = full_card["training"]
    assert card["epochs_run"] == 3 and card["stop_reason"] == "max epochs reached"  # patience 1 did not stop it
    assert [h["val_loss"] for h in card["history"]] == [None, None, None]
    assert full_card["provenance"]["validation"].startswith("none")
    assert "validation" not in full_card["metrics"]  # no validation scores to record
    assert card["weight_average"]["epochs"] == [2, 3] and card["weight_average"]["shipped"]
    mean = torch.load(out / "checkpoint.pt", weights_only=True)["averaged"]
    shipped = load_model(str(out)).network.state_dict()
    weight = next(k for k in shipped if k.endswith("weight") and "bn" not in k)
    assert torch.allclose(shipped[weight], mean[f"module.{weight}"].to(shipped[weight].dtype), atol=1e-3)
    assert any("last epoch 3" in m for m in messages)
    with pytest.raises(InputError, match="val-fraction"):
        train(TrainConfig(**{**cfg.__dict__, "val_fraction": 1.0}), report=lambda _msg: None)
