"""Which runtime executes the network: PyTorch, or the ONNX export run by OpenVINO or ONNX Runtime.

Every runtime is a callable ``N×3×T×T float32 tensor → N×C×T×T logits tensor``, so the
predictor's window/blend loop and test-time augmentation run unchanged on top of it.

``auto`` picks OpenVINO on the CPU when it is installed and its CPU plugin loads, else
PyTorch; a GPU always runs PyTorch. Measured on this project's 2-core Xeon (AVX-512,
avx512_bf16, AMX), shipped weights, batch 2 of 256² windows, 2 threads, one process
(``benchmarks/bench_runtime.py --threads``): OpenVINO at its default CPU precision (bf16
there) 68 ms per window, PyTorch eager fp32 195, ONNX Runtime fp32 213 — so ``auto`` never
picks ONNX Runtime; it is there for exact fp32 results from an exported model. Kumar test:
OpenVINO bf16 within 0.07 points of PyTorch fp32 on pixel F1, AJI and PQ (docs/performance.md). A runtime
that is asked for but absent, or whose CPU plugin does not load, falls back to PyTorch with
one log line.

The ONNX file is exported once per weights (key: SHA-256 of the state dict and the
architecture) into a ``.runtime-cache`` folder beside the weights, or, where that folder
cannot be written (a read-only install), into ``$DANNUCNET_CACHE`` or
``~/.cache/dannucnet``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dannucnet.atomic import atomic_path
from dannucnet.errors import InputError, ModelError, OutputError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
#: Python modules each exported runtime needs (``resolve_runtime`` imports them by these names;
#: ``onnx`` is what ``torch.onnx.export`` writes the file with).
RUNTIME_MODULES = {"openvino": ("openvino", "onnx"), "onnxruntime": ("onnxruntime", "onnx")}
#: Opset of the export; 17 is read by OpenVINO ≥ 2023 and ONNX Runtime ≥ 1.13.
ONNX_OPSET = 17
CACHE_FOLDER = ".runtime-cache"

Forward = Callable[[torch.Tensor], torch.Tensor]


def runtime_available(name: str) -> str | None:
    """None when ``name``'s Python package imports and can run on this CPU; else the reason it cannot."""
    modules = []
    for module in RUNTIME_MODULES.get(name, ()):
        try:
            modules.append(importlib.import_module(module))
        except ImportError as exc:
            return f"{module} is not installed ({exc}); pip install 'dannucnet[fast]'"
    if name == "openvino":
        mod = modules[0]
        try:
            if "CPU" not in mod.Core().available_devices:
                return "OpenVINO's CPU plugin does not load on this CPU (it needs SSE4.2 at least)"
        except Exception as exc:  # noqa: BLE001 - any plugin failure means: not usable here
            return f"OpenVINO's CPU plugin does not load: {exc}"
    return None


def resolve_runtime(requested: str | None, device: torch.device) -> str:
    """``--runtime`` + the chosen device → the runtime that will run ('torch', 'openvino', 'onnxruntime').

    ``auto``: OpenVINO on the CPU when usable, else PyTorch. An explicit exported runtime on a
    GPU is an input error; one that is not usable here falls back to PyTorch, said in one line.
    """
    requested = (requested or "auto").lower()
    if requested not in RUNTIMES:
        raise InputError(f"unknown runtime {requested!r}: use one of {', '.join(RUNTIMES)}")
    if requested == "torch":
        return "torch"
    if device.type != "cpu":
        if requested == "auto":
            return "torch"
        raise InputError(f"--runtime {requested} runs on the CPU only; use --device cpu or --runtime torch/auto")
    candidate = "openvino" if requested == "auto" else requested
    reason = runtime_available(candidate)
    if reason is None:
        return candidate
    log.warning("runtime %s unavailable (%s): running the network in PyTorch instead", candidate, reason)
    return "torch"


# ---- export ----------------------------------------------------------------
def weights_key(network: torch.nn.Module) -> str:
    """First 16 hex digits of SHA-256 over the architecture and every tensor of the state dict."""
    digest = hashlib.sha256()
    config = getattr(network, "config", None)
    digest.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True).encode())
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_dirs(source: str | None) -> list[Path]:
    """Where an export may live, in order: beside the weights, then the user cache."""
    user = os.environ.get("DANNUCNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dannucnet"
    )
    dirs = [Path(user) / "onnx"]
    if source and Path(source).is_dir():
        dirs.insert(0, Path(source) / CACHE_FOLDER)
    return dirs


_EXPORT_LOCK = threading.Lock()


