"""``dannucnet train`` checks what it is given before any work, and refuses in one line, leaving nothing behind.

QA found: ``--out`` on a trained model folder replaced it (B3); settings whose card the loader refuses were
trained and saved (B2); bad numbers gave tracebacks, silently wrong models or an empty --out folder (B11);
a checkpoint of another run, or a broken one, gave a traceback (B12), and a new --lr was silently ignored on
resume; an untrained teacher was taught from (B17a). Real CLI, real tiny datasets and models: refusals need no
training, and one shared tiny model is trained once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dannucnet.cli import main

SIZE = 272  # holds one 256-px training patch; --val-fraction 0 trains on every row


def _dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for k in range(2):
        rgb = np.empty((SIZE, SIZE, 3), np.uint8)
        rgb[:] = (235, 170, 210)
        labels = np.zeros((SIZE, SIZE), np.uint16)
        for i in range(1, 30):
            cy, cx = rng.integers(10, SIZE - 10, 2)
            r = rng.integers(5, 9)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            rgb[inside], labels[inside] = (90, 40, 140), i
        tifffile.imwrite(root / "images" / f"im{k}.tif", rgb)
        tifffile.imwrite(root / "labels" / f"im{k}.tif", labels)
    (root / "dataset.json").write_text(json.dumps({"mpp": 0.25, "splits": {"all": ["im0", "im1"]}}))
    return root


def _args(data: Path, out: Path, *flags: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--val-fraction", "0", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "1", "--base-filters", "8", "--channel-reduction", "8",
            "--device", "cpu", *flags]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory.mktemp("train-inputs") / "ds")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A tiny trained model folder, with the checkpoint of its run (colour-normalised: its card has a reference)."""
    out = tmp_path_factory.mktemp("trained") / "model"
    assert main(_args(data, out)) == 0
    assert {"weights.safetensors", "model_card.json", "checkpoint.pt"} <= {p.name for p in out.iterdir()}
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI: it must exit 2 and end on one ``error:`` line, without a traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err and lines and lines[-1].startswith("dannucnet train: error: "), lines
    return lines[-1]


def _model_copy(source: Path, folder: Path, checkpoint: bool = False, **card_changes) -> Path:
    folder.mkdir(parents=True)
    names = ("weights.safetensors", "model_card.json") + (("checkpoint.pt",) if checkpoint else ())
    for name in names:
        shutil.copy2(source / name, folder / name)
    if card_changes:
        card = json.loads((folder / "model_card.json").read_text())
        (folder / "model_card.json").write_text(json.dumps({**card, **card_changes}))
    return folder


# -- B3: a trained model folder is never written over -------------------------------------------------------------


def test_out_holding_a_trained_model_without_a_checkpoint_is_refused_and_left_as_it_was(data, trained, tmp_path,
                                                                                      capsys):
    shipped = _model_copy(trained, tmp_path / "shipped")  # as a shipped model: weights and card, no checkpoint
    before = _snapshot(shipped)
    line = _refused(_args(data, shipped), capsys)
    assert "holds a model" in line and "another --out" in line and "--overwrite" in line
    assert _snapshot(shipped) == before
    card_only = tmp_path / "card-only"
    card_only.mkdir()
    (card_only / "model_card.json").write_text("{}")
    assert "holds a model" in _refused(_args(data, card_only), capsys)
    assert (card_only / "model_card.json").read_text() == "{}"


def test_overwrite_replaces_a_trained_model_when_asked(data, trained, tmp_path):
    folder = _model_copy(trained, tmp_path / "old", version="old")
    assert main(_args(data, folder, "--overwrite", "--version", "new")) == 0
    assert json.loads((folder / "model_card.json").read_text())["version"] == "new"


# -- B2, B11: settings are checked before any work, and a refusal leaves no --out folder -------------------------


