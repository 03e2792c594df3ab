"""Schedule one task per slide on Dask distributed and collect what happened to each.

A local cluster (worker processes, one thread each: the model already uses
all the cores a worker is given) is started when no scheduler address is
given; with an address the same code runs on a real cluster, whose workers
must have this package installed and see the same file system paths.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dannucnet.cohort.inputs import output_path_for
from dannucnet.cohort.records import is_done, write_failure
from dannucnet.cohort.worker import TaskSpec, segment_slide_task
from dannucnet.errors import InputError, OutputError
from dannucnet.pipeline import SegmentOptions
from dannucnet.tables import format_table

log = logging.getLogger(__name__)


@dataclass
class SlideOutcome:
    input: str
    output: str
    status: str  # "done" | "skipped" | "failed"
    nuclei: int | None = None
    seconds: float | None = None
    error: str | None = None
    message: str | None = None


@dataclass
class CohortReport:
    outcomes: list[SlideOutcome] = field(default_factory=list)
    model: str = ""
    model_version: str = ""
    model_trained: bool = True
    seconds: float = 0.0
    scheduler: str = ""

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def table(self) -> str:
        """A plain-text table, one row per slide, then the totals."""
        rows = []
        for o in self.outcomes:
            note = f"{o.error}: {o.message}" if o.status == "failed" else ""
            rows.append((Path(o.input).name, o.status, "" if o.nuclei is None else str(o.nuclei),
                         "" if o.seconds is None else f"{o.seconds:.1f}", note[:100]))
        lines = [format_table(("slide", "status", "nuclei", "seconds", "note"), rows, rule=False)]
        lines.append(f"{self.count('done')} done, {self.count('skipped')} skipped (already done with "
                     f"{self.model} {self.model_version}), {self.count('failed')} failed in {self.seconds:.1f} s")
        return "\n".join(lines)


SlideProgress = Callable[[int, int, SlideOutcome], None]  # slides finished, slides total, the slide just finished


def default_workers(device: str) -> int:
    """One worker per GPU; on CPUs, one per 4 cores (each worker's torch uses its share of cores)."""
    if device != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                return max(1, torch.cuda.device_count())
        except ImportError:  # pragma: no cover - torch is a core dependency
            pass
    return max(1, (os.cpu_count() or 1) // 4)


#: Output file suffix per ``--format``.
OUTPUT_SUFFIX = {"geojson": ".geojson.gz", "parquet": ".parquet"}


def run_cohort(
    slides: Sequence[Path],
    outdir: str | Path,
    model: str | None = None,
    device: str = "auto",
    mpp: float | None = None,
    options: SegmentOptions = SegmentOptions(),
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 1,
    force: bool = False,
    batch_size: int | None = None,
    progress: SlideProgress | None = None,
    server: str | None = None,
    token: str | None = None,
    pipelined: bool = False,
    output_format: str = "geojson",
    tta: bool = False,
    runtime: str = "torch",
) -> CohortReport:
    """Segment every slide into ``outdir/<stem>.geojson.gz`` (or ``.parquet``); returns one outcome per slide.

    Slides whose output was already made by the same model name and version are
    skipped unless ``force``. A slide that fails (after ``retries`` retries for
    unexpected errors; at once for a corrupt or unusable slide) gets a
    ``.failed.json`` record and does not stop the others. With ``server`` the
    workers send pixels to that ``dannucnet serve`` instead of loading a model.
    """

    started = time.perf_counter()
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {outdir}: {exc.strerror or exc}") from None
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {outdir} is not writable; choose another with -o")
    if retries < 0:
        raise InputError(f"--retries must be zero or more, got {retries}")
    if output_format not in OUTPUT_SUFFIX:
        raise InputError(f"unknown output format {output_format!r}: choose one of {', '.join(OUTPUT_SUFFIX)}")
    if output_format == "parquet":
        from dannucnet.formats.geoparquet import require_pyarrow

        require_pyarrow()  # fail before any slide is queued
    name, version, trained, accepted = _model_identity(model, server, token, options)
    report = CohortReport(model=name, model_version=version, model_trained=trained)
    todo: list[tuple[int, TaskSpec]] = []
    outcomes: list[SlideOutcome | None] = [None] * len(slides)
    for i, slide in enumerate(slides):
        out = output_path_for(slide, outdir, OUTPUT_SUFFIX[output_format])
        if not force and any(is_done(out, n, v) for n, v in accepted):
            outcomes[i] = SlideOutcome(str(slide), str(out), "skipped")
        else:
            todo.append((i, TaskSpec(input=str(slide), output=str(out), model=model, device=device,
                                     batch_size=batch_size, mpp=mpp, options=options, server=server,
                                     token=token, pipelined=pipelined, tta=tta, runtime=runtime)))
    finished = 0
    for o in outcomes:
        if o is not None:
            finished += 1
            if progress is not None:
                progress(finished, len(slides), o)
    if todo:
        for i, outcome in _run_tasks(todo, scheduler, workers, retries, device, report):
            outcomes[i] = outcome
            finished += 1
            if progress is not None:
                progress(finished, len(slides), outcome)
    report.outcomes = [o for o in outcomes if o is not None]
    report.seconds = time.perf_counter() - started
    return report


def _model_identity(model: str | None, server: str | None, token: str | None,
                    options: SegmentOptions) -> tuple[str, str, bool, set[tuple[str, str]]]:
    """Name, version and trained flag of the model that will run, and the (name, version) pairs whose
    output counts as done; fails fast on an unknown model or an unreachable server, before any
    cluster starts. With ``--model auto`` (or ``auto-fast``) each slide gets the model its pixel size
    suits, so output by any model auto can choose, at its installed version, is done (without this a
    resumed cohort redid every 20x slide); output by another model, e.g. a lite one under ``auto``,
    is redone."""
    from dannucnet.catalogue import AUTO_FAST, AUTO_NAMES, possible_choices

    if server:
        from dannucnet.jobs.segmenters import ServerSegmenter

        seg = ServerSegmenter(server, token=token, options=options, model=model)
        accepted = {(seg.model_name, seg.model_version)}
        if seg.auto:
            accepted |= {(e.name, e.version) for e in possible_choices(seg.catalogue, fast=seg.auto == AUTO_FAST)}
        return seg.model_name, seg.model_version, seg.model_trained, accepted
    from dannucnet.model import load_model
    from dannucnet.model.registry import list_models

    card = load_model(model).card
    accepted = {(str(card.name), str(card.version))}
    if model in AUTO_NAMES:
        accepted |= {(e.card_name, e.version) for e in possible_choices(list_models(), fast=model == AUTO_FAST)}
    return str(card.name), str(card.version), bool(card.trained), accepted


def _run_tasks(todo, scheduler, workers, retries, device, report):
    """Yield (index, outcome) as tasks finish, on the given scheduler or a local cluster."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {exc}; start it with "
                             f"'dask scheduler' or leave out --scheduler for a local cluster") from None
        except ValueError as exc:  # distributed's parse of the address: no port, a port that is no number, a scheme
            raise InputError(f"--scheduler {scheduler!r} is not a Dask scheduler address ({exc}); give one as "
                             "'dask scheduler' prints it, e.g. tcp://10.0.0.5:8786") from None
        report.scheduler = scheduler
    else:
        n = max(1, min(len(todo), workers or default_workers(device)))
        threads = max(1, (os.cpu_count() or 1) // n)
        todo = [(i, _with_threads(spec, threads)) for i, spec in todo]
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        client = Client(cluster)
        report.scheduler = f"local cluster, {n} worker process(es)"
    try:
        futures = {}
        for i, spec in todo:
            fut = client.submit(segment_slide_task, spec, retries=retries, pure=False,
                                key=f"slide-{i}-{Path(spec.input).name}-{os.urandom(4).hex()}")
            futures[fut] = (i, spec)
        for fut in as_completed(futures):
            i, spec = futures[fut]
            try:
                r = fut.result()
            except Exception as exc:  # noqa: BLE001 - the task kept failing after its retries, or its worker died
                outcome = SlideOutcome(spec.input, spec.output, "failed", error=type(exc).__name__,
                                       message=(str(exc).splitlines() or [repr(exc)])[0][:300])
                attempts = retries + 1
            else:
                outcome = SlideOutcome(spec.input, spec.output, r["status"], nuclei=r.get("nuclei"),
                                       seconds=r.get("seconds"), error=r.get("error"), message=r.get("message"))
                attempts = 1
            if outcome.status == "failed":
                write_failure(Path(spec.output), spec.input, outcome.error or "Error", outcome.message or "",
                              attempts)
            yield i, outcome
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _with_threads(spec: TaskSpec, threads: int) -> TaskSpec:
    from dataclasses import replace

    return replace(spec, torch_threads=threads)
