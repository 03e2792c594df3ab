"""Segment one image or slide into a QuPath GeoJSON (or GeoParquet) file (+ optional overlay PNG).

The standalone door: ``dannucnet segment`` and ``dannucnet demo`` run this,
and the cohort runner calls it once per slide. Output is streamed and
atomic; a failed or cancelled run leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dannucnet.errors import InputError
from dannucnet.formats.geojson import GeoJSONWriter, ensure_writable
from dannucnet.formats.geoparquet import PARQUET_SUFFIXES, GeoParquetWriter
from dannucnet.formats.overlay import OverlayCanvas
from dannucnet.geometry.ownership import Rect
from dannucnet.outputs import refuse_clobbering
from dannucnet.protocols import Progress, Segmenter
from dannucnet.slides import open_image


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


def open_writer(path: str | os.PathLike[str], metadata: dict[str, str]) -> GeoJSONWriter | GeoParquetWriter:
    """The writer the output's name asks for: ``.parquet``/``.geoparquet`` → GeoParquet, else QuPath GeoJSON."""
    if str(path).lower().endswith(PARQUET_SUFFIXES):
        return GeoParquetWriter(path, metadata=metadata)
    return GeoJSONWriter(path, metadata=metadata)


def segment_to_geojson(
    segmenter: Segmenter,
    input_path: str | Path,
    output_path: str | Path,
    mpp: float | None = None,
    region: Rect | None = None,
    overlay_path: str | Path | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> SegmentSummary:
    """Stream the nuclei of ``input_path`` (optionally one ``region``) into ``output_path``."""
    started = time.perf_counter()
    refuse_clobbering([("input", input_path)], [("output", output_path), ("overlay", overlay_path)])
    ensure_writable(output_path)
    if overlay_path is not None:
        ensure_writable(overlay_path)
    chunks = [0]

    def track(done: int, total: int, nuclei: int) -> None:
        chunks[0] = total
        if progress is not None:
            progress(done, total, nuclei)

    with open_image(input_path, mpp=mpp) as source:
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
            "image": Path(input_path).name,
        }
        canvas = OverlayCanvas(source, region.intersection(image) if region else image) if overlay_path else None
        with open_writer(output_path, metadata) as writer:
            for nuclei in segmenter.stream(Path(input_path), region=region, mpp=mpp, progress=track, cancel=cancel):
                writer.write(nuclei)
                if canvas is not None:
                    canvas.draw(nuclei)
        count = writer.count
        if canvas is not None and overlay_path is not None:
            canvas.save(overlay_path)
        return SegmentSummary(
            input=str(input_path), output=str(output_path), overlay=str(overlay_path) if overlay_path else None,
            nuclei=count, chunks=chunks[0], width=source.width, height=source.height, mpp=source_mpp,
            mpp_source=source.mpp_source, model=segmenter.model_name, model_version=segmenter.model_version,
            model_trained=segmenter.model_trained, device=segmenter.device, seconds=time.perf_counter() - started,
        )
