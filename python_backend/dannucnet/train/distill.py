"""A narrower DAN-NucNet taught by a wider one: ``dannucnet train --base-filters 16 --init-from M --teacher M``.

The network's cost grows with the square of its width. On a CPU without bf16 (AVX2, fp32) the
network is 95 % of a slide's time, and a 512² window took 1068 ms at the code's 32 base filters
and 380 ms at the paper figure's 16 (OpenVINO fp32, 2 threads, AMD EPYC Zen 3): 2.8× faster.

Two things carry the wide model's knowledge into the narrow one:

- :func:`narrowed` starts the narrow network from the wide one's weights, each layer cut to its
  first channels, so training begins from trained filters rather than noise.
- :class:`Teacher` runs the wide model on each training batch. The narrow one learns its
  probabilities and distances beside the annotations (``--teacher-weight``): the teacher has an
  answer for every pixel, including the nuclei the annotators missed.
"""

from __future__ import annotations

import hashlib

import torch

from dannucnet.engine.runtime import Forward, build_forward, resolve_runtime
from dannucnet.errors import InputError
from dannucnet.model import DANNucNet, ModelConfig
from dannucnet.model.registry import load_model

#: Convolutions whose input is a concatenation of two F-channel tensors: their input channels are cut
#: from each half, not from the front of the whole.
CONCATENATED_INPUTS = ("fuse.weight", "fuse.0.weight")


def narrowed(source: DANNucNet, config: ModelConfig) -> DANNucNet:
    """A network of ``config`` (``base_filters`` at most the source's; otherwise the same architecture)
    holding the source's weights cut to its first channels.

    A weight's input channels are scaled by how many were cut (×2 when 64 become 32), so a layer's
    pre-activations keep about their size; the BatchNorm statistics after it are re-learnt by training.
    """
    wide = source.config.to_dict()
    if {**wide, "base_filters": config.base_filters} != config.to_dict() or config.base_filters > wide["base_filters"]:
        raise InputError(f"can only narrow a network: {wide} cannot start {config.to_dict()}")
    network = DANNucNet(config)
    state = source.state_dict()
    narrow = {}
    for key, target in network.state_dict().items():
        narrow[key] = _cut(key, state[key], target.shape).to(target.dtype)
    network.load_state_dict(narrow)
    return network


def _cut(key: str, weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if weight.dim() == 0:
        return weight.clone()
    cut = weight[: shape[0]]
    if weight.dim() < 2 or weight.shape[1] == shape[1]:
        return _rescaled(cut.clone(), key, weight.shape, shape)
    if key.endswith(CONCATENATED_INPUTS) and key.startswith(("encoders.", "decoders.")):
        half, keep = weight.shape[1] // 2, shape[1] // 2
        cut = torch.cat([cut[:, :keep], cut[:, half: half + keep]], dim=1)
    else:
        cut = cut[:, : shape[1]]
    return _rescaled(cut.clone(), key, weight.shape, shape)


def _rescaled(cut: torch.Tensor, key: str, wide: torch.Size, narrow: torch.Size) -> torch.Tensor:
    """Scale a convolution's weight by its lost fan-in (input channels: dim 1, or dim 0 of a transposed one)."""
    if not key.endswith("weight") or cut.dim() != 4:
        return cut
    transposed = key.startswith("ups.")
    fan_in = 0 if transposed else 1
    return cut * (wide[fan_in] / narrow[fan_in])


class Teacher:
    """A trained model run on training batches (OpenVINO on a CPU where installed, else PyTorch), frozen.

    ``targets(x)`` gives the teacher's nucleus probability and, where it has that head, its distance
    (both 0..1, N×1×H×W) for the batch the student trains on. ``remember=True`` keeps the answer for
    inputs that come back unchanged, the fixed validation patches: the teacher is frozen, so running it
    on them again each epoch only cost time (about 10 s of a 150 s epoch, 48 patches of 144 × 256 run
    in PyTorch on 2 EPYC cores).
    """

    def __init__(self, name_or_path: str, device: torch.device, patch_size: int, student: ModelConfig) -> None:
        loaded = load_model(name_or_path)
        if not loaded.card.trained:  # its answers are noise: a student would learn them
            raise InputError(f"--teacher {name_or_path} is UNTRAINED (random weights: its card says trained: false); "
                             "teach with a trained model")
        self.network = loaded.network.to(device).eval()
        if self.network.config.distance_head is False and student.distance_head:
            raise InputError(f"--teacher {name_or_path} has no distance head to teach the student's")
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.name = loaded.card.name
        runtime = resolve_runtime("auto", device)
        forward, self.runtime, self.precision = build_forward(runtime, self.network, loaded.source, patch_size)
        self.forward: Forward = forward
        self.device = device
        self._remembered: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def targets(self, x: torch.Tensor, remember: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = _fingerprint(x) if remember else b""
        if key in self._remembered:
            return self._remembered[key]
        # the export takes square windows; a validation patch cut from a short held-out strip (144 × 256) is
        # not one, and runs in PyTorch
        square = x.shape[-2] == x.shape[-1]
        logits = (self.forward(x) if square else self.network(x)).float().to(self.device)
        probability = torch.sigmoid(logits[:, :1])
        distance = torch.sigmoid(logits[:, 1:2]) if logits.shape[1] > 1 else None
        if remember:
            self._remembered[key] = (probability, distance)
        return probability, distance


def _fingerprint(x: torch.Tensor) -> bytes:
    """The batch's shape and content: a remembered answer is only given back for the very same input."""
    data = x.detach().to("cpu", torch.float32).contiguous().numpy()
    return repr(tuple(data.shape)).encode() + hashlib.blake2b(data.tobytes(), digest_size=16).digest()
