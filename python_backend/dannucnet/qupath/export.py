"""QuPath annotations → the instance dataset folder ``dannucnet train --data`` reads.

Takes plain :class:`ImageEntryData` (filled by the paquo adapter, or built by
hand), reads pixels itself from each entry's ``file:`` URI (paquo has no pixel
access), and writes images, 16-bit instance labels and the annotated-region
mask, so training ignores everything nobody annotated. Which objects are
regions and which nuclei, and how borders, overlaps and bad shapes are
handled, is decided in :mod:`dannucnet.qupath.regions`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dannucnet.errors import DanNucNetError, InputError
from dannucnet.formats.dataset import DatasetWriter
from dannucnet.qupath.entries import ImageEntryData, bounds_offset, resolve_image_path
from dannucnet.qupath.regions import (
    RegionRules,
    build_training_regions,
    classify_objects,
    patch_windows,
    rasterize_region,
)
from dannucnet.slides import open_image
from dannucnet.slides.mpp import validate_given_mpp
from dannucnet.tables import format_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    rules: RegionRules = RegionRules()
    target_mpp: float | None = None  # resample every sample to this pixel size (the model's)
    assume_mpp: float | None = None  # pixel size for images that have none
    patch_size: int | None = None  # output pixels; None = whole regions
    val_fraction: float = 0.2


@dataclass
class ImageRow:
    image: str
    status: str
    samples: int = 0
    nuclei: int = 0
    mpp: float | None = None


@dataclass
class ExportReport:
    output: Path | None
    rows: list[ImageRow] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.rows)

    @property
    def nuclei(self) -> int:
        return sum(r.nuclei for r in self.rows)

    def format(self) -> str:
        """The end-of-run table and the count of every rule that fired."""
        table = format_table(
            ["image", "status", "samples", "nuclei", "µm/px"],
            [[r.image, r.status, r.samples, r.nuclei, f"{r.mpp:.4g}" if r.mpp else "-"] for r in self.rows],
        )
        lines = [table, f"total: {self.samples} samples, {self.nuclei} nuclei"]
        if self.counts:
            lines.append("rules applied:")
            lines.extend(f"  {name}: {n}" for name, n in sorted(self.counts.items()))
        return "\n".join(lines)


def _split_of(key: str, val_fraction: float) -> str:
    """Deterministic train/val assignment by region, so patches of one region stay together."""
    if val_fraction <= 0:
        return "train"
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def assign_splits(regions: dict[str, list[str]], val_fraction: float) -> dict[str, list[str]]:
    """train/val/all splits by whole regions (deterministic hash); at least one val region when there are two."""
    regions = {k: v for k, v in regions.items() if v}
    train: list[str] = []
    val: list[str] = []
    for key in regions:
        (val if _split_of(key, val_fraction) == "val" else train).append(key)
    if not val and len(train) >= 2 and val_fraction > 0:
        val.append(train.pop())  # too few regions for the hash to pick one: the last one validates
    splits = {
        "train": [s for k in train for s in regions[k]],
        "val": [s for k in val for s in regions[k]],
        "all": sorted(s for stems in regions.values() for s in stems),
    }
    return {k: v for k, v in splits.items() if v}


def entry_mpp(entry: ImageEntryData, source_mpp: float | None, assume_mpp: float | None) -> float | None:
    """Pixel size to use: QuPath's calibration, else the file's, else ``--assume-mpp``."""
    return entry.mpp or source_mpp or assume_mpp


def export_training(
    entries: Iterable[ImageEntryData],
    output: Path,
    options: ExportOptions = ExportOptions(),
    *,
    project: str = "",
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Write every training region of ``entries`` into a dataset folder (all-or-nothing)."""
    if options.target_mpp is not None:
        validate_given_mpp(options.target_mpp)
    if options.assume_mpp is not None:
        validate_given_mpp(options.assume_mpp)
    report = ExportReport(output=None)
    writer = DatasetWriter(output, overwrite=overwrite)
    groups: dict[str, list[str]] = {}  # region key → its sample stems (patches of a region stay together)
    mpps: set[float] = set()
    for entry in entries:
        row = ImageRow(image=entry.name, status="ok")
        report.rows.append(row)
        if progress:
            progress(f"exporting {entry.name}")
        try:
            _export_entry(entry, writer, options, row, report.counts, groups, mpps, project)
        except DanNucNetError as exc:
            row.status = f"skipped: {exc}"
            report.counts["images skipped"] += 1
            log.warning("%s: %s", entry.name, exc)
    if not writer.samples:
        shutil.rmtree(writer.partial, ignore_errors=True)
        reasons = "; ".join(f"{r.image}: {r.status}" for r in report.rows) or "the project has no images"
        raise InputError(f"nothing to export: no training region with nuclei was found ({reasons})")
    splits = assign_splits(groups, options.val_fraction)
    dataset_mpp = options.target_mpp or (mpps.pop() if len(mpps) == 1 else None)
    report.output = writer.close(
        dataset_mpp,
        splits,
        classes={"0": "background", "instances": "Nucleus"},
        source={"kind": "qupath-project", "project": project},
        export={
            "rules": {
                "nucleus_classes": list(options.rules.nucleus_classes),
                "region_classes": list(options.rules.region_classes) if options.rules.region_classes else None,
                "max_unclassified_nucleus_um2": options.rules.max_nucleus_um2,
                "keep_empty_regions": options.rules.keep_empty_regions,
                "include_own_detections": options.rules.include_own_detections,
                "patch_size": options.patch_size,
                "target_mpp": options.target_mpp,
            },
            "counts": dict(report.counts),
        },
    )
    return report


