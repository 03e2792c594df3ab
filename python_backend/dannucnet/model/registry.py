"""Resolve ``--model NAME|PATH|auto`` to a model folder, and list the installed models.

Search order for a name: folders listed in ``DANNUCNET_MODELS`` (os.pathsep
separated), then the repository's ``models/``. ``None`` means the default model;
when its weights are absent the built-in untrained network is used and the
card says so plainly (``trained: false``).

The catalogue (:func:`list_models`) reads only model cards, never the network,
and never downloads anything. What ``--model auto`` and ``auto-fast`` do with the list for one
image is :func:`dannucnet.catalogue.choose_model`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dannucnet.catalogue import (  # noqa: F401 - re-exported: the registry is where callers look for them
    AUTO,
    AUTO_FAST,
    AUTO_NAMES,
    DEFAULT_MODEL,
    UPSAMPLE_TOLERANCE,
    CatalogueEntry,
    choose_model,
    headline_metrics,
)
from dannucnet.errors import ModelError
from dannucnet.model.card import CARD_FILE, WEIGHTS_FILE, ModelCard
from dannucnet.model.weights import LoadedModel, load_weights, untrained_model

REPO_MODELS = Path(__file__).resolve().parents[3] / "models"
log = logging.getLogger(__name__)
_WARNED: set[str] = set()


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
    """Load weights + card on the CPU; the engine moves the network to its device.

    ``"auto"`` without an image to choose for is the default model (``None``); ``"auto-fast"`` the
    cheapest model of the default model's pixel size.
    """
    if name_or_path == AUTO_FAST:
        entry, _ = choose_model(None, fast=True)
        name_or_path = entry.path if entry is not None else None
    if name_or_path == AUTO:
        name_or_path = None
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


def list_models() -> list[CatalogueEntry]:
    """Installed models, by name; a name in ``DANNUCNET_MODELS`` hides the same name in ``models/``
    (the order :func:`resolve_model_dir` searches). A folder whose card cannot be read is skipped
    with a warning, so one broken folder does not hide the others."""
    entries: dict[str, CatalogueEntry] = {}
    for root in search_path():
        if not root.is_dir():
            continue
        for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
            directory = card_path.parent
            if directory.name in entries:
                continue
            try:
                card = ModelCard.load(directory)
                mpp = float(card.mpp)
            except (ModelError, TypeError, ValueError) as exc:
                if str(directory) not in _WARNED:  # once per folder: the list is read for every image
                    _WARNED.add(str(directory))
                    log.warning("skipping %s: %s", directory, exc)
                continue
            entries[directory.name] = CatalogueEntry(
                name=directory.name, version=str(card.version), mpp=mpp, trained=bool(card.trained),
                licence=str(card.licence or ""), path=str(directory), has_weights=(directory / WEIGHTS_FILE).is_file(),
                card_name=str(card.name), description=str(card.description or ""),
                metrics=headline_metrics(card.metrics, mpp),
                base_filters=card.config.base_filters, depth=card.config.depth,
            )
    return sorted(entries.values(), key=lambda e: (e.mpp, e.name))


