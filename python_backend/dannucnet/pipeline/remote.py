"""The chunk loops with the model on a ``dannucnet serve`` server (the client is only the wire).

* :class:`ServerStep` — the step of the one chunk loop
  (:func:`~dannucnet.pipeline.slide.run_slide`): chunks planned exactly as
  :func:`~dannucnet.pipeline.slide.plan_slide` plans them, read here and sent
  as raw RGB with their core, so the nuclei equal ``dannucnet segment`` run
  locally. :func:`segment_image_via_server` runs it on a slide.
* :func:`segment_large_region` — an array too big for one request, as
  overlapping chunks whose cores partition it.

Both return exactly one copy of every nucleus (ownership by centroid in the core).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from shapely.geometry.base import BaseGeometry

from dannucnet.engine.tiling import WindowGrid
from dannucnet.geometry.ownership import Chunk, Rect, plan_chunks
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.slide import SlideWork, ordered_map, read_chunk, run_slide
from dannucnet.pipeline.types import Nucleus
from dannucnet.protocols import Cancel, Progress
from dannucnet.slides import ImageSource

if TYPE_CHECKING:
    from dannucnet.client import DanNucNetClient

#: requests in flight at once: two keep a server busy while this machine reads the next chunk
CONCURRENCY = 2


class ServerStep:
    """Each chunk read here and sent to the server as one SegmentRegion request with its core."""

    def __init__(self, client: DanNucNetClient, concurrency: int = CONCURRENCY, model_mpp: float | None = None) -> None:
        self.client = client
        self.concurrency = concurrency
        self.info = client._info or client.model_info()
        self._model_mpp = model_mpp

    @property
    def model_mpp(self) -> float:
        """The pixel size the chunks are read at: the model the requests name (``model_mpp``), else the
        server's own model's."""
        return float(self._model_mpp or self.info.pixel_size_microns)

    @property
    def windows(self) -> WindowGrid | None:
        """The server's windows, so that chunks fill them as the server's own plan does (None from a server
        older than ``window_overlap``: equal pieces)."""
        if self.info.window_overlap <= 0 or self.info.tile_size <= 0:
            return None
        return WindowGrid(int(self.info.tile_size), int(self.info.window_overlap))

    def nuclei(self, work: SlideWork) -> Generator[list[Nucleus], None, None]:
        plan = work.plan

        def request(chunk: Chunk) -> list[Nucleus]:
            pixels = read_chunk(work.source, chunk, plan.downsample)
            return self.client.segment_region(
                pixels.rgb, origin=pixels.origin, downsample=pixels.downsample, mpp=plan.mpp,
                core=chunk.core, clip=plan.clip, options=work.options,
            )

        yield from ordered_map(request, plan.chunks, in_flight=self.concurrency, name="dannucnet-client")


def segment_image_via_server(
    client: DanNucNetClient,
    source: ImageSource,
    region: Rect | None = None,
    options: SegmentOptions | None = None,
    rois: Sequence[BaseGeometry] | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    concurrency: int = CONCURRENCY,
    model_mpp: float | None = None,
) -> Iterator[list[Nucleus]]:
    """The one chunk loop over ``source`` (a slide on *this* machine), with the model on a server.

    Yields one list of nuclei per chunk, in chunk order; the same nuclei as
    ``pipeline.segment_slide`` with the server's model. ``model_mpp``: the pixel size of the model the
    client's requests name (``client.model``), when that is not the server's own model.
    """
    options = options if options is not None else SegmentOptions()
    step = ServerStep(client, concurrency, model_mpp)  # asks the server's model on the first next(), as before
    yield from run_slide(step, source, region, rois, options, progress, cancel)


def segment_large_region(
    client: DanNucNetClient,
    rgb: np.ndarray,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    mpp: float | None = None,
    clip: BaseGeometry | None = None,
    options: Any = None,
    chunk_size: int = 1024,
    margin: int = 128,
    concurrency: int = CONCURRENCY,
) -> list[Nucleus]:
    """Segment an array of any size as overlapping chunks whose cores partition it.

    ``chunk_size`` and ``margin`` are in pixels of ``rgb``; the margin must
    exceed the largest nucleus. Each nucleus is returned exactly once, by the
    chunk whose core holds its centroid. With cells in ``options`` the margin
    grows by twice the cell expansion, so cells at seams stay exact too.
    """
    height, width = rgb.shape[:2]
    expansion = getattr(options, "cell_expansion_um", None)
    if expansion is None and isinstance(options, Mapping):
        expansion = options.get("cell_expansion_um", options.get("cell_expansion_microns"))
    if expansion and mpp:
        from dannucnet.geometry.cells import cell_margin_px

        margin += cell_margin_px(float(expansion) / (mpp * downsample))
    whole = Rect(0, 0, width, height)
    chunks = plan_chunks(whole, chunk_size, margin, bounds=whole)
    ox, oy = origin

    def run(chunk: Chunk) -> list[Nucleus]:
        read = chunk.read.to_int()
        x0, y0, x1, y1 = (int(v) for v in read.bounds())
        core = Rect(ox + chunk.core.x * downsample, oy + chunk.core.y * downsample,
                    chunk.core.width * downsample, chunk.core.height * downsample)
        return client.segment_region(
            rgb[y0:y1, x0:x1], origin=(ox + x0 * downsample, oy + y0 * downsample),
            downsample=downsample, mpp=mpp, core=core, clip=clip, options=options,
        )

    return [n for nuclei in ordered_map(run, chunks, in_flight=concurrency, name="dannucnet-client") for n in nuclei]
