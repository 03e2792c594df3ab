"""``dannucnet batch`` logic that needs no QuPath: what to segment, how, and what to tell.

* **Where** – :func:`segmentation_rois`: the parent annotations to segment inside
  (``--parents CLASS…``; default every area annotation whose class is not a
  nucleus class, so nuclei a person drew are never taken for regions), or the
  whole image where there is none (or with ``--whole-image``).
* **Which images** – :func:`plan_images`: skip those the ledger marks done with
  the same model name and version, unless ``force``.
* **How** – a *segmenter*: in-process (:class:`LocalSegmenter`, the pipeline's
  ``segment_slide``) or through a server (:class:`ServerSegmenter`).
* **Tagging** – our detections are named ``dannucnet:<model>@<version>``; only
  objects with that prefix are ever replaced (:func:`detection_tag`).
* **Safety** – :func:`backup_entry` / :func:`restore_entry` copy an entry's data
  folder; the ledger (:mod:`dannucnet.qupath.ledger`) says which to restore.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shapely.affinity import translate
from shapely.geometry.base import BaseGeometry

from dannucnet.errors import InputError
from dannucnet.formats.geojson import PROBABILITY_KEY
from dannucnet.jobs.segmenters import LocalSegmenter, ServerSegmenter  # re-exported for this module's users
from dannucnet.protocols import Progress
from dannucnet.qupath.entries import ANNOTATION, ImageEntryData
from dannucnet.qupath.ledger import Ledger
from dannucnet.qupath.regions import OWN_TAG_PREFIX, RegionRules, fix_geometry, is_own_detection
from dannucnet.tables import format_table

if TYPE_CHECKING:  # the pipeline package pulls in torch; the QuPath logic does not need it
    from dannucnet.pipeline.types import Nucleus

log = logging.getLogger(__name__)

BACKUP_DIR = "dannucnet-backups"
BACKUPS_KEPT = 3
NUCLEUS_CLASS = "Nucleus"

__all__ = [
    "BatchRow",
    "LocalSegmenter",
    "ServerSegmenter",
    "backup_entry",
    "detection_tag",
    "format_summary",
    "is_own_detection",
    "measurements_for_qupath",
    "plan_images",
    "restore_entry",
    "segmentation_rois",
    "select_images",
]


def detection_tag(model: str, version: str) -> str:
    """The name every detection we write carries; :func:`is_own_detection` recognises it."""
    return f"{OWN_TAG_PREFIX}{model}@{version}"


def measurements_for_qupath(nucleus: Nucleus) -> dict[str, float]:
    """Finite float measurements (paquo refuses non-floats; QuPath shows NaN as missing)."""
    out: dict[str, float] = {}
    for key, value in nucleus.measurements.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[str(key)] = v
    p = float(nucleus.probability) if nucleus.probability is not None else math.nan
    if PROBABILITY_KEY not in out and math.isfinite(p):
        out[PROBABILITY_KEY] = p  # the same name the GeoJSON writer uses
    return out


def segmentation_rois(
    entry: ImageEntryData,
    parents: Sequence[str] | None = None,
    whole_image: bool = False,
    rules: RegionRules = RegionRules(),
) -> list[BaseGeometry] | None:
    """Areas to segment in QuPath coordinates; ``None`` means the whole image.

    With ``parents`` given and none found the image has nothing to segment:
    an empty list (reported as such), never silently the whole slide.
    """
    if whole_image:
        return None
    rois: list[BaseGeometry] = []
    wanted = {p.strip().lower() for p in parents} if parents else None
    for obj in entry.annotations:
        if obj.kind != ANNOTATION or rules.is_nucleus_class(obj.class_name):
            continue
        if wanted is not None and (obj.class_name or "").strip().lower() not in wanted:
            continue
        geom, _ = fix_geometry(obj.geometry)
        if geom is None:
            continue
        if wanted is None and obj.class_name is None and geom.area <= _small_area_px(entry, rules):
            continue  # an unclassified nucleus-sized shape is a nucleus, not a parent (regions rule 1)
        rois.append(geom)
    if not rois:
        return [] if wanted is not None else None
    return rois


def _small_area_px(entry: ImageEntryData, rules: RegionRules) -> float:
    mpp = entry.mpp or 0.25
    return rules.max_nucleus_um2 / (mpp * mpp)


def select_images(entries: Sequence[ImageEntryData], names: Sequence[str] | None) -> list[ImageEntryData]:
    """Entries named on the command line (by image name or entry id), in project order."""
    if not names:
        return list(entries)
    wanted = list(names)
    found = [e for e in entries if e.name in wanted or e.entry_id in wanted]
    missing = [n for n in wanted if not any(n in (e.name, e.entry_id) for e in found)]
    if missing:
        known = ", ".join(repr(e.name) for e in entries[:10])
        more = " …" if len(entries) > 10 else ""
        raise InputError(f"no image named {missing} in the project (images: {known}{more})")
    return found


@dataclass
class PlannedImage:
    entry: ImageEntryData
    run: bool
    reason: str = ""


def plan_images(
    entries: Iterable[ImageEntryData], ledger: Ledger, model: str, version: str, force: bool = False
) -> list[PlannedImage]:
    """Which images to segment now; done ones (same model name and version) are skipped unless ``force``."""
    plan = []
    for e in entries:
        if not force and ledger.is_done(e.entry_id, model, version):
            plan.append(PlannedImage(e, False, f"done with {model} {version} (use --force to redo)"))
        else:
            plan.append(PlannedImage(e, True))
    return plan


# -- backups ------------------------------------------------------------------


def backup_entry(entry_path: Path | None, backup_root: Path, entry_id: str, kept: int = BACKUPS_KEPT) -> Path:
    """Copy an entry's data folder to ``backup_root/<id>/<timestamp>``; keep the newest ``kept``."""
    if entry_path is None or not Path(entry_path).is_dir():
        raise InputError(f"the data folder of image {entry_id} is missing: {entry_path}")
    entry_path = Path(entry_path)
    target_parent = Path(backup_root) / str(entry_id)
    target_parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = target_parent / stamp
    n = 1
    while target.exists():
        target = target_parent / f"{stamp}-{n}"
        n += 1
    partial = target.with_name(target.name + ".partial")
    shutil.copytree(entry_path, partial)
    partial.rename(target)  # a backup that exists is complete
    old = sorted(p for p in target_parent.iterdir() if p.is_dir() and not p.name.endswith(".partial"))
    for p in old[:-kept] if kept > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return target


