"""Weights on disk: safetensors (no pickle, so a model file can never run code) + model card."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from dannucnet.atomic import write_bytes
from dannucnet.errors import ModelError
from dannucnet.model.card import CARD_FILE, WEIGHTS_FILE, ModelCard
from dannucnet.model.network import DANNucNet, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    network: DANNucNet
    card: ModelCard
    source: str  # folder it came from, or "built-in"


def save_model(directory: str | os.PathLike[str], network: DANNucNet, card: ModelCard, half: bool = True) -> Path:
    """Write weights + card atomically; fp16 halves the file with no visible effect on masks."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    card.architecture = network.config.to_dict()
    state = {k: _stored(v.detach().to("cpu"), half).contiguous() for k, v in network.state_dict().items()}
    # serialised in memory (a few MB): safetensors' save_file writes its own 0600 file over any path it is given
    write_bytes(directory / WEIGHTS_FILE, save(state, metadata={"name": card.name, "version": card.version}))
    card.save(directory)
    return directory


def _stored(tensor: torch.Tensor, half: bool) -> torch.Tensor:
    """fp16 where it loses nothing that matters, fp32 where a value would overflow fp16 (±65504):
    BatchNorm variances at the bottleneck reach 10⁵, and as inf they would silence their channels."""
    if not (half and tensor.is_floating_point()):
        return tensor
    halved = tensor.half()
    if torch.isfinite(halved).all() or not torch.isfinite(tensor[~torch.isfinite(halved)]).any():
        return halved
    return tensor.float()


#: Largest network a card may ask for: 10x the shipped model's 9.3 M parameters (37 MB in fp32). The
#: schema bounds each field; this bounds their product (base_filters 512 at depth 6 would be 9.5 G).
MAX_PARAMETERS = 100_000_000


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the network ``config`` describes, counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in DANNucNet(config).parameters())


def build_network(card: ModelCard, path: Path) -> DANNucNet:
    """The card's network, after checking that building it costs a sane amount of memory."""
    config = card.config
    count = parameter_count(config)
    if count > MAX_PARAMETERS:
        raise ModelError(
            f"{path}: its architecture has {count / 1e6:,.0f} M parameters, more than the {MAX_PARAMETERS / 1e6:.0f} M "
            f"any DAN-NucNet needs; the card is wrong"
        )
    return DANNucNet(config)


def check_tensors(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights of the wrong kind (a float stored as an integer, or the reverse) or not finite.

    One exception, as before: +inf in a BatchNorm ``running_var``, which older fp16 files hold where a
    variance overflowed 65504; such a channel outputs a constant, as measured (see load_weights).
    """
    for key, want in expected.items():
        got = state[key]
        if got.is_floating_point() != want.is_floating_point() or got.is_complex():
            raise ModelError(
                f"{path}: tensor {key} is stored as {str(got.dtype).replace('torch.', '')} but the network needs "
                f"{'floating-point' if want.is_floating_point() else 'integer'} values; "
                "the file is not DAN-NucNet weights"
            )
        if not got.is_floating_point():
            continue
        finite = torch.isfinite(got)
        if finite.all():
            continue
        overflowed = key.endswith("running_var") and bool((got[~finite] == float("inf")).all())
        if not overflowed:
            nan = int(torch.isnan(got).sum())
            raise ModelError(
                f"{path}: tensor {key} holds {nan} NaN and {int((~finite).sum()) - nan} infinite values; "
                f"these weights are broken (a diverged training run?)"
            )


def state_differences(expected: dict[str, torch.Tensor], state: Any) -> str:
    """Why ``state`` cannot load into a network whose state is ``expected``, in a few words ("" when it can):
    the weights file of a model, or the network in a training checkpoint."""
    if not isinstance(state, dict):
        return "no network state"
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shaped = [k for k in expected if k in state and tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)]
    if not (missing or unexpected or shaped):
        return ""
    return (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shaped)} mis-shaped tensors, "
            f"e.g. {(missing + unexpected + shaped)[:3]}")


def load_weights(directory: Path, card: ModelCard) -> DANNucNet:
    path = directory / WEIGHTS_FILE
    network = build_network(card, directory / CARD_FILE)
    try:
        state = load_file(str(path))
    except FileNotFoundError as exc:
        raise ModelError(f"{directory} has a {CARD_FILE} but no {WEIGHTS_FILE}") from exc
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file: {exc}") from exc
    expected = network.state_dict()
    differences = state_differences(expected, state)
    if differences:
        raise ModelError(f"weights in {path} do not match the architecture in its model card ({differences})")
    check_tensors(state, expected, path)
    network.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    silent = overflowed_channels(network)
    if silent:
        log.warning(
            "%s: %d BatchNorm channels have an infinite variance (an older fp16 file overflowed) and output a "
            "constant; the model works as measured, and fine-tuning it (dannucnet train --init-from) revives them",
            path, sum(int(mask.sum()) for mask in silent.values()),
        )
    return network.eval()


def overflowed_channels(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm module name → boolean mask of its channels with a non-finite running variance."""
    return {
        name: ~torch.isfinite(module.running_var)
        for name, module in network.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d) and module.running_var is not None
        and not torch.isfinite(module.running_var).all()
    }


def untrained_model(seed: int = 0) -> LoadedModel:
    """A deterministic randomly initialised network: lets every door run before weights exist."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        network = DANNucNet().eval()
    finally:
        torch.random.set_rng_state(generator_state)
    card = ModelCard(
        name="untrained",
        version="0",
        trained=False,
        description="Randomly initialised DAN-NucNet (seed 0). Its polygons are meaningless: train or install weights.",
    )
    return LoadedModel(network=network, card=card, source="built-in")
