"""Predictors by model, loaded on first use and kept: ``--model auto`` and per-request models.

One model's network takes about 37 MB in fp32 and a second to load, so each model is loaded
once per process, when an image (or request) first needs it, and shared after that.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from dannucnet.catalogue import AUTO, AUTO_FAST, AUTO_NAMES, choose_model
from dannucnet.errors import ModelError
from dannucnet.model.registry import resolve_model_dir
from dannucnet.protocols import Predictor

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Predictor)


class PredictorPool(Generic[P]):
    """``factory(name_or_path_or_None)`` builds a predictor; the pool keeps one per model folder.

    ``default`` is what an image gets when nothing else is asked: a model name or path,
    or ``"auto"`` (choose by the image's pixel size, :func:`~dannucnet.catalogue.choose_model`),
    or ``"auto-fast"`` (the same, then the cheapest network).
    """

    def __init__(self, factory: Callable[[str | None], P], default: str | None = AUTO) -> None:
        self.factory = factory
        self.default = default or AUTO
        self._predictors: dict[str, P] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None) -> P:
        """The predictor of this model (``None``: the default model), loading it the first time."""
        key = _key(name)
        with self._lock:  # one load per model, even when requests ask for it at once
            predictor = self._predictors.get(key)
            if predictor is None:
                predictor = self.factory(name)
                self._predictors[key] = predictor
            return predictor

    def add(self, name: str | None, predictor: P) -> None:
        """Hand the pool a predictor already built (the server's startup model)."""
        with self._lock:
            self._predictors[_key(name)] = predictor

    def for_image(self, mpp: float | None, requested: str | None = None) -> tuple[P, str]:
        """(predictor, why) for an image of ``mpp`` µm/px; ``requested`` overrides the pool's default."""
        name = requested or self.default
        if name not in AUTO_NAMES:
            return self.get(name), f"model {name} as asked"
        entry, reason = choose_model(mpp, fast=name == AUTO_FAST)
        if entry is None:
            return self.get(None), reason + ": the default model"
        return self.get(entry.path), f"--model {name}: {reason}"

    def loaded(self) -> list[P]:
        with self._lock:
            return list(self._predictors.values())


def _key(name: str | None) -> str:
    """The same model named by name or by path shares one predictor."""
    if name in (None, *AUTO_NAMES, "untrained"):
        return str(name)
    try:
        return str(resolve_model_dir(name).resolve())
    except ModelError:  # e.g. "built-in": not a folder; the factory reports unknown names itself
        return name
