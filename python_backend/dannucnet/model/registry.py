"""Resolve ``--model NAME|PATH`` to a model folder.

Search order for a name: folders listed in ``DANNUCNET_MODELS`` (os.pathsep
separated), then the repository's ``models/``. ``None`` means the default model;
when its weights are absent the built-in untrained network is used and the
card says so plainly (``trained: false``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dannucnet.errors import ModelError
from dannucnet.model.card import CARD_FILE, ModelCard
from dannucnet.model.weights import LoadedModel, load_weights, untrained_model

DEFAULT_MODEL = "dannucnet-monuseg"
REPO_MODELS = Path(__file__).resolve().parents[3] / "models"
log = logging.getLogger(__name__)


def search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("DANNUCNET_MODELS", "").split(os.pathsep) if p]
    return [*extra, REPO_MODELS]


def available_models() -> list[str]:
    names = {p.parent.name for root in search_path() if root.is_dir() for p in root.glob(f"*/{CARD_FILE}")}
    return sorted(names | {"untrained"})


def resolve_model_dir(name_or_path: str) -> Path:
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        return candidate
    if candidate.name == CARD_FILE and candidate.is_file():
        return candidate.parent
    for root in search_path():
        if (root / name_or_path / CARD_FILE).is_file():
            return root / name_or_path
    raise ModelError(
        f"unknown model {name_or_path!r}: not a model folder and not one of {', '.join(available_models())} "
        f"(add folders to DANNUCNET_MODELS to search elsewhere)"
    )


def load_model(name_or_path: str | None = None) -> LoadedModel:
    """Load weights + card on the CPU; the engine moves the network to its device."""
    if name_or_path == "untrained":
        return untrained_model()
    if name_or_path is None:
        try:
            directory = resolve_model_dir(DEFAULT_MODEL)
        except ModelError:
            log.warning("default model %s is not installed: using an UNTRAINED network", DEFAULT_MODEL)
            return untrained_model()
    else:
        directory = resolve_model_dir(name_or_path)
    card = ModelCard.load(directory)
    return LoadedModel(network=load_weights(directory, card), card=card, source=str(directory))
