"""The thin paquo adapter: open a project, copy entries into plain data, write nuclei back.

Everything that decides anything lives in plain modules (``entries``,
``regions``, ``export``, ``batch``, ``ledger``, ``import_geojson``); this module
only moves values between them and paquo. paquo runs QuPath's own Java classes,
so it needs a QuPath installation: it is imported lazily, and its "no valid
qupath installation found" becomes a message that says what to set.

paquo 0.9 API used here (checked against its source, see docs/qupath-loop.md):
``QuPathProject(path, mode)``, ``.images``; entry ``.entry_id``,
``.image_name``, ``.uri``, ``.entry_path``, ``.width``/``.height``,
``.hierarchy``, ``.save()``; hierarchy ``.annotations``, ``.detections``,
``.cells``, ``.no_autoflush()``, ``.add_detection(roi, path_class,
measurements)``; object ``.roi``, ``.path_class.name``, ``.name``,
``.nucleus_roi``; ``QuPathPathClass(name)``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shapely.geometry import Polygon

from dannucnet.errors import DanNucNetError, InputError
from dannucnet.protocols import Segmenter
from dannucnet.qupath.batch import (
    BACKUP_DIR,
    NUCLEUS_CLASS,
    BatchRow,
    backup_entry,
    detection_tag,
    measurements_for_qupath,
    plan_images,
    progress_printer,
    restore_entry,
    restore_interrupted,
    segmentation_rois,
    select_images,
    shift_nuclei,
    shift_rois,
)
from dannucnet.qupath.entries import (
    ANNOTATION,
    DETECTION,
    ImageEntryData,
    ObjectData,
    bounds_offset,
    mpp_from_server_metadata,
    read_server_json,
    resolve_image_path,
    server_provider,
)
from dannucnet.qupath.import_geojson import GeoJSONNuclei, check_belongs
from dannucnet.qupath.ledger import Ledger, ledger_path
from dannucnet.qupath.regions import RegionRules, is_own_detection

if TYPE_CHECKING:  # the pipeline package pulls in torch; the QuPath logic does not need it
    from dannucnet.pipeline.types import Nucleus

log = logging.getLogger(__name__)

PAQUO_HINT = "paquo needs QuPath: set PAQUO_QUPATH_DIR to a QuPath installation (0.5 or 0.6)"


def paquo_available() -> bool:
    """True when paquo can start QuPath here (used by tests to skip with a reason)."""
    try:
        _paquo_projects()
    except DanNucNetError:
        return False
    return True


def _paquo_projects() -> Any:
    try:
        import paquo.projects as projects  # starts the JVM: needs QuPath
    except ImportError:
        raise InputError("paquo is not installed: pip install 'dannucnet[qupath]' (and install QuPath)") from None
    except ValueError as exc:  # "no valid qupath installation found"
        raise InputError(f"{PAQUO_HINT} ({exc})") from None
    return projects


def project_file(path: str | os.PathLike[str]) -> Path:
    """``project.qpproj`` for a path that names it or its folder; an error when there is none."""
    p = Path(path)
    if p.is_dir():
        p = p / "project.qpproj"
    if p.suffix != ".qpproj":
        raise InputError(f"{path} is not a QuPath project: give the project.qpproj file or its folder")
    if not p.is_file():
        raise InputError(f"QuPath project not found: {p}")
    return p


def open_project(path: str | os.PathLike[str], mode: str = "r") -> Any:
    """``paquo.projects.QuPathProject`` opened read-only (``"r"``) or for writing (``"r+"``)."""
    projects = _paquo_projects()
    return projects.QuPathProject(project_file(path), mode=mode)


# -- reading ---------------------------------------------------------------------


def _class_name(obj: Any) -> str | None:
    pc = obj.path_class
    return None if pc is None else str(pc.name)


def _object_id(obj: Any) -> str | None:
    """QuPath's object UUID (``PathObject.getID``, QuPath ≥ 0.4); paquo has no wrapper for it."""
    try:
        return str(obj.java_object.getID())
    except Exception:  # noqa: BLE001 - older QuPath: no ids
        return None


def _is_cell(obj: Any) -> bool:
    # the same test paquo itself uses on java objects (paquo/hierarchy.py, to_ome_xml)
    return type(obj.java_object).__name__.rpartition(".")[2] == "PathCellObject"


