"""QuPath GeoJSON: fields exactly as QuPath's PathObjectTypeAdapter reads them, atomic streaming writes."""

from __future__ import annotations

import gzip
import json
import os
import time
import uuid
from pathlib import Path

import pytest
from shapely.geometry import MultiPolygon, Point, Polygon, box

from dannucnet.errors import InputError, OutputError
from dannucnet.formats.geojson import (
    GeoJSONWriter,
    ensure_writable,
    features_to_nuclei,
    nucleus_feature,
    read_features,
)
from dannucnet.pipeline.types import Nucleus


def _nucleus(x: float = 10.0, y: float = 20.0, **meas: float) -> Nucleus:
    poly = Polygon([(x, y), (x + 10.123456, y), (x + 10.123456, y + 8.987654), (x, y + 8.987654)])
    return Nucleus(polygon=poly, probability=0.87, measurements={"Area µm^2": 5.5, **meas})


def _signed_area(ring: list[list[float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def test_feature_fields_exactly_as_qupath_reads_them() -> None:
    n = _nucleus(bad=float("nan"), inf=float("inf"))
    f = nucleus_feature(n, {"model": "dan-nucnet", "version": 3})
    assert set(f) == {"type", "id", "geometry", "properties"}
    assert f["type"] == "Feature"
    assert str(uuid.UUID(f["id"])) == f["id"] == n.id
    props = f["properties"]
    assert set(props) == {"objectType", "name", "classification", "measurements", "metadata"}
    assert props["objectType"] == "detection"
    assert props["name"] == "dannucnet:dan-nucnet"  # our tag (no model_version in this metadata)
    assert props["classification"]["name"] == "Nucleus"
    color = props["classification"]["color"]
    assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    assert props["measurements"] == {"Area µm^2": 5.5, "Detection probability": 0.87}  # NaN/inf dropped
    assert props["metadata"] == {"model": "dan-nucnet", "version": "3"}  # string map
    assert "type" not in props  # would be read as objectType alias
    geom = f["geometry"]
    assert geom["type"] == "Polygon"
    ring = geom["coordinates"][0]
    assert ring[0] == ring[-1]
    for x, y in ring:
        assert round(x, 2) == x and round(y, 2) == y
    assert [20.12, 20.0] in ring and [20.12, 28.99] in ring
    json.dumps(f, allow_nan=False)  # strict JSON


def test_orientation_consistent_and_holes_kept() -> None:
    cw = Polygon([(0, 0), (0, 10), (10, 10), (10, 0)])
    ccw = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)])
    holed = Polygon(ccw.exterior.coords, [[(2, 2), (4, 2), (4, 4), (2, 4)]])
    areas = []
    for p in (cw, ccw, holed):
        rings = nucleus_feature(Nucleus(p, 0.5), {})["geometry"]["coordinates"]
        areas.append(_signed_area(rings[0]))
        for hole in rings[1:]:
            assert _signed_area(hole) < 0
    assert all(a > 0 for a in areas)
    multi = MultiPolygon([box(0, 0, 1, 1), box(3, 3, 4, 4)])
    g = nucleus_feature(Nucleus(multi, 0.5), {})["geometry"]
    assert g["type"] == "MultiPolygon" and len(g["coordinates"]) == 2


def test_rounding_drops_repeated_points() -> None:
    p = Polygon([(0, 0), (5, 0), (5.001, 0.001), (5, 5), (0, 5)])
    ring = nucleus_feature(Nucleus(p, 0.5), {})["geometry"]["coordinates"][0]
    assert all(a != b for a, b in zip(ring, ring[1:]))
    assert len(ring) == 5


