"""Bad inputs at the QuPath commands' door: one-line errors before QuPath is needed, and no data lost.

QA: ``import-geojson`` crashed on ``"features": null`` and on a feature whose ``properties`` is a
string, and would have replaced an image's nuclei with none from an empty file; ``export-training
-o .`` crashed, and ``-o PROJECT/data --overwrite`` would have deleted the project's annotations;
``demo --out FILE`` crashed and ``demo --width 1e8`` ran on for ever. The real CLI on real files;
QuPath is not needed (where it is missing, a command that gets past the checks stops at the paquo hint).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dannucnet.cli import main
from dannucnet.errors import InputError
from dannucnet.formats.geojson import features_to_nuclei, read_features
from dannucnet.qupath.import_geojson import read_nuclei
from dannucnet.qupath.project import PAQUO_HINT, paquo_available

SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}


def _project(folder: Path) -> Path:
    (folder / "data" / "1").mkdir(parents=True)
    (folder / "project.qpproj").write_text("{}")
    (folder / "data" / "1" / "data.qpdata").write_bytes(b"qupath annotations")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(argv: list[str], capsys, folder: Path) -> str:
    """Run the CLI: exit 2, one error line, every file under ``folder`` as it was; the line."""
    before = _snapshot(folder)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert _snapshot(folder) == before
    return err[0]


def _geojson(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    return path


# -- import-geojson ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", [None, 5, "x", {"type": "Feature"}])
def test_a_features_member_that_is_not_a_list_is_refused(tmp_path, capsys, features):
    project = _project(tmp_path / "proj")
    path = _geojson(tmp_path / "f.geojson", {"type": "FeatureCollection", "features": features})
    with pytest.raises(InputError, match="holds no GeoJSON features list"):
        read_features(path)
    line = _fails(["import-geojson", str(project), "img", str(path)], capsys, tmp_path)
    assert "holds no GeoJSON features list" in line


@pytest.mark.parametrize("properties", ["a string", ["a", "list"], 3])
def test_properties_that_are_not_a_map_count_as_none(tmp_path, capsys, properties):
    """Like measurements that are not a map: ignored, the polygon is still a nucleus."""
    feature = {"type": "Feature", "id": "n1", "geometry": SQUARE, "properties": properties}
    [nucleus] = features_to_nuclei([feature])
    assert nucleus.polygon.area == 100 and nucleus.measurements == {}
    path = _geojson(tmp_path / "p.geojson", {"type": "FeatureCollection", "features": [feature]})
    data = read_nuclei(path)
    assert len(data.nuclei) == 1 and data.metadata == {}
    if not paquo_available():  # past the reading, the command stops where QuPath is needed
        line = _fails(["import-geojson", str(_project(tmp_path / "proj")), "img", str(path)], capsys, tmp_path)
        assert PAQUO_HINT in line


@pytest.mark.parametrize("features", [
    [],
    [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}}],
    [{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}}],
])
def test_a_file_without_nuclei_is_refused_before_it_could_clear_the_image(tmp_path, capsys, features):
    """Importing it would delete the image's earlier dannucnet nuclei and add none (--force means
    something else: another image's file, nuclei outside the image)."""
    project = _project(tmp_path / "proj")
    path = _geojson(tmp_path / "e.geojson", {"type": "FeatureCollection", "features": features})
    for extra in ([], ["--force"]):
        line = _fails(["import-geojson", str(project), "img", str(path), *extra], capsys, tmp_path)
        assert "no nuclei to import" in line and "nothing was changed" in line


# -- export-training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", [".", "/", "", ".."])
def test_export_output_without_a_folder_name_is_refused(tmp_path, capsys, monkeypatch, out):
    project = _project(tmp_path / "proj")
    monkeypatch.chdir(project)
    for extra in ([], ["--overwrite"]):
        line = _fails(["export-training", str(project), "-o", out, *extra], capsys, tmp_path)
        assert "-o needs a folder name" in line


@pytest.mark.parametrize("inside", ["data", "dannucnet-backups", "data/1", "classifiers", "training"])
def test_export_never_writes_into_the_project_folder(tmp_path, capsys, inside):
    """``-o PROJECT/data --overwrite`` deleted every annotation of the project (DatasetWriter.close
    replaces -o): refused, with or without --overwrite, before QuPath is started."""
    project = _project(tmp_path / "proj")
    (project / "dannucnet-backups").mkdir()
    out = project / inside
    for extra in ([], ["--overwrite"]):
        line = _fails(["export-training", str(project / "project.qpproj"), "-o", str(out), *extra], capsys, tmp_path)
        assert "nothing was written" in line and "project" in line
    assert (project / "data" / "1" / "data.qpdata").read_bytes() == b"qupath annotations"


def test_export_into_a_link_to_the_project_data_is_refused(tmp_path, capsys):
    project = _project(tmp_path / "proj")
    link = tmp_path / "data-link"
    link.symlink_to(project / "data", target_is_directory=True)
    line = _fails(["export-training", str(project), "-o", str(link), "--overwrite"], capsys, tmp_path)
    assert "nothing was written" in line
    if not paquo_available():  # not a refusal of everything: a folder beside the project gets to QuPath
        line = _fails(["export-training", str(project), "-o", str(tmp_path / "proj-training")], capsys, tmp_path)
        assert PAQUO_HINT in line


# -- demo --------------------------------------------------------------------------------------------------


def test_demo_output_that_cannot_be_a_folder_is_refused(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("user data")
    outs = [afile, afile / "sub"] + ([Path("/proc/nope")] if Path("/proc/self").is_dir() else [])
    for out in outs:
        line = _fails(["demo", "--out", str(out), "-q"], capsys, tmp_path)
        assert "cannot create the output folder" in line and "--out" in line
    assert afile.read_text() == "user data"


@pytest.mark.parametrize("option,value", [("--width", "100000000"), ("--height", "100000000"), ("--width", "0")])
def test_demo_size_is_bounded_before_anything_is_made(tmp_path, capsys, option, value):
    out = tmp_path / "demo"
    line = _fails(["demo", "--out", str(out), option, value, "-q"], capsys, tmp_path)
    assert option in line
    assert not out.exists()