BAD_SETTINGS = [
    (("--mpp", "0"), "--mpp"), (("--mpp", "nan"), "--mpp"), (("--mpp", "-1"), "--mpp"), (("--mpp", "inf"), "--mpp"),
    (("--version", ""), "--version"), (("--version", "  "), "--version"),
    (("--bn-momentum", "0"), "--bn-momentum"), (("--bn-momentum", "2"), "--bn-momentum"),
    (("--bn-momentum", "nan"), "--bn-momentum"),
    (("--base-filters", "0"), "--base-filters"), (("--base-filters", "7"), "--base-filters"),
    (("--base-filters", "-8"), "--base-filters"), (("--base-filters", "100000"), "--base-filters"),
    (("--base-filters", "256"), "--base-filters"),  # within the card's range; too many parameters to load
    (("--batch-size", "0"), "--batch-size"), (("--batch-size", "-1"), "--batch-size"),
    (("--lr", "-1"), "--lr"), (("--lr", "nan"), "--lr"), (("--lr", "inf"), "--lr"),
    (("--seed", "-1"), "--seed"), (("--steps-per-epoch", "-1"), "--steps-per-epoch"),
    (("--steps-per-epoch", "0"), "--steps-per-epoch"),
    (("--distance-weight", "-1"), "--distance-weight"), (("--distance-weight", "nan"), "--distance-weight"),
    (("--time-budget", "-1"), "--time-budget"), (("--time-budget", "nan"), "--time-budget"),
    (("--epochs", "0"), "--epochs"),
]


@pytest.mark.parametrize(("flags", "named"), BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_any_work_naming_the_flag(data, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    line = _refused([*_args(data, out), *flags], capsys)
    assert named in line
    assert not out.exists()


def test_a_card_the_loader_refuses_is_named_as_such(data, tmp_path, capsys):
    line = _refused([*_args(data, tmp_path / "out"), "--mpp", "0"], capsys)
    assert "it must be a number from 0.01 to 100" in line


def test_a_data_refusal_leaves_no_out_folder(tmp_path, capsys):
    out = tmp_path / "out"
    assert "not an instance dataset folder" in _refused(_args(tmp_path / "no-data", out), capsys)
    assert not out.exists()


def test_out_that_is_a_file_is_refused(data, tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    assert "--out" in _refused(_args(data, out), capsys)
    assert out.read_text() == "keep me"


# -- B12: resuming ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [("--base-filters", "16"), ("--distance-head",)])
def test_a_checkpoint_of_another_network_is_refused(data, trained, tmp_path, capsys, flags):
    folder = _model_copy(trained, tmp_path / "model", checkpoint=True)
    before = _snapshot(folder)
    line = _refused([*_args(data, folder, "--epochs", "2"), *flags], capsys)
    assert "checkpoint of another" in line and "--no-resume" in line and "another --out" in line
    assert _snapshot(folder) == before


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, b"PK\x03\x04 not really a zip"])
def test_an_unreadable_checkpoint_is_refused_without_torchs_advice(data, tmp_path, capsys, content):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(content)
    line = _refused(_args(data, folder), capsys)
    assert "not a readable checkpoint" in line and "--no-resume" in line
    assert "weights_only" not in line
    assert (folder / "checkpoint.pt").read_bytes() == content


def test_a_new_lr_on_resume_is_reported_as_not_applied(data, trained, tmp_path, capsys):
    folder = _model_copy(trained, tmp_path / "model", checkpoint=True)
    assert main([*_args(data, folder, "--epochs", "2"), "--lr", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "--lr 0.01 is not applied" in out
    history = json.loads((folder / "model_card.json").read_text())["training"]["history"]
    assert [h["lr"] for h in history] == [1e-3, 1e-3]  # the checkpoint's schedule went on


# -- B17a: an untrained teacher -----------------------------------------------------------------------------------


def test_an_untrained_teacher_is_refused(data, trained, tmp_path, capsys):
    out = tmp_path / "student"
    assert "UNTRAINED" in _refused(_args(data, out, "--teacher", "untrained"), capsys)
    untrained = _model_copy(trained, tmp_path / "random", trained=False)
    assert "UNTRAINED" in _refused(_args(data, out, "--teacher", str(untrained)), capsys)
    assert not out.exists()


def test_help_says_what_a_resume_keeps_and_offers_overwrite(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite" in text and "goes on with its checkpoint's learning rate" in text