@pytest.mark.parametrize("name", ["out.geojson", "out.geojson.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    nuclei = [_nucleus(i * 30.0, 5.0, Perimeter=float(i)) for i in range(50)]
    path = tmp_path / name
    with GeoJSONWriter(path, {"model": "m"}) as w:
        assert w.write(nuclei[:20]) == 20
        w.write(iter(nuclei[20:]))
        w.extra["summary"] = {"nuclei": 50}
    assert w.count == 50
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        doc = json.loads(gzip.decompress(path.read_bytes()))
    else:
        doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection" and doc["summary"] == {"nuclei": 50}
    feats = read_features(path)
    assert len(feats) == 50
    back = features_to_nuclei(feats)
    for a, b in zip(nuclei, back):
        assert a.id == b.id
        assert b.probability == pytest.approx(0.87)
        assert b.measurements["Perimeter"] == a.measurements["Perimeter"]
        assert b.polygon.symmetric_difference(a.polygon).area < 0.5  # only 0.01 px rounding
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_empty_collection_is_valid(tmp_path: Path) -> None:
    with GeoJSONWriter(tmp_path / "e.geojson", {}):
        pass
    assert json.loads((tmp_path / "e.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.geojson.gz"

    def nuclei():
        for i in range(100):
            if i == 60:
                raise RuntimeError("model crashed")
            yield _nucleus(i * 1.0, 0.0)

    with pytest.raises(RuntimeError, match="model crashed"):
        with GeoJSONWriter(path, {}) as w:
            w.write(nuclei())
    assert list(tmp_path.iterdir()) == []
    # an existing output is not clobbered by a failed run
    path.write_text("previous")
    with pytest.raises(RuntimeError):
        with GeoJSONWriter(path, {}) as w:
            w.write(nuclei())
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.geojson.gz"]


def test_unwritable_path_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        GeoJSONWriter(tmp_path / "no" / "such" / "dir" / "x.geojson", {})
    with pytest.raises(OutputError, match="folder"):
        ensure_writable(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write to read-only folders (root)")
        with pytest.raises(OutputError, match="not writable"):
            GeoJSONWriter(ro / "x.geojson", {})
    finally:
        ro.chmod(0o700)


def test_read_features_errors_and_shapes(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_features(tmp_path / "missing.geojson")
    (tmp_path / "bad.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(InputError, match="not valid GeoJSON"):
        read_features(tmp_path / "bad.geojson")
    f = nucleus_feature(_nucleus(), {})
    (tmp_path / "one.geojson").write_text(json.dumps(f))
    (tmp_path / "arr.geojson").write_text(json.dumps([f, f]))
    assert len(read_features(tmp_path / "one.geojson")) == 1
    assert len(read_features(tmp_path / "arr.geojson")) == 2
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}
    assert features_to_nuclei([point]) == []


def test_throughput(tmp_path: Path) -> None:
    import numpy as np
    import shapely

    ring = np.asarray(Point(0, 0).buffer(8, quad_segs=8).exterior.coords)  # 33 vertices, a typical nucleus
    offsets = np.stack([np.arange(20000) % 300 * 20.0, np.arange(20000) // 300 * 20.0], axis=1)
    polys = shapely.polygons(ring[None, :, :] + offsets[:, None, :] + 0.123)
    nuclei = [Nucleus(p, 0.9, {"Area µm^2": 12.5, "Perimeter µm": 12.0, "Circularity": 0.9}) for p in polys]
    t0 = time.process_time()
    with GeoJSONWriter(tmp_path / "big.geojson.gz", {"model": "m"}) as w:
        w.write(nuclei)
    rate = len(nuclei) / (time.process_time() - t0)
    assert rate > 2000, f"{rate:.0f} features/s"
    assert len(read_features(tmp_path / "big.geojson.gz")) == 20000


def test_streamed_batch_matches_single_feature_path(tmp_path: Path) -> None:
    cw = Polygon([(0.004, 0), (0, 10.456), (10, 10), (10, 0)])
    holed = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(2, 2), (4, 2), (4, 4), (2, 4)]])
    multi = MultiPolygon([box(0, 0, 1, 1), box(3, 3, 4, 4)])
    sliver = Polygon([(0, 0), (0.001, 0), (0.001, 0.001)])  # collapses to a point at 0.01 px
    nuclei = [Nucleus(p, 0.5, {"m": 1.0}) for p in (cw, holed, multi, _nucleus().polygon, sliver)]
    with GeoJSONWriter(tmp_path / "b.geojson", {"k": "v"}) as w:
        w.write(nuclei)
    assert w.count == 4 and w.skipped == 1
    feats = read_features(tmp_path / "b.geojson")
    for f, n in zip(feats, nuclei[:4]):
        assert f == json.loads(json.dumps(nucleus_feature(n, {"k": "v"})))
