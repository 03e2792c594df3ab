"""A whole slide as a pipeline: readers → batched model → post-processing pool, all overlapping.

Why: in the plain chunk loop (:func:`segment_slide`) the device idles while a
chunk is decoded and while its nuclei are traced in Python. Here

* a pool of reader threads, each with its own file handle, decodes (and
  resamples) chunks ahead of the model;
* one model thread cuts windows from the decoded chunks into fixed-size batches
  that run across chunk borders (:class:`TileEngine`: pinned buffers, bf16,
  channels_last, optional ``torch.compile``) and blends them on the device;
* each finished chunk's probability map goes to a pool of post-processing
  workers (threads, or processes for the Python-heavy parts on a big box);
* nuclei come out chunk by chunk, in chunk order.

Every hand-over is a bounded queue, so at most a fixed number of chunks is in
flight whatever the slide's size: memory is flat in slide size. The chunks, the
windows, the blending and the ownership rule are those of :func:`segment_slide`,
so the nuclei are the same.

The parts: :class:`_Readers` (decoding threads), :class:`_ModelThread` (windows,
batches, blending), :class:`_Handoff` (the bounded queue to the consumer) and
:class:`PipelinedStep`, which runs them as a step of the one chunk loop
(:func:`~dannucnet.pipeline.slide.run_slide`): plan, progress and cancellation
between chunks are the loop's, as for every other step.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from shapely.geometry.base import BaseGeometry

from dannucnet.engine import Predictor, heap, resample_rgb, scale_to_model
from dannucnet.engine.tile_engine import TileEngine
from dannucnet.engine.tiling import GlassMap, WindowedImage, WindowGrid, WindowStream
from dannucnet.errors import CancelledError
from dannucnet.geometry.ownership import Chunk, Rect
from dannucnet.pipeline.chunk_nuclei import ChunkGeometry, chunk_nuclei, clip_reach
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.slide import SlidePlan, SlideWork, read_chunk, run_slide
from dannucnet.pipeline.types import Nucleus
from dannucnet.protocols import Cancel, Progress
from dannucnet.slides import ImageSource, open_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """Sizes of the pools and queues; the defaults suit both a 2-core CPU and a GPU box."""

    readers: int = 2  # decoding threads, each with its own file handle
    prefetch: int | None = None  # decoded chunks waiting for the model (default: readers + 1)
    post_workers: int | None = None  # default: 1 on a CPU device, cores - readers - 1 on a GPU
    post_processes: bool | None = None  # processes for post-processing (default: on a GPU box)
    batch_size: int | None = None  # windows per forward pass (default: the predictor's)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    compile: bool = False  # torch.compile the network (falls back to eager on failure)


@dataclass
class PipelineStats:
    """Busy seconds per stage and what each stage produced, for throughput figures."""

    chunks: int = 0
    decode_seconds: float = 0.0  # summed over reader threads
    decode_megapixels: float = 0.0  # level-0 megapixels read
    model_seconds: float = 0.0  # device time of forward passes
    tiles: int = 0
    post_seconds: float = 0.0  # summed over post-processing workers
    nuclei: int = 0
    wall_seconds: float = 0.0
    model_idle_seconds: float = 0.0  # model thread waiting for decoded chunks
    compiled: bool = False
    precision: str = "fp32"
    readers: int = 0
    post_workers: int = 0
    post_timings: dict[str, float] = field(default_factory=dict)


_STOP = object()


@dataclass(frozen=True)
class _Decoded:
    """A chunk as a reader hands it to the model thread."""

    model_rgb: np.ndarray  # at the model's pixel size, unnormalised (the measurements use it)
    network_rgb: np.ndarray  # what the network sees (colour-normalised when the card says so)
    read: Rect  # the level-0 rectangle read
    to_level0: float  # level-0 px per model px
    seconds: float  # decoding and resampling time


class _Readers:
    """Reader threads with one open slide each (tiffslide handles are not shared across threads)."""

    def __init__(self, source: ImageSource, threads: int) -> None:
        self.source = source
        self.local = threading.local()
        self.opened: list[ImageSource] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="slide-reader")
        self.own_handles = _is_tiff(source)

    def _source(self) -> ImageSource:
        if not self.own_handles:
            return self.source
        src = getattr(self.local, "source", None)
        if src is None:
            src = open_image(self.source.path, mpp=self.source.mpp)
            self.local.source = src
            with self.lock:
                self.opened.append(src)
        return src

    def read(self, chunk: Chunk, downsample: float, model_mpp: float, mpp: float, prepare: Callable) -> _Decoded:
        """Decode and resample one chunk; ``prepare`` (colour normalisation) runs here too, off the model thread."""
        t0 = time.perf_counter()
        pixels = read_chunk(self._source(), chunk, downsample)
        scale = scale_to_model(mpp * pixels.downsample, model_mpp)
        model_rgb = resample_rgb(pixels.rgb, scale)
        return _Decoded(model_rgb=model_rgb, network_rgb=prepare(model_rgb), read=pixels.read,
                        to_level0=pixels.downsample / scale, seconds=time.perf_counter() - t0)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for src in self.opened:
            src.close()


def _is_tiff(source: ImageSource) -> bool:
    """TIFF-family slides are re-opened per reader thread; small images are shared (read whole, no lock)."""
    try:
        with open(source.path, "rb") as fh:
            return fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False


def _default_post(device_type: str, readers: int) -> tuple[int, bool]:
    cores = os.cpu_count() or 1
    if device_type == "cpu":
        return 1, False
    return max(1, cores - readers - 1), True


class _Handoff:
    """The bounded queue from the model thread to the consumer; a put gives up once stopped."""

    def __init__(self, size: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.stopped = threading.Event()

    def put(self, item: object) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> object:
        return self.queue.get()

    def stop(self) -> None:
        """Stop, and unblock the model thread if it waits on a full queue."""
        self.stopped.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break


class _ModelThread(threading.Thread):
    """Cuts decoded chunks into windows, runs them in fixed-size batches that straddle chunk borders,
    blends them, and submits each finished chunk's map to post-processing. What it hands over, in
    chunk order: a future per chunk, then ``_STOP``; or the exception that ended it."""

    def __init__(self, predictor: Predictor, engine: TileEngine, readers: _Readers, post: Executor,
                 handoff: _Handoff, work: SlideWork, stats: PipelineStats, prefetch: int) -> None:
        super().__init__(name="slide-model", daemon=True)
        self.predictor, self.engine, self.readers, self.post, self.handoff = predictor, engine, readers, post, handoff
        self.work, self.stats, self.prefetch = work, stats, prefetch
        self.pending: deque[Future[_Decoded]] = deque()  # decoding chunks, in chunk order
        self.next_read = 0
        self.stream = WindowStream(engine)  # batches of windows run across chunk borders

    def run(self) -> None:
        try:
            self._run_chunks()
            self.handoff.put(_STOP)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self.handoff.put(exc)

    def _run_chunks(self) -> None:
        chunks, cancel = self.work.plan.chunks, self.work.cancel
        self._top_up()
        for chunk in chunks:
            if self.handoff.stopped.is_set():
                return
            if cancel is not None and cancel():
                raise CancelledError("cancelled")
            self._add_windows(chunk, self._next_decoded())
        self._flush()

    def _top_up(self) -> None:
        """Keep ``prefetch`` chunks decoding ahead of the model."""
        plan, predictor = self.work.plan, self.predictor
        while self.next_read < len(plan.chunks) and len(self.pending) < self.prefetch:
            self.pending.append(self.readers.pool.submit(self.readers.read, plan.chunks[self.next_read],
                                                         plan.downsample, predictor.card.mpp, plan.mpp,
                                                         predictor.prepare))
            self.next_read += 1

    def _next_decoded(self) -> _Decoded:
        t_wait = time.perf_counter()
        decoded = self.pending.popleft().result()
        self.stats.model_idle_seconds += time.perf_counter() - t_wait
        self.stats.decode_seconds += decoded.seconds
        self.stats.decode_megapixels += decoded.read.width * decoded.read.height / 1e6
        self._top_up()
        return decoded

    def _add_windows(self, chunk: Chunk, decoded: _Decoded) -> None:
        where = ChunkGeometry.place((decoded.read.x, decoded.read.y), decoded.to_level0, self.work.plan.mpp,
                                    chunk.core, self.predictor.card, self.work.options)
        # windows farther from the regions of interest than a chunk margin are not run, like glass
        within = clip_reach(self.work.plan.clip, decoded.network_rgb.shape[:2], where,
                            self.work.options.chunk_margin(self.predictor.card.mpp))
        # the network sees the normalised pixels; measurements use the unnormalised model_rgb (the tag)
        image = WindowedImage(decoded.network_rgb, self.engine.tile, self.predictor.overlap, self.engine.new_blend,
                              tag=(decoded.model_rgb, where), skip_glass=self.predictor.skip_glass,
                              glass=None if within is None else GlassMap(decoded.network_rgb, within))
        self._finish(self.stream.add(image))

    def _flush(self) -> None:
        self._finish(self.stream.flush())

    def _finish(self, images: list[WindowedImage]) -> None:
        for image in images:
            model_rgb, where = image.tag
            self.handoff.put(self.post.submit(chunk_nuclei, image.result(), model_rgb, where, self.work.plan.clip,
                                              self.work.options))


def _post_pool(workers: int, processes: bool) -> Executor:
    if processes:
        import multiprocessing

        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slide-post")


class PipelinedStep:
    """The pipelined machinery as a :class:`~dannucnet.pipeline.slide.SlideStep` of the one chunk loop.

    Pass ``stats`` to receive per-stage timings; pass ``engine`` to reuse a
    compiled :class:`TileEngine` across slides.
    """

    def __init__(self, predictor: Predictor, config: PipelineConfig = PipelineConfig(),
                 stats: PipelineStats | None = None, engine: TileEngine | None = None) -> None:
        heap.limit_arenas()  # before the pools start their threads
        self.predictor, self.config = predictor, config
        self.stats = stats if stats is not None else PipelineStats()
        self.engine = engine or TileEngine(predictor, batch_size=config.batch_size, precision=config.precision,
                                           compile=config.compile)
        post_n, post_proc = _default_post(predictor.device.type, config.readers)
        self.post_workers = config.post_workers or post_n
        self.post_processes = post_proc if config.post_processes is None else config.post_processes

    @property
    def model_mpp(self) -> float:
        return self.predictor.card.mpp

    @property
    def windows(self) -> WindowGrid:
        return WindowGrid(self.engine.tile, self.predictor.overlap)

    def nuclei(self, work: SlideWork) -> Generator[list[Nucleus], None, None]:
        """Each chunk's nuclei in chunk order, while later chunks decode, run and post-process."""
        config, stats, engine = self.config, self.stats, self.engine
        base_tiles, base_seconds = engine.stats.tiles, engine.finish_stats().model_seconds
        stats.readers, stats.post_workers = config.readers, self.post_workers
        readers = _Readers(work.source, config.readers)
        post = _post_pool(self.post_workers, self.post_processes)
        handoff = _Handoff(size=self.post_workers + 2)  # finished-model chunks awaiting their nuclei
        stats.chunks = stats.nuclei = 0
        prefetch = config.prefetch or config.readers + 1
        model = _ModelThread(self.predictor, engine, readers, post, handoff, work, stats, prefetch)
        model.start()
        try:
            while True:
                item = handoff.get()
                if item is _STOP:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Future)
                yield self._collect(item.result())
        finally:
            handoff.stop()
            model.join()
            readers.close()
            post.shutdown(wait=True, cancel_futures=True)
            es = engine.finish_stats()
            stats.model_seconds, stats.tiles = es.model_seconds - base_seconds, es.tiles - base_tiles
            stats.compiled, stats.precision = es.compiled, es.precision

    def _collect(self, result: tuple[list[Nucleus], dict[str, float]]) -> list[Nucleus]:
        """A chunk's nuclei, its post-processing timings added to the stats."""
        nuclei, timings = result
        stats = self.stats
        for k, v in timings.items():
            stats.post_timings[k] = stats.post_timings.get(k, 0.0) + v
        stats.post_seconds += sum(timings.values())
        stats.chunks += 1
        stats.nuclei += len(nuclei)
        heap.trim()
        return nuclei


def segment_slide_pipelined(
    predictor: Predictor,
    source: ImageSource,
    region: Rect | None = None,
    rois: Sequence[BaseGeometry] | None = None,
    options: SegmentOptions = SegmentOptions(),
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    config: PipelineConfig = PipelineConfig(),
    plan: SlidePlan | None = None,
    stats: PipelineStats | None = None,
    engine: TileEngine | None = None,
) -> Iterator[list[Nucleus]]:
    """Yield each chunk's owned nuclei in chunk order — same contract as :func:`segment_slide`.

    Pass ``stats`` to receive per-stage timings; pass ``engine`` to reuse a
    compiled :class:`TileEngine` across slides.
    """
    started = time.perf_counter()
    step = PipelinedStep(predictor, config, stats, engine)
    try:
        yield from run_slide(step, source, region, rois, options, progress, cancel, plan)
    finally:
        step.stats.wall_seconds = time.perf_counter() - started