def entry_data(entry: Any, *, detections: bool = True, own_detections: bool = False) -> ImageEntryData:
    """Copy one paquo image entry into :class:`ImageEntryData`.

    Detections this tool wrote are model output: unless ``own_detections``
    they are passed on as geometry-less placeholders (counted, never used),
    which spares converting 10^5 outlines nobody needs.
    """
    entry_path = Path(entry.entry_path)
    server = read_server_json(entry_path)
    metadata = server.get("metadata") or {}
    width, height = metadata.get("width"), metadata.get("height")
    if not width or not height:
        width, height = entry.width, entry.height
    hierarchy = entry.hierarchy
    annotations = [
        ObjectData(ANNOTATION, a.roi, _class_name(a), name=a.name, id=_object_id(a)) for a in hierarchy.annotations
    ]
    dets: list[ObjectData] = []
    if detections:
        for d in hierarchy.detections:
            name = d.name
            if is_own_detection(name) and not own_detections:
                dets.append(ObjectData(DETECTION, Polygon(), None, name=name))
                continue
            if _is_cell(d):
                continue  # cells come below, as their nucleus outline
            dets.append(ObjectData(DETECTION, d.roi, _class_name(d), name=name, id=_object_id(d)))
        for c in hierarchy.cells:
            dets.append(ObjectData(DETECTION, c.nucleus_roi, _class_name(c), name=c.name, id=_object_id(c)))
    return ImageEntryData(
        entry_id=str(entry.entry_id),
        name=str(entry.image_name),
        uri=str(entry.uri),
        width=int(width),
        height=int(height),
        mpp=mpp_from_server_metadata(metadata),
        entry_path=entry_path,
        annotations=annotations,
        detections=dets,
        server_provider=server_provider(server),
    )


def select_project_entries(qp: Any, names: Sequence[str] | None = None) -> list[tuple[Any, ImageEntryData]]:
    """(paquo entry, light data: id, name, URI) for the named images (all by default), in project order.

    Light on purpose: reading a hierarchy loads the image's data, so the batch
    reads each one only when it gets to it.
    """
    pairs = [
        (entry, ImageEntryData(str(entry.entry_id), str(entry.image_name), str(entry.uri), 0, 0))
        for entry in qp.images
    ]
    chosen = {d.entry_id for d in select_images([d for _, d in pairs], names)}
    return [(e, d) for e, d in pairs if d.entry_id in chosen]


def one_entry(qp: Any, image: str) -> tuple[Any, ImageEntryData]:
    """The single entry named ``image`` (name or entry id), with its annotations."""
    pairs = select_project_entries(qp, [image])
    if len(pairs) > 1:
        ids = ", ".join(d.entry_id for _, d in pairs)
        raise InputError(f"{len(pairs)} images are named {image!r} (entry ids {ids}): give the entry id instead")
    entry = pairs[0][0]
    return entry, entry_data(entry, detections=False)


def iter_entry_data(
    qp: Any, names: Sequence[str] | None = None, *, detections: bool = True, own_detections: bool = False
) -> Iterator[ImageEntryData]:
    """Full data of the named images (all by default), one at a time, each released after use."""
    for entry, _ in select_project_entries(qp, names):
        try:
            yield entry_data(entry, detections=detections, own_detections=own_detections)
        finally:
            release(entry)


def release(entry: Any) -> None:
    """Let go of an entry's loaded image data and hierarchy once it is saved.

    paquo caches them on the entry for the project's lifetime
    (``functools.cached_property`` ``_image_data``, ``_image_server``,
    ``hierarchy``: paquo/images.py); a batch over many slides with 10^5 nuclei
    each would otherwise hold every one of them in memory.
    """
    for name in ("hierarchy", "_properties", "_image_server", "_image_data"):
        entry.__dict__.pop(name, None)


# -- writing ---------------------------------------------------------------------


def write_nuclei(entry: Any, nuclei: Sequence[Nucleus], tag: str, class_name: str = NUCLEUS_CLASS) -> tuple[int, int]:
    """Replace this tool's earlier detections of ``entry`` by ``nuclei``; returns (removed, added).

    Only detections (cells included) whose name carries our tag are removed:
    whatever a person drew or another tool made stays. Nuclei with a cell are
    written as QuPath cell objects. Bulk, without hierarchy events per object.
    """
    from paquo.classes import QuPathPathClass

    hierarchy = entry.hierarchy
    path_class = QuPathPathClass(class_name)
    with hierarchy.no_autoflush():
        ours = [d for d in hierarchy.detections if is_own_detection(d.name)]
        if ours:
            proxy = hierarchy.detections  # property without setter: rebind a local, not the attribute
            proxy -= ours
        for n in nuclei:
            if n.cell is not None:  # a QuPath cell: cell ROI with the nucleus ROI inside
                obj = hierarchy.add_cell(n.cell, path_class, measurements_for_qupath(n), nucleus_roi=n.polygon)
            else:
                obj = hierarchy.add_detection(n.polygon, path_class, measurements_for_qupath(n))
            obj.name = tag
    return len(ours), len(nuclei)


