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
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

from shapely.geometry.base import BaseGeometry

from dannucnet.engine import Predictor, heap, resample_rgb, scale_to_model
from dannucnet.engine.tile_engine import TileEngine
from dannucnet.engine.tiling import WindowedImage, WindowStream
from dannucnet.errors import CancelledError
from dannucnet.geometry.ownership import Chunk, Rect
from dannucnet.pipeline.chunk_nuclei import ChunkGeometry, chunk_nuclei
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.slide import SlidePlan, plan_slide
from dannucnet.pipeline.types import Nucleus
from dannucnet.protocols import Progress
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

    def read(self, chunk: Chunk, downsample: float, model_mpp: float, mpp: float, prepare: Callable):
        """Decode and resample one chunk; ``prepare`` (colour normalisation) runs here too, off the model thread."""
        t0 = time.perf_counter()
        read = chunk.read.to_int()
        rgb = self._source().read_region(int(read.x), int(read.y), int(read.width), int(read.height),
                                         downsample=downsample)
        effective = read.width / rgb.shape[1]
        scale = scale_to_model(mpp * effective, model_mpp)
        model_rgb = resample_rgb(rgb, scale)
        return model_rgb, prepare(model_rgb), read, effective, scale, time.perf_counter() - t0

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


def segment_slide_pipelined(
    predictor: Predictor,
    source: ImageSource,
    region: Rect | None = None,
    rois: Sequence[BaseGeometry] | None = None,
    options: SegmentOptions = SegmentOptions(),
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
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
    heap.limit_arenas()  # before the pools start their threads
    plan = plan or plan_slide(source, predictor.card.mpp, region, rois, options)
    stats = stats if stats is not None else PipelineStats()
    engine = engine or TileEngine(predictor, batch_size=config.batch_size, precision=config.precision,
                                  compile=config.compile)
    base_tiles, base_seconds = engine.stats.tiles, engine.finish_stats().model_seconds
    card = predictor.card
    threshold = options.threshold if options.threshold is not None else card.threshold
    min_area_px = max(1, round(options.min_area_um2 / card.mpp**2))
    post_n, post_proc = _default_post(predictor.device.type, config.readers)
    post_n = config.post_workers or post_n
    post_proc = post_proc if config.post_processes is None else config.post_processes
    stats.readers, stats.post_workers = config.readers, post_n
    total = len(plan.chunks)
    if progress is not None:
        progress(0, total, 0)
    if total == 0:
        return

    readers = _Readers(source, config.readers)
    post: Executor
    if post_proc:
        import multiprocessing

        post = ProcessPoolExecutor(max_workers=post_n, mp_context=multiprocessing.get_context("spawn"))
    else:
        post = ThreadPoolExecutor(max_workers=post_n, thread_name_prefix="slide-post")
    results: queue.Queue = queue.Queue(maxsize=post_n + 2)  # finished-model chunks awaiting their nuclei
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def model_loop() -> None:
        try:
            pending: deque[Future] = deque()
            nxt = 0
            depth = config.prefetch or config.readers + 1

            def top_up() -> None:
                nonlocal nxt
                while nxt < total and len(pending) < depth:
                    pending.append(readers.pool.submit(readers.read, plan.chunks[nxt], plan.downsample,
                                                       card.mpp, plan.mpp, predictor.prepare))
                    nxt += 1

            def finish(images: list[WindowedImage]) -> None:
                for image in images:  # tag: the unnormalised pixels (for measurements) and the chunk's place
                    model_rgb, where = image.tag
                    put(post.submit(chunk_nuclei, image.result(), model_rgb, where, plan.clip, options))

            top_up()
            stream = WindowStream(engine)  # batches run across chunk borders
            for index in range(total):
                if stop.is_set():
                    return
                if cancel is not None and cancel():
                    raise CancelledError("cancelled")
                t_wait = time.perf_counter()
                model_rgb, network_rgb, read, effective, scale, seconds = pending.popleft().result()
                stats.model_idle_seconds += time.perf_counter() - t_wait
                stats.decode_seconds += seconds
                stats.decode_megapixels += read.width * read.height / 1e6
                top_up()
                chunk = plan.chunks[index]
                where = ChunkGeometry(origin=(read.x, read.y), to_level0=effective / scale, mpp=plan.mpp,
                                      core=chunk.core, threshold=threshold, min_area_px=min_area_px)
                finish(stream.add(WindowedImage(network_rgb, engine.tile, engine.predictor.overlap,
                                                engine.new_blend, tag=(model_rgb, where))))
            finish(stream.flush())
            put(_STOP)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(exc)

    worker = threading.Thread(target=model_loop, name="slide-model", daemon=True)
    worker.start()
    done = found = 0
    try:
        while True:
            item = results.get()
            if item is _STOP:
                break
            if isinstance(item, BaseException):
                raise item
            nuclei, timings = item.result()
            for k, v in timings.items():
                stats.post_timings[k] = stats.post_timings.get(k, 0.0) + v
            stats.post_seconds += sum(timings.values())
            done += 1
            found += len(nuclei)
            stats.chunks, stats.nuclei = done, found
            if progress is not None:
                progress(done, total, found)
            heap.trim()
            yield nuclei
    finally:
        stop.set()
        while True:  # unblock the model thread if it waits on a full queue
            try:
                results.get_nowait()
            except queue.Empty:
                break
        worker.join()
        readers.close()
        post.shutdown(wait=True, cancel_futures=True)
        es = engine.finish_stats()
        stats.model_seconds, stats.tiles = es.model_seconds - base_seconds, es.tiles - base_tiles
        stats.compiled, stats.precision = es.compiled, es.precision
        stats.wall_seconds = time.perf_counter() - started
