"""A predictor whose network calls go through the shared micro-batcher.

The engine's ``Predictor.predict`` cuts a region into overlapping windows and
hands them to a ``tile_fn`` in groups; here that function submits the windows
to the :class:`~dannucnet.service.batcher.MicroBatcher`, so windows from many
concurrent requests share forward passes on the one model of the device.
Windowing, blending and resampling stay in the engine — nothing is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dannucnet.protocols import Cancel, TileFunction, WindowProgress
from dannucnet.service.batcher import MicroBatcher

if TYPE_CHECKING:
    import torch

    from dannucnet.engine.predictor import Predictor as EnginePredictor
    from dannucnet.model.card import ModelCard


class BatchedPredictor:
    """A ``dannucnet.protocols.Predictor`` around an engine ``Predictor``; every window goes through one
    batching worker.

    It composes, and leaves the predictor it wraps as it found it: what it shows of it are the
    properties below, and its own batch size travels as an argument. ``max_batch`` defaults to the
    wrapped predictor's batch size (2 on a CPU; on a GPU 32 windows of 256², 8 of 512²); ``predict``
    submits that many windows of a request together, so the worker fills its batches sooner.
    """

    def __init__(self, predictor: EnginePredictor, *, max_batch: int | None = None, max_queue: int = 1024) -> None:
        self.inner = predictor
        self.max_batch = int(max_batch or predictor.batch_size)
        self.batcher = MicroBatcher(
            self._run_batch, max_batch=self.max_batch, max_queue=max_queue, name=str(predictor.device)
        )

    # ---- what it shows of the wrapped predictor -------------------------
    @property
    def card(self) -> ModelCard:
        return self.inner.card

    @property
    def tile(self) -> int:
        return self.inner.tile

    @property
    def overlap(self) -> int:
        return self.inner.overlap

    @property
    def channels(self) -> int:
        return self.inner.channels

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def description(self) -> str:
        return self.inner.description

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        return self.inner.prepare(rgb)

    # ---- the network, through the batcher --------------------------------
    def _run_batch(self, tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One forward pass per window side: requests of different sizes may get different sides
        (``Predictor.window_for``) and still share the batcher."""
        out: list[np.ndarray] = [np.empty(0)] * len(tiles)
        by_side: dict[tuple[int, ...], list[int]] = {}
        for i, tile in enumerate(tiles):
            by_side.setdefault(tile.shape, []).append(i)
        for indices in by_side.values():
            for i, result in zip(indices, self.inner.predict_tiles(np.stack([tiles[i] for i in indices]))):
                out[i] = result
        return out

    def predict_tiles(self, tiles: np.ndarray, cancel: Cancel | None = None) -> np.ndarray:
        """The windows' maps, batched with other requests' windows; dropped unrun once ``cancel()`` is true."""
        return np.stack(self.batcher.submit_many(list(tiles), cancel))

    def predict(
        self,
        rgb: np.ndarray,
        tile_fn: TileFunction | None = None,
        progress: WindowProgress | None = None,
        cancel: Cancel | None = None,
        within: np.ndarray | None = None,
    ) -> np.ndarray:
        def submit(tiles: np.ndarray) -> np.ndarray:
            return self.predict_tiles(tiles, cancel)

        return self.inner.predict(rgb, tile_fn=tile_fn or submit, progress=progress, cancel=cancel,
                                  batch_size=self.max_batch, within=within)

    def close(self) -> None:
        self.batcher.close()
