"""Malformed model cards and broken weights: one clear error line (exit 2), never a traceback or a huge allocation.

Issue 21: eight malformed cards gave raw tracebacks (``base_filters`` 1e9 tried to allocate 12 GB
before the weights were checked); NaN weights loaded with exit 0; float weights stored as int64 were
silently converted. Each case is a real model folder: the card and safetensors of a small untrained
network, then one thing broken.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dannucnet.cli import main
from dannucnet.errors import ModelError
from dannucnet.model import ModelCard, load_model, save_model
from dannucnet.model.network import DANNucNet, ModelConfig

SMALL = ModelConfig(base_filters=16, depth=2)


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "model"
    save_model(folder, DANNucNet(SMALL).eval(), ModelCard(name="small", version="1", tile_size=64), half=False)
    return folder


def _edit_card(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = folder / "model_card.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _arch(**values):
    def change(card):
        card["architecture"].update(values)
        return card
    return change


def _top(**values):
    def change(card):
        card.update(values)
        return card
    return change


def _without(key):
    def change(card):
        del card[key]
        return card
    return change


# (case id, change to the card, a word the error line must contain)
MALFORMED_CARDS = [
    ("depth-text", _arch(depth="four"), "architecture.depth"),
    ("depth-1000", _arch(depth=1000), "architecture.depth"),
    ("base-filters-1e9", _arch(base_filters=1e9), "architecture.base_filters"),
    ("base-filters-10**9-int", _arch(base_filters=10**9), "architecture.base_filters"),
    ("too-many-parameters", _arch(base_filters=512, depth=6), "parameters"),
    ("base-below-reduction", _arch(base_filters=8), "architecture.base_filters"),
    ("reduction-3", _arch(channel_reduction=3), "architecture.channel_reduction"),
    ("block-unknown", _arch(block="dense"), "architecture.block"),
    ("attention-text", _arch(spatial_attention="yes"), "architecture.spatial_attention"),
    ("arch-unknown-key", _arch(width=3), "unknown architecture fields"),
    ("arch-list", _top(architecture=[1, 2]), "architecture"),
    ("mpp-0", _top(mpp=0), "mpp"),
    ("mpp-text", _top(mpp="abc"), "mpp"),
    ("mpp-nan", _top(mpp=float("nan")), "mpp"),
    ("mpp-bool", _top(mpp=True), "mpp"),
    ("tile-0", _top(tile_size=0), "tile_size"),
    ("tile-not-multiple", _top(tile_size=102), "tile_size"),
    ("tile-float", _top(tile_size=64.0), "tile_size"),
    ("window-not-multiple", _top(window=102), "window"),
    ("window-huge", _top(window=10**6), "window"),
    ("window-text", _top(window="512"), "window"),
    ("threshold-2", _top(threshold=2), "threshold"),
    ("trained-text", _top(trained="no"), "trained"),
    ("colour-reference-text", _top(colour_reference="reinhard"), "colour_reference"),
    # an infinite mean blacked out every chunk (0 nuclei), a NaN spread skipped the normalisation, silently
    ("colour-mean-inf", _top(colour_reference={"method": "reinhard-lab", "mean": [float("inf"), 130, 120],
                                               "std": [40, 8, 6]}), "colour_reference"),
    ("colour-mean-1e300", _top(colour_reference={"method": "reinhard-lab", "mean": [1e300, 130, 120],
                                                 "std": [40, 8, 6]}), "from 0 to 255"),
    ("colour-std-nan", _top(colour_reference={"method": "reinhard-lab", "mean": [140, 130, 120],
                                              "std": [40, float("nan"), 6]}), "finite numbers"),
    ("colour-std-text", _top(colour_reference={"method": "reinhard-lab", "mean": [140, 130, 120],
                                               "std": [40, "8", 6]}), "finite numbers"),
    ("colour-max-scale-inf", _top(colour_reference={"method": "reinhard-lab", "mean": [140, 130, 120],
                                                    "std": [40, 8, 6], "max_scale": float("inf")}), "finite numbers"),
    ("colour-empty", _top(colour_reference={}), "null for none"),
    ("colour-method", _top(colour_reference={"method": "macenko", "mean": [140, 130, 120], "std": [40, 8, 6]}),
     "unknown colour normalisation 'macenko'"),
    ("name-missing", _without("name"), "lacks required fields"),
    ("version-number", _top(version=3), "version"),
    ("metrics-list", _top(metrics=[0.5]), "metrics"),
    ("card-is-a-list", lambda card: [card], "JSON object"),
    ("card-is-null", lambda card: None, "JSON object"),
]


@pytest.mark.parametrize("change, words", [c[1:] for c in MALFORMED_CARDS], ids=[c[0] for c in MALFORMED_CARDS])
def test_malformed_card_is_one_clear_error(model_dir, change, words):
    _edit_card(model_dir, change)
    with pytest.raises(ModelError, match=words.replace("(", r"\(")):
        load_model(str(model_dir))


def test_the_card_window_sets_the_predictor_windows(model_dir):
    """``window`` (inference) is separate from ``tile_size`` (training patch); null or absent means the patch."""
    from dannucnet.engine import Predictor

    assert Predictor(load_model(str(model_dir)), device="cpu").tile == 64
    _edit_card(model_dir, _top(window=128))
    loaded = load_model(str(model_dir))
    assert (loaded.card.tile_size, loaded.card.window) == (64, 128)
    assert Predictor(loaded, device="cpu").tile == 128
    assert Predictor(loaded, device="cpu", tile_size=96).tile == 96  # a caller's own choice wins
    _edit_card(model_dir, _top(window=None))
    assert Predictor(load_model(str(model_dir)), device="cpu").tile == 64


def test_card_that_is_not_utf8_is_one_clear_error(model_dir):
    (model_dir / "model_card.json").write_bytes(b'{"name": "caf\xe9", "version": "1"}')
    with pytest.raises(ModelError, match="not UTF-8"):
        load_model(str(model_dir))


def _image(path: Path) -> Path:
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("command", ["segment", "serve"])
def test_cli_and_server_start_up_print_one_line_and_exit_2(model_dir, tmp_path, capsys, command):
    _edit_card(model_dir, _arch(base_filters=1e9))
    out = tmp_path / "n.geojson"
    if command == "segment":
        argv = ["segment", str(_image(tmp_path / "s.png")), "-o", str(out), "--mpp", "0.25", "--model", str(model_dir)]
    else:
        argv = ["serve", "--model", str(model_dir), "--port", "0", "--http-port", "-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dannucnet {command}: error: ") and "base_filters" in err[0], err
    assert not out.exists()


# -- the weights ------------------------------------------------------------------------------------------


def _edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:  # changes in place
    path = folder / "weights.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def _put(key: str, value: float):
    def change(state):
        state[key].view(-1)[0] = value
    return change


def _as(dtype: torch.dtype, float_ones: bool = True):
    def change(state):
        for key, value in state.items():
            if value.is_floating_point() == float_ones:
                state[key] = value.to(dtype)
    return change


BROKEN_WEIGHTS = [
    ("nan-in-a-conv", _put("encoders.0.deep.0.0.weight", float("nan")), "NaN"),
    ("inf-in-a-conv", _put("encoders.0.deep.0.0.weight", float("inf")), "infinite"),
    ("nan-in-running-var", _put("encoders.0.deep.0.2.running_var", float("nan")), "NaN"),
    ("minus-inf-in-running-var", _put("encoders.0.deep.0.2.running_var", float("-inf")), "infinite"),
    ("floats-stored-as-int64", _as(torch.int64), "int64"),
    ("counters-stored-as-float", _as(torch.float32, float_ones=False), "float32"),
]


@pytest.mark.parametrize("change, words", [c[1:] for c in BROKEN_WEIGHTS], ids=[c[0] for c in BROKEN_WEIGHTS])
def test_broken_weights_are_refused(model_dir, change, words):
    keys = load_file(str(model_dir / "weights.safetensors"))
    assert "encoders.0.deep.0.0.weight" in keys and "encoders.0.deep.0.2.running_var" in keys  # the names used above
    _edit_weights(model_dir, change)
    with pytest.raises(ModelError, match=words):
        load_model(str(model_dir))


def test_overflowed_fp16_variance_still_loads(model_dir, caplog):
    """+inf in a BatchNorm running_var is what older fp16 files hold; it loads, with its warning."""
    _edit_weights(model_dir, _put("encoders.0.deep.0.2.running_var", float("inf")))
    network = load_model(str(model_dir)).network
    assert torch.isinf(network.state_dict()["encoders.0.deep.0.2.running_var"]).sum() == 1
    assert "infinite variance" in caplog.text


def test_the_shipped_card_passes_the_schema():
    from dannucnet.model.card import validate_card
    from dannucnet.model.registry import REPO_MODELS

    for path in REPO_MODELS.glob("*/model_card.json"):
        validate_card(json.loads(path.read_text(encoding="utf-8")), path)


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def test_the_shipped_cards_and_reports_are_strict_json():
    """No NaN or Infinity: QuPath's JsonSlurper, browsers' JSON.parse and jq refuse them."""
    from dannucnet.model.registry import REPO_MODELS

    paths = [*REPO_MODELS.glob("*/model_card.json"), *REPO_MODELS.glob("*/evaluation/*.json")]
    assert len(paths) >= 4
    for path in paths:
        json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse)


def test_a_number_too_large_for_a_float_is_one_clear_error(model_dir):
    """json reads 10**400 as an int; math.isfinite() of it raised OverflowError, a traceback."""
    _edit_card(model_dir, _top(threshold=10**400))
    with pytest.raises(ModelError, match="threshold"):
        load_model(str(model_dir))
