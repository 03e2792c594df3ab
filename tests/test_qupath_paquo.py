"""The whole loop through paquo on a real QuPath project: annotate → export → train → batch → reopen.

Needs a QuPath installation (``PAQUO_QUPATH_DIR``); skips with that reason
otherwise. The one test that runs everywhere checks the message a user without
QuPath gets.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from shapely.geometry import Point, box

from dannucnet.cli import main
from dannucnet.qupath.project import PAQUO_HINT, paquo_available

HAVE_QUPATH = bool(os.environ.get("PAQUO_QUPATH_DIR")) and paquo_available()
needs_qupath = pytest.mark.skipif(
    not HAVE_QUPATH, reason="needs QuPath for paquo: set PAQUO_QUPATH_DIR to a QuPath 0.5/0.6 installation"
)
pytestmark = pytest.mark.qupath


@pytest.mark.skipif(HAVE_QUPATH or paquo_available(), reason="QuPath is installed: the no-QuPath message cannot show")
def test_without_qupath_the_message_says_what_to_set(tmp_path, capsys):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "project.qpproj").write_text("{}")
    for argv in (
        ["export-training", str(project), "-o", str(tmp_path / "ds")],
        ["batch", str(project), "--model", "untrained"],
        ["import-geojson", str(project), "img", str(tmp_path / "x.geojson")],
    ):
        if argv[0] == "import-geojson":
            (tmp_path / "x.geojson").write_text(  # one nucleus: a file with none is refused before QuPath
                '{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", '
                '"coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}}')
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert PAQUO_HINT in err, err
    assert not (tmp_path / "ds").exists()


@pytest.fixture()
def annotated_project(tmp_path):
    """A QuPath project with one synthetic slide: a training region, traced nuclei, a person's detection."""
    from paquo.classes import QuPathPathClass
    from paquo.images import QuPathImageType
    from paquo.projects import QuPathProject

    from dannucnet.geometry.polygons import labels_to_polygons
    from dannucnet.slides.synthetic import make_synthetic_he, write_pyramidal_tiff

    img = make_synthetic_he(512, 512, seed=5, mpp=0.25)
    slide = write_pyramidal_tiff(tmp_path / "slide.tif", img.rgb, 0.25)
    polys = labels_to_polygons(img.labels, simplify_px=0)
    region = box(64, 64, 320, 320)
    proj_dir = tmp_path / "project"
    qp = QuPathProject(proj_dir, mode="x")
    entry = qp.add_image(slide, image_type=QuPathImageType.BRIGHTFIELD_H_E)
    h = entry.hierarchy
    h.add_annotation(region, QuPathPathClass("Training region"))
    h.add_annotation(box(330, 330, 500, 500), QuPathPathClass("Tumor"))
    nucleus_class = QuPathPathClass("Nucleus")
    for p in polys.values():
        if p.intersects(region):
            h.add_annotation(p, nucleus_class)
    mine = h.add_detection(Point(400, 60).buffer(6), QuPathPathClass("Other"))
    mine.name = "drawn by a person"
    qp.save()
    return proj_dir / "project.qpproj", entry.image_name, img


@needs_qupath
def test_full_loop_export_train_batch_reopen(annotated_project, tmp_path):
    from paquo.projects import QuPathProject

    from dannucnet.formats.dataset import load_dataset

    project, image_name, img = annotated_project
    ds = tmp_path / "ds"
    assert main(["export-training", str(project), "-o", str(ds), "--val-fraction", "0"]) == 0
    [sample] = load_dataset(ds).samples
    labels = sample.load_labels()
    x0, y0 = (int(v) for v in sample.meta["origin"])
    truth = img.labels[y0 : y0 + labels.shape[0], x0 : x0 + labels.shape[1]]
    mask = sample.load_region()
    assert np.mean((labels[mask] > 0) == (truth[mask] > 0)) > 0.99  # QuPath round trip kept the geometry

    model_dir = tmp_path / "model"
    assert main(["train", "--data", str(ds), "--out", str(model_dir), "--epochs", "1", "--steps-per-epoch", "2",
                 "--batch-size", "1", "--device", "cpu", "--version", "test1"]) == 0

    argv = ["batch", str(project), "--model", str(model_dir), "--device", "cpu", "--threshold", "0.3"]
    assert main(argv) in (0, 1)
    ledger = json.loads((project.parent / "dannucnet-batch.json").read_text())
    [record] = ledger["images"].values()
    assert record["status"] == "done" and record["model_version"] == "test1"
    assert list((project.parent / "dannucnet-backups").iterdir())

    def ours_and_mine():
        qp = QuPathProject(project, mode="r")
        [entry] = qp.images
        dets = list(entry.hierarchy.detections)
        ours = [d for d in dets if (d.name or "").startswith("dannucnet:")]
        mine = [d for d in dets if d.name == "drawn by a person"]
        return ours, mine, len(entry.hierarchy.annotations)

    ours, mine, n_annotations = ours_and_mine()
    assert len(ours) == record["nuclei"]
    assert len(mine) == 1 and n_annotations > 2
    assert all(d.path_class.name == "Nucleus" for d in ours)

    # rerun: skipped; --force: replaced, not doubled; the person's objects untouched
    assert main(argv) in (0, 1)
    assert json.loads((project.parent / "dannucnet-batch.json").read_text())["images"] == ledger["images"]
    assert main([*argv, "--force"]) in (0, 1)
    ours2, mine2, n_annotations2 = ours_and_mine()
    assert len(ours2) == len(ours) and len(mine2) == 1 and n_annotations2 == n_annotations

    # import-geojson replaces our nuclei with the file's
    from dannucnet.formats.geojson import GeoJSONWriter
    from dannucnet.pipeline.types import Nucleus

    gj = tmp_path / "n.geojson"
    with GeoJSONWriter(gj, metadata={"model": "segmented", "model_version": "9", "image": "slide.tif"}) as w:
        w.write([Nucleus(Point(100 + 20 * i, 100).buffer(5), 0.9) for i in range(5)])
    assert main(["import-geojson", str(project), image_name, str(gj)]) == 0
    ours3, mine3, _ = ours_and_mine()
    assert len(ours3) == 5 and {d.name for d in ours3} == {"dannucnet:segmented@9"} and len(mine3) == 1


@needs_qupath
def test_moved_image_is_reported_not_crashed(annotated_project, capsys):
    project, _, _ = annotated_project
    slide = project.parent.parent / "slide.tif"
    slide.rename(slide.with_name("elsewhere.tif"))
    assert main(["export-training", str(project), "-o", str(project.parent.parent / "ds")]) == 2
    assert "update_image_paths" in capsys.readouterr().err
