"""The model card: everything a user (and the loader) must know about a set of weights.

Stored as ``model_card.json`` beside ``weights.safetensors``. The loader
rebuilds the network from ``architecture`` and refuses weights that do not fit
it, so a card can never silently describe another model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dannucnet.atomic import write_text
from dannucnet.errors import ModelError
from dannucnet.geometry.grey_objects import valid_rule
from dannucnet.model.network import ModelConfig
from dannucnet.values import is_number

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class ModelCard:
    name: str
    version: str
    architecture: dict[str, Any] = field(default_factory=lambda: ModelConfig().to_dict())
    mpp: float = 0.25  # µm/px the network was trained at; inputs are resampled to it
    tile_size: int = 256  # the training patch side, model px
    # Side of the windows the network runs on, model px; None: tile_size. Every pool in the network is local (no
    # global pooling), so any multiple of 2 ** depth sees a nucleus alike; what the side changes is the share of
    # pixels run twice where neighbouring windows overlap (see engine.predictor.Predictor).
    window: int | None = None
    threshold: float = 0.5
    normalisation: str = "rgb / 255 (no mean/std, no stain normalisation)"
    # Reinhard target (engine.colour.ColourReference.to_dict()); None = pixels go in as they are
    colour_reference: dict[str, Any] | None = None
    # objects dropped as grey (geometry.grey_objects.GreyRule.to_dict()); None = every object is kept
    grey_objects: dict[str, float] | None = None
    trained: bool = False
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    licence: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        try:
            return ModelConfig.from_dict(self.architecture)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model card {self.name!r} has an invalid architecture: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def save(self, directory: Path) -> Path:
        return write_text(Path(directory) / CARD_FILE, self.to_json() + "\n")

    @classmethod
    def load(cls, directory: Path) -> ModelCard:
        path = Path(directory) / CARD_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            raise ModelError(f"{directory} has no {CARD_FILE}; it is not a DAN-NucNet model folder") from exc
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ModelError(f"{path} is not UTF-8 text (byte {exc.start}): a model card is UTF-8 JSON") from None
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path} is not valid JSON: {exc}") from None
        return cls(**validate_card(data, path))


# -- the schema ------------------------------------------------------------------------------------------------
#
# Checked before anything is built from a card, so a wrong card is one clear line rather than a
# traceback deep in torch, or a 12 GB allocation (base_filters 1e9). The ranges are wide around what
# the code makes (MODEL_SPEC: 32 filters, depth 4, 256-px tiles at 0.25 µm/px) and tight enough that a
# card cannot ask for absurd work; the network's size is also bounded by MAX_PARAMETERS in weights.py.

#: Pixel sizes a model can have been trained at: 0.01 µm/px is beyond any light microscope, 100 µm/px
#: is a slide thumbnail.
MPP_RANGE = (0.01, 100.0)
#: Window side in model pixels; 64 is the smallest the tests use, 4096 a 200 MB float batch of one.
TILE_RANGE = (64, 4096)
#: Encoder levels: 4 in the paper; 6 already halves a 256-px window to 4 px at the bottleneck.
DEPTH_RANGE = (1, 6)
#: Filters at the first level: 32 in the paper; the parameter count grows with its square.
BASE_FILTERS_MAX = 512
CHANNEL_REDUCTIONS = (8, 16)

_TEXT = ("description", "licence", "normalisation")
_OBJECTS = ("provenance", "training", "metrics")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(path: Path, key: str, value: Any, want: str) -> ModelError:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return ModelError(f"{path}: {key} is {shown}; it must be {want}")


def _in_range(path: Path, key: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if not (_is_int(value) if integer else is_number(value)) or not low <= value <= high:
        raise _bad(path, key, value, f"{kind} from {low:g} to {high:g}")


def validate_architecture(arch: Any, path: Path) -> dict[str, Any]:
    """The ``architecture`` object: known keys only, each of the right type and range."""
    if not isinstance(arch, dict):
        raise _bad(path, "architecture", arch, "an object")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise ModelError(f"{path}: unknown architecture fields {unknown} (known: {sorted(known)})")
    merged = {**ModelConfig().to_dict(), **arch}
    reduction = merged["channel_reduction"]
    if reduction not in CHANNEL_REDUCTIONS or not _is_int(reduction):
        raise _bad(path, "architecture.channel_reduction", reduction, f"one of {CHANNEL_REDUCTIONS}")
    _in_range(path, "architecture.base_filters", merged["base_filters"], reduction, BASE_FILTERS_MAX, integer=True)
    _in_range(path, "architecture.depth", merged["depth"], *DEPTH_RANGE, integer=True)
    _in_range(path, "architecture.bn_momentum", merged["bn_momentum"], 1e-6, 1.0)
    for key in ("spatial_attention", "channel_attention", "distance_head"):
        if not isinstance(merged[key], bool):
            raise _bad(path, f"architecture.{key}", merged[key], "true or false")
    if merged["block"] not in ("residual", "plain"):
        raise _bad(path, "architecture.block", merged["block"], '"residual" or "plain"')
    return dict(arch)


def validate_card(data: Any, path: Path) -> dict[str, Any]:
    """The card's fields the loader uses, checked; unknown top-level keys are ignored (newer cards)."""
    if not isinstance(data, dict):
        raise ModelError(f"{path}: a model card is a JSON object, not a {type(data).__name__}")
    missing = sorted({"name", "version"} - set(data))
    if missing:
        raise ModelError(f"{path} lacks required fields {missing}")
    for key in ("name", "version"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise _bad(path, key, data[key], "a non-empty string")
    card = {k: v for k, v in data.items() if k in ModelCard.__dataclass_fields__}
    if "architecture" in card:
        validate_architecture(card["architecture"], path)
    depth = {**ModelConfig().to_dict(), **card.get("architecture", {})}["depth"]
    if "mpp" in card:
        _in_range(path, "mpp", card["mpp"], *MPP_RANGE)
    if "tile_size" in card:
        _in_range(path, "tile_size", card["tile_size"], *TILE_RANGE, integer=True)
        if card["tile_size"] % 2**depth:
            raise _bad(path, "tile_size", card["tile_size"], f"a multiple of {2**depth} (2 ** depth)")
    if card.get("window") is not None:
        _in_range(path, "window", card["window"], *TILE_RANGE, integer=True)
        if card["window"] % 2**depth:
            raise _bad(path, "window", card["window"], f"a multiple of {2**depth} (2 ** depth)")
    if "threshold" in card and not (is_number(card["threshold"]) and 0 < card["threshold"] < 1):
        raise _bad(path, "threshold", card["threshold"], "a number between 0 and 1")
    if "trained" in card and not isinstance(card["trained"], bool):
        raise _bad(path, "trained", card["trained"], "true or false")
    if not valid_rule(card.get("grey_objects")):
        raise _bad(path, "grey_objects", card["grey_objects"],
                   "null or {max_chroma: 0 to 150, min_lightness: 0 to 100}")
    if card.get("colour_reference") is not None:
        if not isinstance(card["colour_reference"], dict):
            raise _bad(path, "colour_reference", card["colour_reference"], "an object or null")
        from dannucnet.engine.colour import ColourReference

        try:  # the loader's own reading, so a card that passes here also normalises
            ColourReference.from_dict(card["colour_reference"])
        except ValueError as exc:
            raise ModelError(f"{path}: invalid colour_reference: {exc}") from None
    for key in _TEXT:
        if key in card and not isinstance(card[key], str):
            raise _bad(path, key, card[key], "a string")
    for key in _OBJECTS:
        if key in card and not isinstance(card[key], dict):
            raise _bad(path, key, card[key], "an object")
    return card
