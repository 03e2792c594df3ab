"""Resolve ``--model NAME|PATH|auto`` to a model folder, and list the installed models.

Search order for a name: folders listed in ``DANNUCNET_MODELS`` (os.pathsep
separated), then the repository's ``models/``. ``None`` means the default model;
when its weights are absent the built-in untrained network is used and the
card says so plainly (``trained: false``).

The catalogue (:func:`list_models`) reads only model cards, never the network,
and never downloads anything. :func:`choose_model` is what ``--model auto``
does for one image: the model whose pixel size suits the image's.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dannucnet.errors import ModelError
from dannucnet.model.card import CARD_FILE, WEIGHTS_FILE, ModelCard
from dannucnet.model.weights import LoadedModel, load_weights, untrained_model

DEFAULT_MODEL = "dannucnet-monuseg"
AUTO = "auto"
#: Largest upsampling ``--model auto`` treats as "the model's own magnification". Scanners call
#: different pixel sizes 40× (Aperio 0.2527, 3DHistech 0.2428, Hamamatsu 0.2265 µm/px) and 20×
#: (0.504, 0.4855, 0.453): within 15 % they are one magnification, and upsampling by 1.15 costs
#: 1.32× the compute; beyond it (e.g. 0.30 µm/px against a 0.25 model) a coarser model is used.
UPSAMPLE_TOLERANCE = 1.15
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

    ``"auto"`` without an image to choose for is the default model (``None``).
    """
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


@dataclass(frozen=True)
class CatalogueEntry:
    """One installed model as ``dannucnet models``, ``GET /v1/models`` and ``ListModels`` show it."""

    name: str  # what --model takes: the folder name
    version: str
    mpp: float
    trained: bool
    licence: str
    path: str
    has_weights: bool
    card_name: str = ""
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # headline scores: split, f1, aji, pq

    @property
    def usable(self) -> bool:
        """Trained and complete: what ``--model auto`` may pick."""
        return self.trained and self.has_weights

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def headline_metrics(metrics: dict[str, Any], mpp: float | None = None) -> dict[str, Any]:
    """Pixel F1, AJI and PQ of the final polygons on the card's Kumar test at the model's own pixel size
    (``kumar-test-0.5mpp``, written by ``evaluate --mpp 0.5 --update-card``), else the Kumar test, else
    the first scored split."""
    scored = {k: v for k, v in (metrics or {}).items() if isinstance(v, dict) and "final_polygons" in v}
    if not scored:
        return {}
    preferred = [f"kumar-test-{mpp:g}mpp" if mpp else "", "kumar-test"]
    split = next((k for k in preferred if k in scored), sorted(scored)[0])
    final = scored[split]["final_polygons"]
    return {"split": split, **{k: float(final[k]) for k in ("f1", "aji", "pq") if k in final}}


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
            )
    return sorted(entries.values(), key=lambda e: (e.mpp, e.name))


def choose_model(
    image_mpp: float | None, entries: list[CatalogueEntry] | None = None
) -> tuple[CatalogueEntry | None, str]:
    """``--model auto`` for one image: (the model, why) — ``None`` when no trained model is installed.

    The finest model that does not upsample the image (beyond :data:`UPSAMPLE_TOLERANCE`) wins:
    a 20× image (0.5 µm/px) gets a 0.5 µm/px model, not a 0.25 one that would run on 4× the
    pixels; a 40× image gets the 0.25 model, whose resolution it has. An image coarser than
    every model gets the coarsest (least upsampling). Ties go to the default model, then the
    higher Kumar-test PQ.
    """
    usable = [e for e in (list_models() if entries is None else entries) if e.usable]
    if not usable:
        return None, "no trained model is installed"

    def rank(e: CatalogueEntry) -> tuple[float, bool, float, str]:
        return (e.mpp, e.name != DEFAULT_MODEL, -e.metrics.get("pq", 0.0), e.name)

    if image_mpp is None or not math.isfinite(image_mpp) or image_mpp <= 0:
        default = [e for e in usable if e.name == DEFAULT_MODEL]
        chosen = default[0] if default else min(usable, key=rank)
        return chosen, f"the image's pixel size is unknown: {chosen.name} ({chosen.mpp:g} µm/px), the default"
    no_upsampling = [e for e in usable if e.mpp * UPSAMPLE_TOLERANCE >= image_mpp]
    if no_upsampling:
        chosen = min(no_upsampling, key=rank)
        coarser = chosen.mpp > image_mpp * 1.01
        how = f"downsampled {chosen.mpp / image_mpp:.2g}×" if coarser else "at about its own resolution"
        return chosen, (f"image at {image_mpp:g} µm/px: {chosen.name} works at {chosen.mpp:g} µm/px, the finest "
                        f"installed model that needs no upsampling (image {how})")
    chosen = max(usable, key=lambda e: (e.mpp, e.name == DEFAULT_MODEL, e.metrics.get("pq", 0.0)))
    return chosen, (f"image at {image_mpp:g} µm/px is coarser than every installed model: {chosen.name} "
                    f"({chosen.mpp:g} µm/px) upsamples it least ({image_mpp / chosen.mpp:.2g}×)")
