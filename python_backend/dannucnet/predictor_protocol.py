"""What the rest of the package needs from a predictor, as types that do not load torch.

Two classes implement :class:`Predictor`: the engine's ``engine.predictor.Predictor`` (the
network on one device) and the server's ``service.batched_predictor.BatchedPredictor``
(the same, with every window going through the shared micro-batcher). The pipeline, the
service, the jobs and the evaluation are typed with this protocol, so either plugs in,
and importing it costs numpy only.

Cancellation travels one way: an explicit :data:`Cancel` callable handed down the calls
(``segment_slide`` → ``segment_region`` → ``Predictor.predict`` → the window loop, and on
the server → the micro-batcher). Not a context variable: work crosses threads (the slide
reader, the pipelined runner's model thread, the micro-batcher's worker), and a context
variable does not follow it there; a parameter is visible in every signature that can stop,
and the doors that have no client call (command line, cohort jobs) pass their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from dannucnet.model.card import ModelCard

#: True once the work should stop; asked between batches of windows and between chunks.
Cancel = Callable[[], bool]
#: N×T×T×3 uint8 windows → N maps (T×T, or T×T×C with more than one output channel).
TileFunction = Callable[[np.ndarray], np.ndarray]
#: Windows done, windows in all (of one image).
WindowProgress = Callable[[int, int], None]


@runtime_checkable
class Predictor(Protocol):
    """A model ready to turn RGB at its own pixel size into a probability map."""

    @property
    def card(self) -> ModelCard:
        """The model card: name, version, pixel size (``card.mpp``), window size, threshold."""
        ...

    @property
    def tile(self) -> int:
        """Window side in model pixels (the card's ``tile_size`` unless overridden)."""
        ...

    @property
    def overlap(self) -> int:
        """The least overlap between neighbouring windows, in model pixels."""
        ...

    @property
    def channels(self) -> int:
        """Channels of the maps returned: 1 (H×W probability) or 2 (H×W×2 with distance)."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def description(self) -> str:
        """Device, runtime and precision in one phrase (logs, ModelInfo)."""
        ...

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """What the network is fed for a whole chunk (its colours normalised as in training)."""
        ...

    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """N×T×T×3 uint8 windows of prepared pixels → N maps; no windowing, no blending."""
        ...

    def predict(
        self,
        rgb: np.ndarray,
        tile_fn: TileFunction | None = None,
        progress: WindowProgress | None = None,
        cancel: Cancel | None = None,
    ) -> np.ndarray:
        """H×W×3 uint8 at the model's pixel size → H×W probabilities (H×W×C with more channels)."""
        ...