def _export_entry(
    entry: ImageEntryData,
    writer: DatasetWriter,
    options: ExportOptions,
    row: ImageRow,
    counts: Counter[str],
    groups: dict[str, list[str]],
    mpps: set[float],
    project: str,
) -> None:
    path = resolve_image_path(entry)
    with open_image(path) as source:
        mpp = entry_mpp(entry, source.mpp, options.assume_mpp)
        row.mpp = mpp
        if mpp is None:
            raise InputError(
                "no pixel size: set it in QuPath (Image tab → Pixel width/height) or pass --assume-mpp MICRONS"
            )
        if (source.width, source.height) != (entry.width, entry.height):
            counts["images whose file size differs from QuPath's"] += 1
            log.warning(
                "%s: QuPath says %dx%d px, the file has %dx%d px; using QuPath's coordinates",
                entry.name, entry.width, entry.height, source.width, source.height,
            )
        regions, nuclei = classify_objects(entry, options.rules, mpp, counts)
        if not regions:
            counts["images without a training region"] += 1
            row.status = "no training region"
            return
        training = build_training_regions(regions, nuclei, entry.width, entry.height, options.rules, counts)
        if not training:
            row.status = "only empty regions"
            return
        offset = bounds_offset(entry.server_provider, getattr(source, "properties", {}) or {})
        d = (options.target_mpp / mpp) if options.target_mpp else 1.0
        out_mpp = options.target_mpp or mpp
        mpps.add(round(out_mpp, 6))
        for k, region in enumerate(training):
            _write_region(entry, source, region, k, d, offset, out_mpp, writer, options, row, counts, groups, project)


def _write_region(
    entry: ImageEntryData,
    source: Any,
    region: Any,
    k: int,
    d: float,
    offset: tuple[int, int],
    out_mpp: float,
    writer: DatasetWriter,
    options: ExportOptions,
    row: ImageRow,
    counts: Counter[str],
    groups: dict[str, list[str]],
    project: str,
) -> None:
    minx, miny, maxx, maxy = region.geometry.bounds
    x0, y0 = max(0, math.floor(minx)), max(0, math.floor(miny))
    x1, y1 = min(entry.width, math.ceil(maxx)), min(entry.height, math.ceil(maxy))
    w, h = x1 - x0, y1 - y0
    shape = (max(1, round(h / d)), max(1, round(w / d)))
    raster = rasterize_region(region, (x0, y0), shape, d)
    counts["nuclei lost (covered or below one pixel)"] += raster.lost
    if raster.overlap_pixels:
        counts["overlapping nucleus pixels (smaller nucleus kept)"] += raster.overlap_pixels
    rgb = source.read_region(x0 + offset[0], y0 + offset[1], w, h, downsample=d)
    if rgb.shape[:2] != shape:  # read_region rounds the same way; guard anyway
        raise InputError(f"pixel read of {entry.name} gave {rgb.shape[:2]}, expected {shape}")
    region_stems = groups.setdefault(f"{entry.entry_id}/{k}", [])
    for p, (r, c, ph, pw) in enumerate(patch_windows(shape[0], shape[1], options.patch_size)):
        mask = raster.mask[r : r + ph, c : c + pw]
        labels = raster.labels[r : r + ph, c : c + pw]
        if not mask.any():
            counts["patches outside the region skipped"] += 1
            continue
        if not labels.any() and not options.rules.keep_empty_regions:
            counts["patches without nuclei skipped"] += 1
            continue
        stem = f"{entry.stem}_r{k}" + (f"_p{p}" if options.patch_size else "")
        n = len([v for v in set(labels.ravel().tolist()) if v])
        writer.add(
            stem,
            rgb[r : r + ph, c : c + pw],
            labels,
            region=mask,
            mpp=out_mpp,
            project=project,
            image=entry.name,
            image_uri=entry.uri,
            entry_id=entry.entry_id,
            annotation_ids=region.annotation_ids,
            origin=[x0 + c * d, y0 + r * d],
            downsample=d,
            nuclei=n,
        )
        region_stems.append(stem)
        row.samples += 1
        row.nuclei += n
