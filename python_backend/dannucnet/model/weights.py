"""Weights on disk: safetensors (no pickle, so a model file can never run code) + model card."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dannucnet.errors import ModelError
from dannucnet.model.card import CARD_FILE, WEIGHTS_FILE, ModelCard
from dannucnet.model.network import DANNucNet


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
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"name": card.name, "version": card.version})
        os.replace(tmp, directory / WEIGHTS_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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


def load_weights(directory: Path, card: ModelCard) -> DANNucNet:
    network = DANNucNet(card.config)
    path = directory / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except FileNotFoundError as exc:
        raise ModelError(f"{directory} has a {CARD_FILE} but no {WEIGHTS_FILE}") from exc
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file: {exc}") from exc
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise ModelError(
            f"weights in {path} do not match the architecture in its model card "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped tensors, "
            f"e.g. {(missing + unexpected + mismatched)[:3]})"
        )
    network.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return network.eval()


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
