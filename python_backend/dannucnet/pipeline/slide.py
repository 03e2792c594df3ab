"""A whole slide (or parts of it) → nuclei, chunk by chunk, in bounded memory.

The slide is cut into large chunks (3072 model px + a 32 µm margin by
default — 128 px at 0.25 µm/px — plus twice the cell expansion when cells are asked for). Each chunk
owns the nuclei whose centroid lies in its core, so a nucleus on a seam is
reported exactly once and never cut. Chunks without tissue are skipped.
Results are yielded per chunk and never accumulated here: memory stays flat in
slide size.

:func:`run_slide` is the one chunk loop every door uses: plan → a *step* that
turns the plan's chunks into their nuclei → progress and cancellation between
chunks → nuclei in chunk order. The steps: :class:`InProcessStep` (this file:
the next chunk is read while the current one is segmented),
``pipeline.pipelined.PipelinedStep`` (readers, batched model, post-processing
pool overlapped) and ``pipeline.remote.ServerStep`` (the model on a server).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from dannucnet.engine import scale_to_model
from dannucnet.engine.tiling import WindowGrid
from dannucnet.errors import CancelledError, InputError
from dannucnet.geometry.ownership import Chunk, Rect, plan_chunks
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.region import segment_region
from dannucnet.pipeline.types import Nucleus
from dannucnet.protocols import Cancel, Predictor, Progress, TileFunction
from dannucnet.slides import ImageSource

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

#: Most chunks one plan may hold. A 200,000² px slide at the model's pixel size is 9,604 chunks of 2048 px,
#: and 610,000 of the smallest (256 px); a plan is counted before it is made, because a client's made-up
#: size (2**63 px a side) had the server plan until it ran out of memory.
MAX_CHUNKS = 1_000_000


@dataclass
class SlidePlan:
    chunks: list[Chunk]
    downsample: float  # level-0 px per model px
    mpp: float  # level-0 µm/px
    clip: BaseGeometry | None
    skipped_background: int


def plan_slide(
    source: ImageSource,
    model_mpp: float,
    region: Rect | None = None,
    rois: Sequence[BaseGeometry] | None = None,
    options: SegmentOptions = SegmentOptions(),
    windows: WindowGrid | None = None,
) -> SlidePlan:
    """The chunks of ``source`` (or of ``region``, or of the ``rois``' bounds) that hold tissue.

    With ``windows`` (the predictor's: ``WindowGrid.of(predictor)``) each chunk's read fills whole
    network windows (``ownership.plan_chunks``; with 256² windows and 2048 px chunks, 7.8 % fewer
    network pixels on a 20× whole slide and 13 % on a 40× one), unless equal pieces happen to take
    fewer; without, equal pieces.
    """
    mpp = source.require_mpp()
    image = Rect(0, 0, source.width, source.height)
    if region is not None and not all(math.isfinite(v) for v in (region.x, region.y, region.width, region.height)):
        raise InputError(f"the region {region} has a coordinate that is not a finite number")  # was int(nan)
    downsample = 1.0 / scale_to_model(mpp, model_mpp)  # 1.0 when within 1 %
    clip = None
    if rois:
        clip = shapely.union_all([g for g in rois if g is not None and not g.is_empty])
        if clip.is_empty:
            raise InputError("the regions of interest are empty")
        bx0, by0, bx1, by1 = clip.bounds
        roi_box = Rect.from_bounds(bx0, by0, bx1, by1)
        region = roi_box if region is None else region.intersection(roi_box)
    target = image if region is None else region.to_int().intersection(image)
    if target.is_empty:
        raise InputError(
            f"the region {region} lies outside the image ({source.width} x {source.height} px)"
        )
    span = None
    if windows is not None:
        # A read of L level-0 px arrives as round(L / downsample) model px; off the model's pixel size
        # the read's outward snap to whole pixels may add up to 2 px, so keep that much spare.
        spare = 0.0 if downsample == 1.0 else 2.0 + math.ceil(2.0 / downsample)

        def span(n: int) -> float:
            return (windows.span(n) - spare) * downsample

    size, margin = options.chunk_size * downsample, options.chunk_margin(model_mpp) * downsample
    count = math.ceil(target.width / size) * math.ceil(target.height / size)
    if count > MAX_CHUNKS:
        raise InputError(f"the area to segment ({target.width:.0f} x {target.height:.0f} px) would be about "
                         f"{count:,} chunks of {options.chunk_size} px, more than the {MAX_CHUNKS:,} one plan may "
                         "hold: give a smaller region, or a larger chunk size")
    chunks = plan_chunks(target, size, margin, image, span)
    if windows is not None:
        # The spare is a bound, not the rounding itself: where equal pieces happen to fill their windows exactly
        # they can cost fewer (a 6000 px axis in two 3072 px chunks read at 0.3 µm/px for 0.25: 28 windows of 256
        # against the aligned cut's 29). Count both exactly and keep the cheaper; ties to the aligned cut.
        equal = plan_chunks(target, size, margin, image)
        if _window_count(equal, windows, downsample) < _window_count(chunks, windows, downsample):
            chunks = equal
    if clip is not None:
        shapely.prepare(clip)
        chunks = [c for c in chunks if clip.intersects(c.core.to_polygon())]
    skipped = 0
    if options.skip_background and len(chunks) > 1:
        from dannucnet.slides.tissue import tissue_mask

        mask = tissue_mask(source)
        kept = [c for c in chunks if mask.has_tissue(c.core)]
        skipped = len(chunks) - len(kept)
        chunks = kept
    return SlidePlan(chunks=chunks, downsample=downsample, mpp=mpp, clip=clip, skipped_background=skipped)


def _window_count(chunks: Sequence[Chunk], windows: WindowGrid, downsample: float) -> int:
    """Network windows the chunks' reads take once each integer read arrives at the model's pixel size."""
    total = 0
    for chunk in chunks:
        read = chunk.read.to_int()
        width, height = (max(1, round(side / downsample)) for side in (read.width, read.height))
        total += windows.over(height, width)
    return total


#: ``auto_stains`` reads the whole image at most this many pixels wide (QuPath estimates on a region or a
#: downsampled image too); 2048 px keeps the read to ~12 MB and still holds ~10^6 stained pixels.
STAIN_ESTIMATE_SIDE = 2048


def resolve_stains(source: ImageSource, options: SegmentOptions) -> SegmentOptions:
    """``options`` with ``auto_stains`` replaced by the stains estimated from this image."""
    if not options.auto_stains:
        return options
    import dataclasses

    from dannucnet.geometry.qupath_stains import estimate_stains, stains_to_json

    downsample = max(1.0, max(source.width, source.height) / STAIN_ESTIMATE_SIDE)
    rgb = source.read_region(0, 0, source.width, source.height, downsample=downsample)
    stains = estimate_stains(rgb)
    log.info("estimated stain vectors: %s", stains_to_json(stains))
    return dataclasses.replace(options, stains=stains, auto_stains=False)


@dataclass(frozen=True)
class ChunkPixels:
    """One chunk's pixels as read, and where they sit in level-0 coordinates."""

    chunk: Chunk
    rgb: np.ndarray
    read: Rect  # the level-0 rectangle read (integer)
    downsample: float  # exact level-0 px per array px: the array may be a pixel off the nominal size after rounding

    @property
    def origin(self) -> tuple[float, float]:
        return (self.read.x, self.read.y)


def read_chunk(source: ImageSource, chunk: Chunk, downsample: float) -> ChunkPixels:
    """Read ``chunk`` (its core and margin) at ``downsample`` level-0 px per returned px."""
    read = chunk.read.to_int()
    rgb = source.read_region(int(read.x), int(read.y), int(read.width), int(read.height), downsample=downsample)
    return ChunkPixels(chunk=chunk, rgb=rgb, read=read, downsample=read.width / rgb.shape[1])


def ordered_map(fn: Callable[[T], R], items: Sequence[T], in_flight: int, threads: int | None = None,
                name: str = "dannucnet-chunks") -> Iterator[R]:
    """``map(fn, items)`` with up to ``in_flight`` calls submitted ahead to ``threads`` threads
    (default ``in_flight``), results in input order; with ``in_flight`` <= 1 it runs inline."""
    if in_flight <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=threads or in_flight, thread_name_prefix=name) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        for future in pending:
            yield future.result()


@dataclass(frozen=True)
class SlideWork:
    """One slide's work as a step sees it."""

    source: ImageSource
    plan: SlidePlan
    options: SegmentOptions
    cancel: Cancel | None = None  # a step that can stop inside a chunk asks this too


class SlideStep(Protocol):
    """What turns a plan's chunks into nuclei: in this process, pipelined, or on a server."""

    @property
    def model_mpp(self) -> float:
        """µm/px the model runs at (chunks are planned in model pixels)."""
        ...

    @property
    def windows(self) -> WindowGrid | None:
        """The network windows a chunk is cut into (chunks are planned to fill them), if known here."""
        ...

    def nuclei(self, work: SlideWork) -> Generator[list[Nucleus], None, None]:
        """The nuclei each of ``work.plan.chunks`` owns: one list per chunk, in chunk order."""
        ...


def run_slide(
    step: SlideStep,
    source: ImageSource,
    region: Rect | None = None,
    rois: Sequence[BaseGeometry] | None = None,
    options: SegmentOptions = SegmentOptions(),
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    plan: SlidePlan | None = None,
) -> Iterator[list[Nucleus]]:
    """The one chunk loop: plan the slide, let ``step`` segment its chunks, report progress and
    honour ``cancel`` between chunks; yields each chunk's owned nuclei, in chunk order."""
    plan = plan or plan_slide(source, step.model_mpp, region, rois, options, step.windows)
    total, found = len(plan.chunks), 0
    if progress is not None:
        progress(0, total, 0)
    if total == 0:
        return
    batches = step.nuclei(SlideWork(source=source, plan=plan, options=options, cancel=cancel))
    try:
        for index in range(total):
            if cancel is not None and cancel():
                raise CancelledError("cancelled")
            nuclei = next(batches)
            found += len(nuclei)
            if progress is not None:
                progress(index + 1, total, found)
            yield nuclei
    finally:
        batches.close()  # stops a step's threads now, also when the consumer stops early


@dataclass(frozen=True)
class InProcessStep:
    """Each chunk through :func:`segment_region` in this thread, the next chunk read meanwhile."""

    predictor: Predictor
    tile_fn: TileFunction | None = None

    @property
    def model_mpp(self) -> float:
        return self.predictor.card.mpp

    @property
    def windows(self) -> WindowGrid:
        return WindowGrid.of(self.predictor)

    def nuclei(self, work: SlideWork) -> Generator[list[Nucleus], None, None]:
        plan = work.plan

        def read(chunk: Chunk) -> ChunkPixels:
            return read_chunk(work.source, chunk, plan.downsample)

        # two reads in flight on one thread: chunk i+1 decodes while chunk i is segmented
        for pixels in ordered_map(read, plan.chunks, in_flight=2, threads=1, name="slide-reader"):
            result = segment_region(
                self.predictor, pixels.rgb, origin=pixels.origin, downsample=pixels.downsample, mpp=plan.mpp,
                core=pixels.chunk.core, clip=plan.clip, options=work.options, tile_fn=self.tile_fn,
                cancel=work.cancel,
            )
            yield result.nuclei


def segment_slide(
    predictor: Predictor,
    source: ImageSource,
    region: Rect | None = None,
    rois: Sequence[BaseGeometry] | None = None,
    options: SegmentOptions = SegmentOptions(),
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    tile_fn: TileFunction | None = None,
    plan: SlidePlan | None = None,
) -> Iterator[list[Nucleus]]:
    """Yield the nuclei of each chunk (owned by that chunk only), in chunk order."""
    return run_slide(InProcessStep(predictor, tile_fn), source, region, rois, options, progress, cancel, plan)
