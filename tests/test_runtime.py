"""The network's runtimes (engine.runtime): choice, fallback, the ONNX export's cache, and agreement with PyTorch.

Tolerances (logits, fixed seeded inputs, a small distance-head network): ONNX Runtime fp32 and
OpenVINO forced to f32 agree with PyTorch to 1e-3 (float reordering only); OpenVINO at its default
CPU precision (bf16 where the CPU has it) to 0.05 in probability on average, with under 1 % of
mask pixels flipped (measured here on the shipped weights: 0.12 %).
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import numpy as np
import pytest
import torch

from dannucnet.engine import Predictor
from dannucnet.engine.runtime import build_forward, onnx_path, resolve_runtime, runtime_available, weights_key
from dannucnet.engine.tile_engine import TileEngine
from dannucnet.errors import InputError
from dannucnet.model import LoadedModel, ModelCard, ModelConfig
from dannucnet.model.network import DANNucNet

SMALL = ModelConfig(base_filters=16, depth=2, distance_head=True)
CPU = torch.device("cpu")


def needs(module: str):
    reason = f"{module} not usable here: pip install 'dannucnet[fast]'"
    return pytest.mark.skipif(runtime_available(module) is not None, reason=reason)


@pytest.fixture(scope="module")
def small() -> LoadedModel:
    torch.manual_seed(0)
    network = DANNucNet(SMALL).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the export must carry them
        for m in network.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    card = ModelCard(name="small-test", version="0", architecture=SMALL.to_dict(), tile_size=64)
    return LoadedModel(network=network, card=card, source="built-in")


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """One user cache for the module, so each network is exported once here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DANNUCNET_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _inputs(n: int = 3, side: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(7).random((n, 3, side, side), dtype=np.float32))


# ---- choice and fallback ------------------------------------------------------
def test_explicit_torch_and_gpu_choices():
    assert resolve_runtime("torch", CPU) == "torch"
    assert resolve_runtime("auto", torch.device("cuda")) == "torch"  # a GPU runs PyTorch
    with pytest.raises(InputError, match="CPU only"):
        resolve_runtime("openvino", torch.device("cuda"))
    with pytest.raises(InputError, match="unknown runtime 'tensorrt'"):
        resolve_runtime("tensorrt", CPU)


@needs("openvino")
def test_auto_picks_openvino_on_the_cpu():
    assert resolve_runtime("auto", CPU) == "openvino"
    assert resolve_runtime(None, CPU) == "openvino"


@pytest.mark.parametrize("requested, missing", [("auto", "openvino"), ("openvino", "openvino"),
                                                ("onnxruntime", "onnxruntime"), ("auto", "onnx")])
