"""``dannucnet segment`` end to end on a generated pyramidal TIFF, and every bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import shapely.geometry
import tifffile
from PIL import Image

from conftest import monuseg_root, requires_monuseg
from dannucnet.cli import main
from dannucnet.slides.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    return write_synthetic_slide(folder / "slide.tif", (640, 512), seed=2, mpp=0.25).path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dannucnet", *args], capture_output=True, text=True, timeout=600)


def test_segment_writes_qupath_geojson_and_overlay(slide, tmp_path):
    out, overlay = tmp_path / "nuclei.geojson.gz", tmp_path / "overlay.png"
    code = main(["segment", str(slide), "-o", str(out), "--overlay", str(overlay), "--region", "0,0,600,512", "-q",
                 "--model", "untrained", "--threshold", "0.45"])
    assert code == 0
    doc = json.loads(gzip.decompress(out.read_bytes()))
    assert doc["type"] == "FeatureCollection"
    for feature in doc["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == "Nucleus"
        assert props["metadata"]["model"] == "untrained" and props["metadata"]["image"] == "slide.tif"
    with Image.open(overlay) as im:
        assert im.size == (600, 512)
    assert not list(tmp_path.glob(".*part"))


def test_segment_gives_qupath_cells_with_cell_detection_names(slide, tmp_path, capsys):
    from dannucnet.geometry.qupath_measurements import measurement_names

    out = tmp_path / "cells.geojson"
    code = main(["segment", str(slide), "-o", str(out), "--region", "0,0,400,300", "-q", "--model", "untrained",
                 "--threshold", "0.45", "--cell-expansion", "5", "--stains", "auto"])
    assert code == 0
    features = json.loads(out.read_text())["features"]
    assert len(features) > 3
    for f in features:
        props = f["properties"]
        assert props["objectType"] == "cell" and props["name"].startswith("dannucnet:untrained@")
        cell, nucleus = shapely.geometry.shape(f["geometry"]), shapely.geometry.shape(f["nucleusGeometry"])
        assert cell.is_valid and cell.covers(nucleus) and cell.area > nucleus.area
        assert set(measurement_names()) <= set(props["measurements"])  # QuPath's 41, plus our extras
    ratios = [f["properties"]["measurements"]["Nucleus/Cell area ratio"] for f in features]
    assert all(0 < r < 1 for r in ratios)


@requires_monuseg
def test_shipped_model_finds_real_nuclei_end_to_end(tmp_path):
    """The default model, through the CLI, on a real Kumar-test H&E image it never saw in training."""
    from dannucnet.evaluate.metrics import score_labels
    from dannucnet.formats.geojson import features_to_nuclei, read_features
    from dannucnet.geometry.rasterize import rasterize_polygons
    from dannucnet.model import load_model

    if not load_model(None).card.trained:
        pytest.skip("no trained default model installed in models/")
    stem = "TCGA-B0-5698-01Z-00-DX1"
    image = tmp_path / f"{stem}.png"
    Image.fromarray(tifffile.imread(monuseg_root() / "images" / f"{stem}.tif")[..., :3]).save(image)
    out = tmp_path / "nuclei.geojson"
    assert main(["segment", str(image), "-o", str(out), "--mpp", "0.25", "-q"]) == 0
    nuclei = features_to_nuclei(read_features(out))
    truth = tifffile.imread(monuseg_root() / "labels" / f"{stem}.tif").astype(np.int32)
    scores = score_labels(truth, rasterize_polygons([n.polygon for n in nuclei], truth.shape))
    # measured for dannucnet-monuseg 1.0: pixel F1 0.78, detection F1 0.74 on this image
    assert scores["f1"] > 0.7 and scores["det_f1"] > 0.6, scores


def _plain_tiff_without_mpp(path: Path) -> Path:
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8))
    return path


BAD_INPUTS = {
    "missing file": (lambda d: ["segment", str(d / "nope.svs"), "-o", str(d / "o.geojson")],
                     "not found|does not exist|no such"),
    "not an image": (lambda d: ["segment", str(_write(d / "x.tif", b"hello")), "-o", str(d / "o.geojson")],
                     "not|cannot|unsupported"),
    "truncated tiff": (lambda d: ["segment", str(_truncated(d)), "-o", str(d / "o.geojson")],
                       "truncat|corrupt|cannot|incomplete"),
    "no pixel size": (lambda d: ["segment", str(_plain_tiff_without_mpp(d / "p.tif")), "-o", str(d / "o.geojson")],
                      "--mpp"),
    "implausible --mpp": (lambda d: ["segment", str(_plain_tiff_without_mpp(d / "p.tif")), "-o", str(d / "o.geojson"),
                                     "--mpp", "352.8"], "mpp|pixel size"),
    "region outside": (lambda d: ["segment", "{slide}", "-o", str(d / "o.geojson"), "--region", "5000,5000,100,100"],
                       "outside"),
    "malformed region": (lambda d: ["segment", "{slide}", "-o", str(d / "o.geojson"), "--region", "1,2,3"], "X,Y,W,H"),
    "unwritable output": (lambda d: ["segment", "{slide}", "-o", str(d / "no" / "such" / "o.geojson")],
                          "does not exist|cannot write"),
    "output is a folder": (lambda d: ["segment", "{slide}", "-o", str(d)], "folder"),
    "unknown model": (lambda d: ["segment", "{slide}", "-o", str(d / "o.geojson"), "--model", "no-such-model"],
                      "unknown model"),
    "unavailable device": (lambda d: ["segment", "{slide}", "-o", str(d / "o.geojson"), "--device", "cuda"],
                           "cuda|device"),
    "bad threshold": (lambda d: ["segment", "{slide}", "-o", str(d / "o.geojson"), "--threshold", "2"], "threshold"),
    "cell expansion too large": (lambda d: ["segment", "{slide}", "-o", str(d / "o.geojson"), "--cell-expansion", "30"],
                                 "cell expansion"),
    "malformed stains": (lambda d: ["segment", "{slide}", "-o", str(d / "o.geojson"), "--stains",
                                    '{"Values 1": "0.65 0.70", "Values 2": "0.2 0.8 0.5"}'], "three numbers"),
    "stains neither json nor file": (lambda d: ["segment", "{slide}", "-o", str(d / "o.geojson"), "--stains", "h&e"],
                                     "--stains"),
    "tta with a server": (lambda d: ["segment", "{slide}", "-o", str(d / "o.geojson"), "--tta", "--server",
                                     "127.0.0.1:9"], "--tta.*--server"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(folder: Path) -> Path:
    source = folder / "full.tif"
    write_synthetic_slide(source, 512, seed=1)
    data = source.read_bytes()
    return _write(folder / "truncated.tif", data[: len(data) // 3])


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_leaves_nothing(case, slide, tmp_path, capsys):
    build, pattern = BAD_INPUTS[case]
    args = [a.replace("{slide}", str(slide)) for a in build(tmp_path)]
    before = set(tmp_path.rglob("*"))
    code = main([*args, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"exit {code}: {err}"
    message = [line for line in err if "error:" in line]
    assert len(message) == 1 and "Traceback" not in "\n".join(err)
    import re

    assert re.search(pattern, message[0], re.IGNORECASE), message[0]
    assert not any(p.name.endswith((".geojson", ".part", ".png")) for p in set(tmp_path.rglob("*")) - before)


def test_help_and_version():
    result = run_cli("segment", "--help")
    assert result.returncode == 0 and "--mpp" in result.stdout and "--overlay" in result.stdout
    assert run_cli("--version").stdout.startswith("dannucnet ")
