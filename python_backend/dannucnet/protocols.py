"""The shapes the doors hand each other: one progress callback, one segmenter.

Torch-free and cheap to import (the types it names are imported for the type
checker only), so that the client, the QuPath batch and the jobs can all say
what they take without loading the engine.

* :data:`Progress` – how far a slide (or region) is, in chunks, with the nuclei
  found so far. Every chunk runner calls it: the standalone and pipelined
  runners, the server's SegmentSlide stream as the client relays it, and the
  jobs and QuPath batch that print it.
* :class:`Segmenter` – where the model runs for a whole image file: in this
  process or on a ``dannucnet serve`` server (``jobs.segmenters``), with the
  same nuclei either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from dannucnet.geometry.ownership import Rect
    from dannucnet.pipeline.types import Nucleus

__all__ = ["Progress", "Segmenter"]

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
        self, path: Path, region: Rect | None = None, rois: list[BaseGeometry] | None = None,
        mpp: float | None = None, progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
    ) -> Iterator[list[Nucleus]]:
        """The nuclei of ``region`` (default: the whole image) inside ``rois``, one list per chunk, in chunk
        order; ``mpp`` is the pixel size for a file that has none; ``cancel()`` true stops between chunks."""
        ...

    def segment(
        self, path: Path, rois: list[BaseGeometry] | None, mpp: float | None, progress: Progress | None
    ) -> list[Nucleus]:
        """All nuclei of the image at once (the QuPath batch writes an image in one go)."""
        ...
