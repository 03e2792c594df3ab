"""The model card: everything a user (and the loader) must know about a set of weights.

Stored as ``model_card.json`` beside ``weights.safetensors``. The loader
rebuilds the network from ``architecture`` and refuses weights that do not fit
it, so a card can never silently describe another model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dannucnet.atomic import write_text
from dannucnet.errors import ModelError
from dannucnet.model.network import ModelConfig

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class ModelCard:
    name: str
    version: str
    architecture: dict[str, Any] = field(default_factory=lambda: ModelConfig().to_dict())
    mpp: float = 0.25  # µm/px the network was trained at; inputs are resampled to it
    tile_size: int = 256
    threshold: float = 0.5
    normalisation: str = "rgb / 255 (no mean/std, no stain normalisation)"
    # Reinhard target (engine.colour.ColourReference.to_dict()); None = pixels go in as they are
    colour_reference: dict[str, Any] | None = None
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
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelError(f"{directory} has no {CARD_FILE}; it is not a DAN-NucNet model folder") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path} is not valid JSON: {exc}") from exc
        known = set(cls.__dataclass_fields__)
        missing = {"name", "version"} - set(data)
        if missing:
            raise ModelError(f"{path} lacks required fields {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})