def test_absent_runtime_falls_back_to_torch_with_one_line(requested, missing, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    with caplog.at_level(logging.WARNING, logger="dannucnet.engine.runtime"):
        assert resolve_runtime(requested, CPU) == "torch"
    lines = [r.getMessage() for r in caplog.records]
    wanted = "openvino" if requested == "auto" else requested
    assert len(lines) == 1 and f"runtime {wanted} unavailable ({missing} is not installed" in lines[0]
    assert "PyTorch" in lines[0]


def test_predictor_without_the_runtime_reports_torch(small, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    predictor = Predictor(small, device="cpu", runtime="auto")
    assert predictor.runtime == "torch" and predictor.forward is predictor.network
    assert predictor.description == "cpu (torch fp32)"


# ---- export and cache ----------------------------------------------------------
def test_export_is_cached_beside_the_weights_and_reused(small, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("DANNUCNET_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    source.mkdir()
    with caplog.at_level(logging.INFO, logger="dannucnet.engine.runtime"):
        first = onnx_path(small.network, str(source), tile=64)
        again = onnx_path(small.network, str(source), tile=64)
    assert first == again == source / ".runtime-cache" / f"dannucnet-{weights_key(small.network)}-64.onnx"
    assert sum("exported" in r.getMessage() for r in caplog.records) == 1
    assert not list((tmp_path / "cache").glob("**/*.onnx"))


def test_unwritable_model_folder_falls_back_to_the_user_cache(small, tmp_path, monkeypatch):
    monkeypatch.setenv("DANNUCNET_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "readonly-model"
    source.mkdir()
    (source / ".runtime-cache").write_text("a file where the cache folder would go")  # cannot be created
    path = onnx_path(small.network, str(source), tile=64)
    assert path.parent == tmp_path / "cache" / "onnx" and path.is_file()


def test_other_weights_get_another_export(small):
    torch.manual_seed(1)
    other = DANNucNet(SMALL).eval()
    assert weights_key(other) != weights_key(small.network)
    copy = DANNucNet(SMALL).eval()
    copy.load_state_dict(small.network.state_dict())
    assert weights_key(copy) == weights_key(small.network)  # the key is the weights', not the object's


# ---- agreement with PyTorch ----------------------------------------------------
def _torch_logits(network, x):
    with torch.inference_mode():
        return network(x)


@needs("onnxruntime")
def test_onnxruntime_matches_pytorch_fp32(small):
    forward, name, precision = build_forward("onnxruntime", small.network, None, 64)
    assert (name, precision) == ("onnxruntime", "fp32")
    x = _inputs()
    out = forward(x)
    assert out.shape == (3, 2, 64, 64)  # dynamic batch, both heads
    assert (out - _torch_logits(small.network, x)).abs().max().item() < 1e-3
    assert forward(x[:1]).shape == (1, 2, 64, 64)


@needs("openvino")
def test_openvino_f32_matches_pytorch(small):
    forward, name, precision = build_forward("openvino", small.network, None, 64, precision="fp32")
    assert (name, precision) == ("openvino", "fp32")
    x = _inputs()
    assert (forward(x) - _torch_logits(small.network, x)).abs().max().item() < 1e-3


@needs("openvino")
def test_openvino_default_precision_stays_close(small):
    forward, name, precision = build_forward("openvino", small.network, None, 64)
    assert name == "openvino" and precision in ("bf16", "fp32", "fp16")
    x = _inputs()
    got, ref = torch.sigmoid(forward(x)), torch.sigmoid(_torch_logits(small.network, x))
    assert (got - ref).abs().mean().item() < 0.05
    assert ((got > 0.5) != (ref > 0.5)).float().mean().item() < 0.01


@needs("openvino")
def test_predictor_and_tile_engine_run_on_openvino(small):
    rgb = np.random.default_rng(3).integers(0, 256, (150, 100, 3), dtype=np.uint8)
    reference = Predictor(small, device="cpu", runtime="torch", overlap=16)
    fast = Predictor(small, device="cpu", runtime="openvino", overlap=16)
    assert fast.runtime == "openvino" and fast.description.startswith("cpu (openvino ")
    got = fast.predict(rgb)
    assert got.shape == (150, 100, 2)
    assert np.abs(got - reference.predict(rgb)).mean() < 0.05
    assert np.abs(TileEngine(fast, batch_size=3).predict(rgb) - got).max() < 1e-4  # same forward, same blend


@needs("openvino")
def test_another_window_size_gets_its_own_export(small):
    """The export's window side is static: a predictor with other windows must not load the first one's file
    (it used to, and OpenVINO then refused every window: 'Can not clone with new dims')."""
    rgb = np.random.default_rng(4).integers(0, 256, (150, 100, 3), dtype=np.uint8)
    first = Predictor(small, device="cpu", runtime="openvino", overlap=16)
    wider = Predictor(small, device="cpu", runtime="openvino", overlap=16, tile_size=128)
    assert (first.tile, wider.tile) == (64, 128) and wider.runtime == "openvino"
    assert onnx_path(small.network, small.source, 64) != onnx_path(small.network, small.source, 128)
    reference = Predictor(small, device="cpu", runtime="torch", overlap=16, tile_size=128).predict(rgb)
    assert np.abs(wider.predict(rgb) - reference).mean() < 0.05


@needs("openvino")
def test_a_card_window_and_its_patch_both_run_on_the_runtime(small, caplog):
    """Card window 128, patch 64: each image gets the side that costs least, and the second side is exported
    and compiled on first use, on the same runtime (never a silent fall back to PyTorch)."""
    card = dataclasses.replace(small.card, window=128)
    model = LoadedModel(network=small.network, card=card, source=small.source)
    fast = Predictor(model, device="cpu", runtime="openvino", overlap=16)
    reference = Predictor(model, device="cpu", runtime="torch", overlap=16)
    assert fast.sides == (128, 64) and fast.forward.sides == (128,)
    rng = np.random.default_rng(5)
    with caplog.at_level(logging.WARNING, logger="dannucnet.engine.runtime"):
        for shape, side in (((50, 60, 3), 64), ((352, 300, 3), 128)):
            rgb = rng.integers(0, 256, shape, dtype=np.uint8)
            assert fast.window_for(*shape[:2]) == side
            got = fast.predict(rgb)
            assert got.shape[:2] == shape[:2] and np.abs(got - reference.predict(rgb)).mean() < 0.05
    assert set(fast.forward.sides) == {128, 64} and not caplog.records


@needs("onnxruntime")
def test_shipped_model_agrees_on_onnxruntime():
    from dannucnet.model import load_model
    from dannucnet.model.registry import DEFAULT_MODEL, resolve_model_dir

    try:
        resolve_model_dir(DEFAULT_MODEL)
    except Exception:  # noqa: BLE001
        pytest.skip("the shipped model is not installed")
    loaded = load_model(DEFAULT_MODEL)
    forward, _, _ = build_forward("onnxruntime", loaded.network, None, 256)  # source None: user cache only
    x = _inputs(1, 256)
    assert (forward(x) - _torch_logits(loaded.network, x)).abs().max().item() < 1e-2


@pytest.mark.parametrize("runtime", ["torch", pytest.param("onnxruntime", marks=needs("onnxruntime"))])
def test_model_info_names_the_runtime(small, runtime):
    from dannucnet.service.servicer import SegmentationService

    info = SegmentationService(Predictor(small, device="cpu", runtime=runtime)).model_info()
    assert info.device == f"cpu ({runtime} fp32)"


@needs("onnxruntime")
def test_cli_reports_the_runtime(tmp_path, capsys):
    from dannucnet.cli import main
    from dannucnet.slides.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "slide.tif", (256, 256), seed=2, mpp=0.25).path
    code = main(["segment", str(slide), "-o", str(tmp_path / "n.geojson.gz"), "-q", "--model", "untrained",
                 "--runtime", "onnxruntime", "--region", "0,0,256,256", "--no-tissue-detection"])
    assert code == 0
    assert "on cpu (onnxruntime fp32)" in capsys.readouterr().out


def test_cli_rejects_an_unknown_runtime_in_one_line(capsys):
    from dannucnet.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["segment", "x.tif", "-o", "y.geojson", "--runtime", "tensorrt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "invalid choice: 'tensorrt'" in err[-1]