def onnx_path(network: torch.nn.Module, source: str | None = None, tile: int = 256) -> Path:
    """The network's ONNX file for ``tile``² windows (dynamic batch, both outputs), exported on first use and cached.

    The window side is fixed in the export (a static shape lets OpenVINO plan its memory once), so it is
    part of the name: one file per weights and window size.
    """
    name = f"dannucnet-{weights_key(network)}-{tile}.onnx"
    dirs = cache_dirs(source)
    with _EXPORT_LOCK:
        for folder in dirs:
            if (folder / name).is_file():
                return folder / name
        errors = []
        for folder in dirs:
            try:
                return _export(network, folder / name, tile)
            except OSError as exc:  # the folder cannot be made
                errors.append(f"{folder}: {exc.strerror or exc}")
            except OutputError as exc:  # the file cannot be written there
                errors.append(str(exc))
    raise ModelError(f"cannot write the ONNX export anywhere ({'; '.join(errors)}); "
                     "set DANNUCNET_CACHE to a writable folder")


def _export(network: torch.nn.Module, path: Path, tile: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = _cpu_copy(network)
    x = torch.zeros((1, 3, tile, tile))
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about the shape check and constant folding
        torch.onnx.export(
            cpu, (x,), str(tmp), input_names=["image"], output_names=["logits"], opset_version=ONNX_OPSET,
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
    log.info("exported the network to %s", path)
    return path


def _cpu_copy(network: torch.nn.Module) -> torch.nn.Module:
    """An fp32 CPU eval copy in the default memory format (the export must not move the live network)."""
    import copy

    cpu = copy.deepcopy(network).to("cpu").float().eval()
    return cpu.to(memory_format=torch.contiguous_format)


# ---- the runtimes -----------------------------------------------------------
class ExportedRuntime:
    """Base: a compiled exported network behind the torch-tensor forward the predictor calls."""

    name = "exported"
    precision = "fp32"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.infer(array))

    def infer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class OpenVINORuntime(ExportedRuntime):
    """OpenVINO's CPU plugin at its default inference precision (bf16 on CPUs with avx512_bf16/AMX, else fp32)."""

    name = "openvino"

    def __init__(self, path: Path, threads: int | None = None, precision: str | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        _compiled_cache(core)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision:
            hints = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
            config["INFERENCE_PRECISION_HINT"] = hints.get(precision, precision)
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = _precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: x})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def _compiled_cache(core: Any) -> None:
    """OpenVINO keeps compiled networks in the user cache: a later start compiles in 0.1 s, not 0.5–1 s
    (measured here)."""
    folder = cache_dirs(None)[0].parent / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(folder)})
    except Exception as exc:  # noqa: BLE001 - a cache is an optimisation
        log.debug("no OpenVINO compile cache in %s: %s", folder, exc)


class OnnxRuntimeRuntime(ExportedRuntime):
    """ONNX Runtime's CPU execution provider (fp32)."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0].astype(np.float32, copy=False)


class WindowSides:
    """An exported network for windows of any side: the export's shape is static, so each side gets its own
    engine, the first one given and any other built on first use (one export and compile per side)."""

    def __init__(self, first: ExportedRuntime, side: int, build: Callable[[int], Forward]) -> None:
        self.name, self.precision = first.name, first.precision
        self._engines: dict[int, Forward] = {side: first}
        self._build = build
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        side = int(x.shape[-1])
        engine = self._engines.get(side)
        if engine is None:
            with self._lock:
                engine = self._engines.get(side)
                if engine is None:
                    engine = self._engines[side] = self._build(side)
        return engine(x)

    @property
    def sides(self) -> tuple[int, ...]:
        """The sides built so far."""
        return tuple(self._engines)


def _precision_name(value: Any) -> str:
    text = str(value).lower()
    return {"bfloat16": "bf16", "float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16"}.get(
        text.replace("<type: '", "").rstrip("'>"), text)


def build_forward(
    runtime: str, network: torch.nn.Module, source: str | None = None, tile: int = 256,
    threads: int | None = None, precision: str | None = None,
) -> tuple[Forward, str, str]:
    """(forward, runtime name, precision) for a runtime name from :func:`resolve_runtime`.

    An export or compile failure falls back to PyTorch with one log line: a faster runtime
    is an optimisation, never a requirement.
    """
    if runtime == "torch":
        return network, "torch", "fp32"

    def start(side: int) -> ExportedRuntime:
        path = onnx_path(network, source, side)
        engine = (OpenVINORuntime(path, threads, precision) if runtime == "openvino"
                  else OnnxRuntimeRuntime(path, threads))
        log.info("network runs on %s (%s) from %s", engine.name, engine.precision, path)
        return engine

    try:
        first = start(tile)
    except Exception as exc:  # noqa: BLE001
        log.warning("runtime %s failed to start (%s: %s): running the network in PyTorch instead",
                    runtime, type(exc).__name__, exc)
        return network, "torch", "fp32"

    def other_side(side: int) -> Forward:
        try:
            return start(side)
        except Exception as exc:  # noqa: BLE001
            log.warning("runtime %s failed to start for %d² windows (%s: %s): running those in PyTorch",
                        runtime, side, type(exc).__name__, exc)
            return network

    return WindowSides(first, tile, other_side), first.name, first.precision
