"""batch logic without QuPath: parents, plan/resume ledger, backups, tags, summary."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
from shapely.geometry import Point, box

from dannucnet.errors import InputError, OutputError
from dannucnet.pipeline.types import Nucleus
from dannucnet.qupath.batch import (
    BatchRow,
    backup_entry,
    detection_tag,
    format_summary,
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
from dannucnet.qupath.entries import ANNOTATION, ImageEntryData, ObjectData
from dannucnet.qupath.ledger import DONE, WRITING, Ledger, ledger_path
from dannucnet.qupath.regions import RegionRules, is_own_detection


def make_entry(entry_id="1", name="a.svs", annotations=(), mpp=0.5):
    return ImageEntryData(entry_id, name, f"file:/slides/{name}", 1000, 800, mpp=mpp, annotations=list(annotations))


def test_default_parents_exclude_nuclei_and_fall_back_to_whole_image():
    tumour = ObjectData(ANNOTATION, box(0, 0, 500, 500), "Tumor")
    stroma = ObjectData(ANNOTATION, box(500, 0, 900, 400), None)  # unclassified, large → parent
    drawn_nucleus = ObjectData(ANNOTATION, Point(50, 50).buffer(6), "Nucleus")
    small_unclassified = ObjectData(ANNOTATION, Point(80, 80).buffer(5), None)
    e = make_entry(annotations=[tumour, stroma, drawn_nucleus, small_unclassified])
    rois = segmentation_rois(e)
    assert [r.area for r in rois] == [250000, 160000]
    assert segmentation_rois(make_entry(annotations=[drawn_nucleus])) is None  # whole image
    assert segmentation_rois(e, whole_image=True) is None
    only = segmentation_rois(e, parents=["tumor"])
    assert len(only) == 1 and only[0].area == 250000
    assert segmentation_rois(e, parents=["Lymph node"]) == []  # asked for, absent: nothing, not everything
    # a custom nucleus class is never a parent
    rules = RegionRules(nucleus_classes=("Tumor", "Nucleus"))
    assert [r.area for r in segmentation_rois(e, rules=rules)] == [160000]


def test_invalid_parent_geometry_is_fixed():
    bowtie = ObjectData(ANNOTATION, box(0, 0, 1, 1).union(box(0, 0, 1, 1)), "Tumor")
    from shapely.geometry import Polygon

    bad = ObjectData(ANNOTATION, Polygon([(0, 0), (400, 400), (400, 0), (0, 400)]), "Tumor")
    rois = segmentation_rois(make_entry(annotations=[bad, bowtie]), parents=["Tumor"])
    assert all(r.is_valid for r in rois)
    assert math.isclose(rois[0].area, 80000)


def test_select_images_and_plan_with_ledger(tmp_path):
    entries = [make_entry("1", "a.svs"), make_entry("2", "b.svs"), make_entry("3", "c.svs")]
    assert [e.name for e in select_images(entries, ["c.svs", "1"])] == ["a.svs", "c.svs"]
    with pytest.raises(InputError, match="no image named"):
        select_images(entries, ["zzz.svs"])
    ledger = Ledger(tmp_path / "ledger.json")
    ledger.mark_done("1", "a.svs", "m", "1.0", 10, 1.5)
    ledger.mark_done("2", "b.svs", "m", "0.9", 10, 1.5)
    plan = plan_images(entries, Ledger(tmp_path / "ledger.json"), "m", "1.0")
    assert [p.run for p in plan] == [False, True, True]  # other version → redo
    assert "--force" in plan[0].reason
    assert all(p.run for p in plan_images(entries, ledger, "m", "1.0", force=True))


def test_ledger_is_atomic_json_and_survives_reload(tmp_path):
    path = ledger_path(tmp_path / "project.qpproj")
    assert path == tmp_path / "dannucnet-batch.json"
    ledger = Ledger(path)
    ledger.mark_writing("5", "x.svs", "m", "1", tmp_path / "bk", tmp_path / "data" / "5")
    doc = json.loads(path.read_text())
    assert doc["images"]["5"]["status"] == WRITING
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    ledger.mark_done("5", "x.svs", "m", "1", 42, 3.21)
    again = Ledger(path)
    assert again.images["5"]["status"] == DONE and again.images["5"]["nuclei"] == 42
    assert again.is_done("5", "m", "1") and not again.is_done("5", "m", "2")
    path.write_text("{not json")
    with pytest.raises(OutputError, match="delete it"):
        Ledger(path)


def test_ledger_write_killed_midway_keeps_old_file(tmp_path):
    """A process killed while writing the ledger leaves the previous complete file."""
    path = tmp_path / "dannucnet-batch.json"
    Ledger(path).mark_done("1", "a", "m", "1", 1, 1.0)
    before = path.read_text()
    code = textwrap.dedent(f"""
        import json, os
        import dannucnet.qupath.ledger as L
        real = json.dump
        def dying(doc, fh, **kw):
            fh.write('{{"partial": ')
            fh.flush()
            os._exit(9)
        L.json.dump = dying
        L.Ledger({str(path)!r}).mark_done("2", "b", "m", "1", 1, 1.0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == 9
    assert path.read_text() == before
    assert Ledger(path).is_done("1", "m", "1")


def test_backup_restore_and_resume_after_kill(tmp_path):
    project = tmp_path / "proj"
    entry_dir = project / "data" / "3"
    entry_dir.mkdir(parents=True)
    (entry_dir / "data.qpdata").write_bytes(b"ORIGINAL")
    (entry_dir / "server.json").write_text("{}")
    backup = backup_entry(entry_dir, project / "dannucnet-backups", "3")
    assert (backup / "data.qpdata").read_bytes() == b"ORIGINAL"
    ledger = Ledger(ledger_path(project / "project.qpproj"))
    ledger.mark_writing("3", "img.svs", "m", "1", backup, entry_dir)
    (entry_dir / "data.qpdata").write_bytes(b"HALF-WRIT")  # the run dies here
    restored = restore_interrupted(Ledger(ledger_path(project / "project.qpproj")))
    assert restored == ["img.svs"]
    assert (entry_dir / "data.qpdata").read_bytes() == b"ORIGINAL"
    assert not (project / "data" / "3.interrupted").exists()
    after = Ledger(ledger_path(project / "project.qpproj"))
    assert not after.interrupted() and not after.is_done("3", "m", "1")  # it will be redone
    # backups are pruned to the newest few
    for _ in range(5):
        backup_entry(entry_dir, project / "dannucnet-backups", "3", kept=2)
    assert len(list((project / "dannucnet-backups" / "3").iterdir())) == 2
    with pytest.raises(InputError, match="missing"):
        restore_entry(tmp_path / "nope", entry_dir)


def test_tags_measurements_and_offsets():
    tag = detection_tag("dan-nucnet-monuseg", "1.2")
    assert tag == "dannucnet:dan-nucnet-monuseg@1.2"
    assert is_own_detection(tag) and not is_own_detection("Nucleus 3") and not is_own_detection(None)
    n = Nucleus(Point(10, 10).buffer(3), 0.8, {"Area µm^2": 7, "Bad": float("nan"), "Text": "x"})
    m = measurements_for_qupath(n)
    assert m == {"Area µm^2": 7.0, "Detection probability": 0.8}
    assert all(type(v) is float for v in m.values())
    rois = shift_rois([box(0, 0, 10, 10)], 100, 50)
    assert rois[0].bounds == (100, 50, 110, 60)
    [moved] = shift_nuclei([n], -5, -5)
    assert moved.polygon.centroid.x == pytest.approx(5)


def test_summary_and_progress():
    rows = [BatchRow("a.svs", "done", 1200, 12.5, 900), BatchRow("b.svs", "skipped (done)"),
            BatchRow("c.svs", "failed: moved", 0, 0.1)]
    text = format_summary(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["image", "nuclei", "replaced", "time", "(s)", "status"]
    assert "1 done, 1 skipped, 1 failed; 1200 nuclei" in lines[-1]
    seen: list[str] = []
    cb = progress_printer(2, 5, "a.svs", seen.append)
    for i in range(1, 21):
        cb(i, 20, i * 10)
    assert seen[0] == "[2/5] a.svs: 5% (1/20 chunks, 10 nuclei)"
    assert seen[-1] == "[2/5] a.svs: 100% (20/20 chunks, 200 nuclei)"
    assert len(seen) == 11  # about every 10 %, not every chunk


def test_local_and_server_segmenters_agree_and_honour_parents(tmp_path):
    """In-process, server-by-path and server-with-pixels give the same nuclei, all inside the parent."""
    from dannucnet.engine import Predictor
    from dannucnet.model import untrained_model
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.qupath.batch import LocalSegmenter, ServerSegmenter
    from dannucnet.service.server import Server, ServerConfig
    from dannucnet.slides.synthetic import write_synthetic_slide

    roots = tmp_path / "root"
    roots.mkdir()
    slide = write_synthetic_slide(roots / "s.tif", 224, seed=1, mpp=0.25)
    untrained_predictor = Predictor(untrained_model(), device="cpu", tile_size=256)  # one tile per call: fast
    options = SegmentOptions(threshold=0.3, min_area_um2=0)  # the server knows no margin option: keep the default
    local = LocalSegmenter(untrained_predictor, options)
    assert (local.model_name, local.model_version) == ("untrained", "0")
    parent = box(30, 30, 150, 190)
    seen: list[str] = []
    nuclei = local.segment(slide.path, [parent], None, progress_printer(1, 1, "s.tif", seen.append))
    assert seen and seen[-1].startswith("[1/1] s.tif: 100%")
    assert all(parent.contains(Point(n.centroid)) for n in nuclei)

    def key(ns):
        return sorted((round(n.centroid[0], 1), round(n.centroid[1], 1)) for n in ns)

    config = ServerConfig(port=0, http_port=None, slide_roots=[str(roots)])
    with Server(untrained_predictor, config) as server:
        remote = ServerSegmenter(server.grpc_address, options=options)
        assert (remote.model_name, remote.by_path) == ("untrained", True)
        assert key(remote.segment(slide.path, [parent], None, None)) == key(nuclei)
        outside = tmp_path / "elsewhere.tif"
        slide.path.rename(outside)  # not under the server's slide root: pixels are sent instead
        assert key(remote.segment(outside, [parent], None, None)) == key(nuclei)
        assert remote.by_path is False