def restore_entry(backup: Path, entry_path: Path) -> None:
    """Put a backup back in place of a (possibly half-written) entry data folder."""
    backup, entry_path = Path(backup), Path(entry_path)
    if not backup.is_dir():
        raise InputError(f"backup {backup} is missing; cannot restore {entry_path}")
    broken = entry_path.with_name(entry_path.name + ".interrupted")
    if broken.exists():
        shutil.rmtree(broken)
    if entry_path.exists():
        entry_path.rename(broken)
    shutil.copytree(backup, entry_path)
    shutil.rmtree(broken, ignore_errors=True)


def restore_interrupted(ledger: Ledger) -> list[str]:
    """Restore every image a killed run left half-written; returns their names."""
    restored = []
    for entry_id, record in ledger.interrupted().items():
        backup, entry_path = record.get("backup"), record.get("entry_path")
        if backup and entry_path:
            restore_entry(Path(backup), Path(entry_path))
            log.warning("image %s: an earlier run was interrupted while writing; data restored from %s",
                        record.get("image", entry_id), backup)
        ledger.mark_restored(entry_id)
        restored.append(str(record.get("image", entry_id)))
    return restored


# -- file coordinates (QuPath may offset an image by its bounds) ------------------


def shift_rois(rois: list[BaseGeometry] | None, dx: float, dy: float) -> list[BaseGeometry] | None:
    if rois is None or (dx == 0 and dy == 0):
        return rois
    return [translate(r, dx, dy) for r in rois]


def shift_nuclei(nuclei: list[Nucleus], dx: float, dy: float) -> list[Nucleus]:
    if dx == 0 and dy == 0:
        return nuclei
    for n in nuclei:
        n.polygon = translate(n.polygon, dx, dy)
    return nuclei


# -- reporting ------------------------------------------------------------------


@dataclass
class BatchRow:
    image: str
    status: str
    nuclei: int = 0
    seconds: float = 0.0
    removed: int = 0


def format_summary(rows: Sequence[BatchRow]) -> str:
    """The end-of-run table: image, nuclei, time, status."""
    table = format_table(
        ["image", "nuclei", "replaced", "time (s)", "status"],
        [[r.image, r.nuclei, r.removed, round(r.seconds, 1), r.status] for r in rows],
    )
    done = sum(1 for r in rows if r.status == "done")
    failed = sum(1 for r in rows if r.status.startswith("failed"))
    return f"{table}\n{done} done, {len(rows) - done - failed} skipped, {failed} failed; " \
           f"{sum(r.nuclei for r in rows)} nuclei written in {sum(r.seconds for r in rows):.1f} s"


def progress_printer(index: int, total: int, name: str, echo: Callable[[str], None]) -> Progress:
    """Per-image progress lines (chunks) prefixed with the overall position (image i/n), about every 10 %."""
    last = [-1.0]

    def report(done: int, total_chunks: int, nuclei: int) -> None:
        if total_chunks <= 0:  # nothing planned (an empty region): no percentage to tell
            return
        frac = done / total_chunks
        if frac - last[0] >= 0.1 - 1e-9 or (frac >= 1.0 > last[0]):
            last[0] = frac
            echo(f"[{index}/{total}] {name}: {100 * frac:.0f}% ({done}/{total_chunks} chunks, {nuclei} nuclei)")

    return report
