"""The shapes the doors hand each other: progress, cancellation, a segmenter and a predictor.

Torch-free and cheap to import (numpy only; the types it names are imported for the type
checker only), so that the client, the QuPath batch and the jobs can all say
what they take without loading the engine.

* :data:`Progress` – how far a slide (or region) is, in chunks, with the nuclei
  found so far. Every chunk runner calls it: the standalone and pipelined
  runners, the server's SegmentSlide stream as the client relays it, and the
  jobs and QuPath batch that print it.
* :class:`Segmenter` – where the model runs for a whole image file: in this
  process or on a ``dannucnet serve`` server (``jobs.segmenters``), with the
  same nuclei either way.
* :class:`Predictor` – a model ready to turn RGB into a probability map. Two
  classes implement it: the engine's ``engine.predictor.Predictor`` (the network
  on one device) and the server's ``service.batched_predictor.BatchedPredictor``
  (the same, with every window going through the shared micro-batcher); the
  pipeline, the service, the jobs and the evaluation are typed with it, so
  either plugs in.
* :data:`Cancel` – cancellation travels one way: an explicit callable handed down
  the calls (``segment_slide`` → ``segment_region`` → ``Predictor.predict`` → the
  window loop, and on the server → the micro-batcher). Not a context variable:
  work crosses threads (the slide reader, the pipelined runner's model thread,
  the micro-batcher's worker), and a context variable does not follow it there;
  a parameter is visible in every signature that can stop, and the doors that
  have no client call (command line, cohort jobs) pass their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch
    from shapely.geometry.base import BaseGeometry

    from dannucnet.geometry.ownership import Rect
    from dannucnet.model.card import ModelCard
    from dannucnet.pipeline.types import Nucleus
    from dannucnet.slides import ImageSource

__all__ = ["Cancel", "Predictor", "Progress", "Segmenter", "TileFunction", "WindowProgress"]

#: True once the work should stop; asked between batches of windows and between chunks.
Cancel = Callable[[], bool]

#: ``progress(chunks_done, chunks_total, nuclei_so_far)``: called with ``(0, total, 0)`` once the
#: chunks are planned, then after each chunk, in chunk order.
Progress = Callable[[int, int, int], None]


class Segmenter(Protocol):
    """Segments one image file; regions, ROIs and nuclei are in the *file's* level-0 pixel coordinates.

    ``model_*`` name the model that segments (what the QuPath batch tags its detections and its ledger
    with); ``device`` says where it runs, for the log.
    """

    model_name: str
    model_version: str
    model_trained: bool
    device: str

    def stream(
        self, source: ImageSource, region: Rect | None = None, rois: list[BaseGeometry] | None = None,
        progress: Progress | None = None, cancel: Cancel | None = None,
    ) -> Iterator[list[Nucleus]]:
        """The nuclei of ``region`` (default: the whole image) inside ``rois`` of an opened image (its
        ``--mpp`` already applied), one list per chunk, in chunk order; ``cancel()`` true stops between
        chunks. The caller opens the image once (a cohort task: its pixel size, model and nuclei)."""
        ...

    def segment(
        self, path: Path, rois: list[BaseGeometry] | None, mpp: float | None, progress: Progress | None
    ) -> list[Nucleus]:
        """All nuclei of the image at once (the QuPath batch writes an image in one go)."""
        ...


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
        """Window side in model pixels that slide chunks are cut to fill (the card's ``window``, else
        its ``tile_size``)."""
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
        within: np.ndarray | None = None,
    ) -> np.ndarray:
        """H×W×3 uint8 at the model's pixel size → H×W probabilities (H×W×C with more channels).

        ``within`` (H×W bool): the pixels whose map is wanted; windows holding none of them, like
        windows of glass, are not run and read 0."""
        ...