def import_nuclei(
    project: str | os.PathLike[str], image: str, data: GeoJSONNuclei, force: bool = False, backup: bool = True
) -> tuple[str, int, int]:
    """Write GeoJSON nuclei into one image of a project (checked, backup first); (image name, removed, added)."""
    pfile = project_file(project)
    qp = open_project(pfile, mode="r+")
    entry, entry_info = one_entry(qp, image)
    nuclei = check_belongs(data, entry_info, force=force)
    resolve_image_path(entry_info)  # paquo saves only entries whose image file is reachable
    if backup:
        backup_entry(entry_info.entry_path, pfile.parent / BACKUP_DIR, entry_info.entry_id)
    removed, added = write_nuclei(entry, nuclei, detection_tag(*data.model))
    entry.save()
    return entry_info.name, removed, added


def run_batch(
    project: str | os.PathLike[str],
    segmenter: Segmenter,
    *,
    images: Sequence[str] | None = None,
    parents: Sequence[str] | None = None,
    whole_image: bool = False,
    rules: RegionRules = RegionRules(),
    force: bool = False,
    assume_mpp: float | None = None,
    echo: Callable[[str], None] = print,
) -> list[BatchRow]:
    """Segment the project's images and write the nuclei; resumable, one backup per image."""
    pfile = project_file(project)
    ledger = Ledger(ledger_path(pfile))
    for name in restore_interrupted(ledger):  # before QuPath reads any image data
        echo(f"restored {name} from its backup (an earlier run was interrupted while writing it)")
    qp = open_project(pfile, mode="r+")
    pairs = select_project_entries(qp, images)
    model, version = segmenter.model_name, segmenter.model_version
    tag = detection_tag(model, version)
    plan = plan_images([d for _, d in pairs], ledger, model, version, force)
    rows: list[BatchRow] = []
    total = len(plan)
    for i, ((entry, data), item) in enumerate(zip(pairs, plan), start=1):
        if not item.run:
            echo(f"[{i}/{total}] {data.name}: skipped, {item.reason}")
            rows.append(BatchRow(data.name, "skipped (done)"))
            continue
        t0 = time.perf_counter()
        backup = None
        try:
            path = resolve_image_path(data)
            data = entry_data(entry, detections=False)
            rois = segmentation_rois(data, parents, whole_image, rules)
            if rois == []:
                echo(f"[{i}/{total}] {data.name}: no annotation of class {', '.join(parents or [])}; nothing to do")
                rows.append(BatchRow(data.name, "skipped (no parent)"))
                release(entry)
                continue
            echo(f"[{i}/{total}] {data.name}: segmenting {'whole image' if rois is None else f'{len(rois)} region(s)'}")
            from dannucnet.slides import open_image

            with open_image(path) as src:
                dx, dy = bounds_offset(data.server_provider, getattr(src, "properties", {}) or {})
            mpp = data.mpp or assume_mpp
            nuclei = segmenter.segment(path, shift_rois(rois, dx, dy), mpp, progress_printer(i, total, data.name, echo))
            nuclei = shift_nuclei(nuclei, -dx, -dy)
            backup = backup_entry(data.entry_path, pfile.parent / BACKUP_DIR, data.entry_id)
            ledger.mark_writing(data.entry_id, data.name, model, version, backup, data.entry_path)
            removed, added = write_nuclei(entry, nuclei, tag)
            entry.save()
            seconds = time.perf_counter() - t0
            ledger.mark_done(data.entry_id, data.name, model, version, added, seconds)
            release(entry)
            rows.append(BatchRow(data.name, "done", added, seconds, removed))
            echo(f"[{i}/{total}] {data.name}: {added} nuclei written ({removed} earlier ones replaced), "
                 f"{seconds:.1f} s")
        except Exception as exc:  # one image failing (incl. Java exceptions) must not stop the others
            seconds = time.perf_counter() - t0
            if isinstance(exc, DanNucNetError):
                msg = str(exc)
            else:
                msg = f"{type(exc).__name__}: {exc}"
                log.debug("image %s failed", data.name, exc_info=True)
            release(entry)
            if backup is not None and data.entry_path is not None:  # failed while writing: put it back as it was
                restore_entry(backup, data.entry_path)
                msg += " (image data restored from backup)"
            ledger.mark_failed(data.entry_id, data.name, model, version, msg)
            rows.append(BatchRow(data.name, f"failed: {msg}", 0, seconds))
            echo(f"[{i}/{total}] {data.name}: failed: {msg}")
    return rows


__all__ = [
    "PAQUO_HINT",
    "entry_data",
    "import_nuclei",
    "open_project",
    "paquo_available",
    "iter_entry_data",
    "one_entry",
    "select_project_entries",
    "project_file",
    "run_batch",
    "write_nuclei",
]
