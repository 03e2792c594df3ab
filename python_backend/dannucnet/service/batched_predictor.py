"""A Predictor look-alike whose network calls go through the shared micro-batcher.

The engine's ``Predictor.predict`` cuts a region into overlapping windows and
hands them to a ``tile_fn`` in groups; here that function submits the windows
to the :class:`~dannucnet.service.batcher.MicroBatcher`, so windows from many
concurrent requests share forward passes on the one model of the device.
Windowing, blending and resampling stay in the engine — nothing is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dannucnet.service.batcher import MicroBatcher
from dannucnet.service.calls import current_call


class BatchedPredictor:
    """Wraps an engine ``Predictor``; every tile goes through one batching worker."""

    def __init__(self, predictor: Any, *, max_batch: int | None = None, max_queue: int = 1024) -> None:
        self.inner = predictor
        self.max_batch = int(max_batch or getattr(predictor, "batch_size", 2))
        if hasattr(predictor, "batch_size"):
            # predict() hands tile_fn up to batch_size windows at a time; submitting a
            # request's windows together lets the worker fill batches sooner.
            predictor.batch_size = self.max_batch
        self.batcher = MicroBatcher(
            self._run_batch, max_batch=self.max_batch, max_queue=max_queue, name=str(predictor.device)
        )

    def __getattr__(self, name: str) -> Any:  # card, device, tile, overlap, model, ...
        return getattr(self.inner, name)

    def _run_batch(self, tiles: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.inner.predict_tiles(np.stack(tiles)))

    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        return np.stack(self.batcher.submit_many(list(tiles)))

    def predict(
        self,
        rgb: np.ndarray,
        tile_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        call = current_call()

        def stop() -> bool:
            return (cancel is not None and cancel()) or (call is not None and not call.alive())

        return self.inner.predict(rgb, tile_fn=tile_fn or self.predict_tiles, progress=progress, cancel=stop)

    def close(self) -> None:
        self.batcher.close()
