"""Facts read from QuPath project files without QuPath: URIs, pixel size, offsets, GeoJSON import checks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from shapely.geometry import Point, mapping

from dannucnet.errors import InputError
from dannucnet.qupath.entries import (
    ImageEntryData,
    bounds_offset,
    mpp_from_server_metadata,
    read_server_json,
    resolve_image_path,
    server_provider,
    uri_to_path,
)


def test_uri_to_path_forms():
    assert uri_to_path("file:/data/slides/a%20b.svs") == Path("/data/slides/a b.svs")
    assert uri_to_path("file:///data/x.tif") == Path("/data/x.tif")
    assert str(uri_to_path("file:/C:/slides/x.svs")).replace("\\", "/") == "C:/slides/x.svs"
    assert str(uri_to_path("file://server/share/x.svs")).replace("\\", "/") == "//server/share/x.svs"
    with pytest.raises(InputError, match="not a local file"):
        uri_to_path("https://omero.example/img/1")


def test_moved_image_message_names_update_image_paths(tmp_path):
    e = ImageEntryData("1", "moved.svs", (tmp_path / "moved.svs").as_uri(), 10, 10)
    with pytest.raises(InputError, match=r"update_image_paths\(try_relative=True\)"):
        resolve_image_path(e)
    (tmp_path / "moved.svs").write_bytes(b"x")
    assert resolve_image_path(e) == tmp_path / "moved.svs"


def test_pixel_size_from_server_json(tmp_path):
    entry_dir = tmp_path / "data" / "1"
    entry_dir.mkdir(parents=True)
    server = {
        "builder": {"builderType": "uri",
                    "providerClassName": "qupath.lib.images.servers.openslide.OpenslideServerBuilder",
                    "uri": "file:/x.mrxs"},
        "metadata": {"width": 100, "height": 80,
                     "pixelCalibration": {"pixelWidth": {"value": 0.2527, "unit": "µm"},
                                          "pixelHeight": {"value": 0.2527, "unit": "µm"}}},
    }
    (entry_dir / "server.json").write_text(json.dumps(server), encoding="utf-8")
    doc = read_server_json(entry_dir)
    assert mpp_from_server_metadata(doc["metadata"]) == pytest.approx(0.2527)
    assert server_provider(doc).endswith("OpenslideServerBuilder")
    uncalibrated = {"pixelCalibration": {"pixelWidth": {"value": 1.0, "unit": "px"}}}
    assert mpp_from_server_metadata(uncalibrated) is None
    dpi = {"pixelCalibration": {"pixelWidth": {"value": 352.8, "unit": "µm"}}}  # 72 dpi, not a microscope
    assert mpp_from_server_metadata(dpi) is None
    assert read_server_json(tmp_path / "nowhere") == {}


def test_bounds_offset_only_for_openslide_with_bounds():
    props = {"openslide.bounds-x": "1200", "openslide.bounds-y": "340"}
    assert bounds_offset("qupath.lib.images.servers.openslide.OpenslideServerBuilder", props) == (1200, 340)
    assert bounds_offset("qupath.lib.images.servers.bioformats.BioFormatsServerBuilder", props) == (0, 0)
    assert bounds_offset("...OpenslideServerBuilder", {}) == (0, 0)
    assert bounds_offset(None, props) == (0, 0)


def _feature(x, y, r, metadata=None):
    props = {"objectType": "detection", "classification": {"name": "Nucleus"},
             "measurements": {"Area µm^2": 3.0, "Detection probability": 0.9}}
    if metadata:
        props["metadata"] = metadata
    return {"type": "Feature", "id": f"id-{x}-{y}", "geometry": mapping(Point(x, y).buffer(r)), "properties": props}


def test_import_geojson_checks(tmp_path):
    from dannucnet.qupath.import_geojson import check_belongs, read_nuclei

    slide = tmp_path / "slide1.svs"
    slide.write_bytes(b"x")
    entry = ImageEntryData("1", "slide1.svs", slide.as_uri(), 200, 200)
    meta = {"image": "/elsewhere/slide1.svs", "model": "m", "model_version": "2"}
    doc = {"type": "FeatureCollection", "features": [_feature(50, 50, 5, meta), _feature(100, 80, 4, meta)]}
    path = tmp_path / "n.geojson.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(doc, fh)
    data = read_nuclei(path)
    assert len(data.nuclei) == 2 and data.model == ("m", "2")
    assert data.nuclei[0].probability == pytest.approx(0.9) and data.nuclei[0].id == "id-50-50"
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    (tmp_path / "b.geojson").write_text(json.dumps([{**_feature(5, 5, 1), "geometry": bowtie}]))
    fixed = read_nuclei(tmp_path / "b.geojson")
    assert fixed.counts["invalid geometries fixed"] == 1 and fixed.nuclei[0].polygon.is_valid
    assert len(check_belongs(data, entry)) == 2
    other = ImageEntryData("2", "slide2.svs", (tmp_path / "slide2.svs").as_uri(), 200, 200)
    with pytest.raises(InputError, match="made from 'slide1.svs'"):
        check_belongs(data, other)
    assert len(check_belongs(data, other, force=True)) == 2
    shifted = {"type": "FeatureCollection", "features": [_feature(500, 50, 5), _feature(100, 80, 4),
                                                         {"type": "Feature", "geometry": None, "properties": {}}]}
    (tmp_path / "s.geojson").write_text(json.dumps(shifted))
    data = read_nuclei(tmp_path / "s.geojson")
    assert data.counts["features that are not polygons skipped"] == 1
    with pytest.raises(InputError, match="outside slide1.svs"):
        check_belongs(data, entry)
    assert len(check_belongs(data, entry, force=True)) == 1
    assert data.counts["nuclei outside the image dropped"] == 1
    with pytest.raises(InputError, match="not found"):
        read_nuclei(tmp_path / "missing.geojson")
