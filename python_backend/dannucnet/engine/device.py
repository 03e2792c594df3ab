"""Device and precision choice, in one place, with a say-so when the GPU is not used."""

from __future__ import annotations

import contextlib
import logging

import torch

from dannucnet.errors import InputError

log = logging.getLogger(__name__)


def choose_device(requested: str = "auto") -> torch.device:
    """``auto`` prefers CUDA, then Apple MPS, then CPU; an explicit choice that is unavailable is an error."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        log.info("no GPU available (torch %s, CUDA build: %s): running on the CPU", torch.__version__,
                 torch.version.cuda is not None)
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        raise InputError(f"--device {requested} asked for, but {why}; use --device cpu or auto")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    try:
        return torch.device(requested)
    except RuntimeError as exc:
        raise InputError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from exc


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on GPUs that support it (fp16 otherwise); full fp32 on the CPU, where bf16
    buys little for this network (MODEL_SPEC §4) and would change results."""
    if not enabled or device.type == "cpu":
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, dtype=torch.float16)
