"""Segment one image or slide into a nuclei file (+ optional overlay PNG).

The standalone door: ``dannucnet segment`` and ``dannucnet demo`` run this,
and the cohort runner calls it once per slide. One writer per format, chosen
by the caller (:func:`writer_for` applies the CLI's rule: the output's name).
Output is streamed and atomic; a failed or cancelled run leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dannucnet.errors import InputError
from dannucnet.formats.geojson import GeoJSONWriter, ensure_writable
from dannucnet.formats.geoparquet import PARQUET_SUFFIXES, GeoParquetWriter
from dannucnet.formats.overlay import OverlayCanvas
from dannucnet.geometry.ownership import Rect
from dannucnet.outputs import refuse_clobbering
from dannucnet.protocols import Cancel, Progress, Segmenter
from dannucnet.slides import open_image

if TYPE_CHECKING:
    from dannucnet.pipeline.types import Nucleus
    from dannucnet.slides import ImageSource


@dataclass
class SegmentSummary:
    input: str
    output: str
    overlay: str | None
    nuclei: int
    chunks: int
    width: int
    height: int
    mpp: float
    mpp_source: str
    model: str
    model_version: str
    model_trained: bool
    device: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def parse_region(text: str) -> Rect:
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--region must be X,Y,W,H in full-resolution pixels, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise InputError(f"--region width and height must be positive, got {text!r}")
    return Rect(x, y, w, h)


class Writer(Protocol):
    """A streaming, atomic nuclei writer (:class:`GeoJSONWriter`, :class:`GeoParquetWriter`)."""

    count: int

    def __enter__(self) -> Writer: ...

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None: ...

    def write(self, nuclei: Iterable[Nucleus]) -> int: ...


#: what opens a writer: ``(output path, metadata) -> Writer``; one per format, the caller picks
WriterFactory = Callable[..., Writer]


def writer_for(path: str | os.PathLike[str]) -> WriterFactory:
    """The writer the output's name asks for (the CLI's rule): ``.parquet``/``.geoparquet`` → GeoParquet,
    anything else → QuPath GeoJSON."""
    if str(path).lower().endswith(PARQUET_SUFFIXES):
        return GeoParquetWriter
    return GeoJSONWriter


def segment_to_geojson(
    segmenter: Segmenter,
    input_path: str | Path,
    output_path: str | Path,
    mpp: float | None = None,
    region: Rect | None = None,
    overlay_path: str | Path | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> SegmentSummary:
    """Stream the nuclei of ``input_path`` (optionally one ``region``) into the QuPath GeoJSON ``output_path``."""
    return segment_to_file(segmenter, input_path, output_path, GeoJSONWriter, mpp=mpp, region=region,
                           overlay_path=overlay_path, progress=progress, cancel=cancel)


def segment_to_file(
    segmenter: Segmenter,
    input_path: str | Path,
    output_path: str | Path,
    writer: WriterFactory,
    mpp: float | None = None,
    region: Rect | None = None,
    overlay_path: str | Path | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> SegmentSummary:
    """Open ``input_path`` (``mpp`` overrides its pixel size) and :func:`segment_source` it with ``writer``."""
    started = time.perf_counter()
    check_outputs(input_path, output_path, overlay_path)  # before opening: no work for an output we cannot write
    with open_image(input_path, mpp=mpp) as source:
        return _write_nuclei(segmenter, source, output_path, writer, region, overlay_path, progress, cancel, started)


def check_outputs(input_path: str | Path, output_path: str | Path, overlay_path: str | Path | None) -> None:
    """Refuse an output that would overwrite the input, or that cannot be written."""
    refuse_clobbering([("input", input_path)], [("output", output_path), ("overlay", overlay_path)])
    ensure_writable(output_path)
    if overlay_path is not None:
        ensure_writable(overlay_path)


def segment_source(
    segmenter: Segmenter,
    source: ImageSource,
    output_path: str | Path,
    writer: WriterFactory,
    region: Rect | None = None,
    overlay_path: str | Path | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> SegmentSummary:
    """Stream the nuclei of an opened image (optionally one ``region``) into ``output_path`` via ``writer``.

    The image is opened once by the caller and read by everything here: the
    segmenter, the overlay and the summary.
    """
    started = time.perf_counter()
    check_outputs(source.path, output_path, overlay_path)
    return _write_nuclei(segmenter, source, output_path, writer, region, overlay_path, progress, cancel, started)


def _write_nuclei(
    segmenter: Segmenter, source: ImageSource, output_path: str | Path, writer: WriterFactory, region: Rect | None,
    overlay_path: str | Path | None, progress: Progress | None, cancel: Cancel | None, started: float,
) -> SegmentSummary:
    """:func:`segment_source` once its outputs are checked (:func:`segment_to_file` checks them before opening)."""
    chunks = [0]

    def track(done: int, total: int, nuclei: int) -> None:
        chunks[0] = total
        if progress is not None:
            progress(done, total, nuclei)

    source_mpp = source.require_mpp()
    image = Rect(0, 0, source.width, source.height)
    if region is not None and region.intersection(image).is_empty:
        raise InputError(f"--region {region.x:g},{region.y:g},{region.width:g},{region.height:g} lies outside "
                         f"the image ({source.width} x {source.height} px)")
    choose = getattr(segmenter, "choose_for", None)
    if choose is not None:  # --model auto: the model is known once the image's pixel size is
        choose(source_mpp)
    metadata = {
        "model": segmenter.model_name,
        "model_version": segmenter.model_version,
        "mpp": f"{source_mpp:g}",
        "image": Path(source.path).name,
    }
    canvas = OverlayCanvas(source, region.intersection(image) if region else image) if overlay_path else None
    with writer(output_path, metadata) as out:
        for nuclei in segmenter.stream(source, region=region, progress=track, cancel=cancel):
            out.write(nuclei)
            if canvas is not None:
                canvas.draw(nuclei)
    if canvas is not None and overlay_path is not None:
        canvas.save(overlay_path)
    return SegmentSummary(
        input=str(source.path), output=str(output_path), overlay=str(overlay_path) if overlay_path else None,
        nuclei=out.count, chunks=chunks[0], width=source.width, height=source.height, mpp=source_mpp,
        mpp_source=source.mpp_source, model=segmenter.model_name, model_version=segmenter.model_version,
        model_trained=segmenter.model_trained, device=segmenter.device, seconds=time.perf_counter() - started,
    )
