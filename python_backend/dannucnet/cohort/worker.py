"""The per-slide task that runs on a Dask worker.

Each worker process loads the model once and keeps it (``_PREDICTORS``):
loading weights and moving them to a GPU costs seconds, a slide's task should
not pay it again. User-caused failures (a corrupt slide, no pixel size) are
*returned* as a failure, because retrying a corrupt file cannot help; anything
else is raised so that Dask retries it, possibly on another worker.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dannucnet.catalogue import AUTO_FAST, AUTO_NAMES
from dannucnet.errors import DanNucNetError

_PREDICTORS: dict[tuple[str | None, str, int | None], Any] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class TaskSpec:
    """Everything a worker needs for one slide (plain data, cheap to ship)."""

    input: str
    output: str
    model: str | None
    device: str
    batch_size: int | None
    mpp: float | None
    options: Any  # SegmentOptions (a frozen dataclass, picklable)
    torch_threads: int | None = None
    server: str | None = None  # run the model on a dannucnet server instead of on the worker
    token: str | None = None
    pipelined: bool = False  # pipeline.pipelined runner (decoding, model, post-processing overlapped)
    tta: bool = False  # test-time augmentation (four flips per window)
    runtime: str = "torch"  # what runs the network (engine.runtime; the CLI's default is auto)


def predictor_for(
    model: str | None, device: str, batch_size: int | None, torch_threads: int | None = None, tta: bool = False,
    runtime: str = "torch",
):
    """This process's predictor for (model, device, batch size, tta, runtime), loaded on first use."""
    key = (model, device, batch_size, tta, runtime)
    with _LOCK:
        predictor = _PREDICTORS.get(key)
        if predictor is None:
            import torch

            from dannucnet.engine import Predictor
            from dannucnet.model import load_model

            if torch_threads:
                torch.set_num_threads(torch_threads)
            predictor = Predictor(load_model(model), device=device, batch_size=batch_size, tta=tta,
                                  runtime=runtime, threads=torch_threads)
            _PREDICTORS[key] = predictor
        return predictor


def segmenter_for(spec: TaskSpec):
    """A segmenter for this task: the worker's cached model (plain or pipelined), or the given server."""
    from dannucnet.jobs.segmenters import LocalSegmenter, ServerSegmenter

    if spec.server:
        return ServerSegmenter(spec.server, token=spec.token, options=spec.options, model=spec.model)
    predictor = predictor_for(spec.model, spec.device, spec.batch_size, spec.torch_threads, spec.tta,
                              spec.runtime)
    if spec.pipelined:
        return LocalSegmenter(predictor, spec.options, pipelined=True)
    return LocalSegmenter(predictor, spec.options)


def segment_slide_task(spec: TaskSpec) -> dict[str, Any]:
    """Segment one slide into ``spec.output``; returns a result dict (never half-writes)."""
    from dannucnet.cohort.records import DoneRecord, write_done
    from dannucnet.jobs.segment_file import segment_source, writer_for

    started = time.perf_counter()
    base = {"input": spec.input, "output": spec.output, "host": socket.gethostname(), "pid": os.getpid()}
    try:
        from dannucnet.slides import open_image

        # the task opens its slide once; a corrupt or unusable slide fails here, before this worker
        # spends seconds loading a model
        with open_image(spec.input, mpp=spec.mpp) as source:
            slide_mpp = source.require_mpp()
            if spec.model in AUTO_NAMES and not spec.server:  # --model auto: this slide's model, by its pixel size
                from dataclasses import replace

                from dannucnet.commands._common import resolve_auto

                spec = replace(spec, model=resolve_auto(slide_mpp, fast=spec.model == AUTO_FAST))
            summary = segment_source(segmenter_for(spec), source, spec.output, writer_for(spec.output))
    except DanNucNetError as exc:
        return {**base, "status": "failed", "error": type(exc).__name__, "message": str(exc),
                "seconds": time.perf_counter() - started}
    write_done(Path(spec.output), DoneRecord(
        input=spec.input, output=spec.output, model=summary.model, model_version=summary.model_version,
        nuclei=summary.nuclei, seconds=summary.seconds, finished=time.time(),
    ))
    return {**base, "status": "done", "nuclei": summary.nuclei, "seconds": summary.seconds,
            "width": summary.width, "height": summary.height, "chunks": summary.chunks,
            "model": summary.model, "model_version": summary.model_version, "device": summary.device}
