"""Odd writer inputs: non-finite vertices, clashing measurement names, MultiPolygons, 16-bit PNGs.

GeoJSON and GeoParquet must treat the same nuclei alike (skip, write or refuse), and an image's
pixels must not depend on whether they came in a PNG or a TIFF.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon, box

from dannucnet.errors import OutputError
from dannucnet.formats.geojson import GeoJSONWriter, features_to_nuclei, read_features
from dannucnet.pipeline.types import Nucleus
from dannucnet.slides import open_image

NAN, INF = float("nan"), float("inf")


def bad_polygon(value: float, hole: bool = False) -> Polygon:
    with warnings.catch_warnings():  # shapely warns on building a ring with NaN in it
        warnings.simplefilter("ignore", RuntimeWarning)
        if hole:  # a polygon with a hole takes another path through the GeoJSON writer than a simple one
            return Polygon([(0, 0), (0, 10), (10, 10), (10, 0)], [[(2, 2), (value, 8), (8, 8), (8, 2)]])
        return Polygon([(0, 0), (value, 10), (10, 10), (10, 0)])


def good(x: float = 0.0) -> Nucleus:
    return Nucleus(polygon=box(x, 0, x + 10, 10), probability=0.9, measurements={"Area": 100.0})


def bad_nuclei() -> list[Nucleus]:
    """A NaN vertex, one in a hole, an infinite vertex, and a good nucleus whose cell has a NaN vertex."""
    return [
        Nucleus(polygon=bad_polygon(NAN), probability=0.9, measurements={"Area": 1.0}),
        Nucleus(polygon=bad_polygon(NAN, hole=True), probability=0.9, measurements={"Area": 1.0}),
        Nucleus(polygon=bad_polygon(INF), probability=0.9, measurements={"Area": 1.0}),
        Nucleus(polygon=box(50, 50, 60, 60), probability=0.9, measurements={"Area": 1.0}, cell=bad_polygon(NAN)),
    ]


# -- A: GeoJSON -------------------------------------------------------------------------------------


def test_geojson_skips_non_finite_vertices(tmp_path):
    path = tmp_path / "nan.geojson"
    with GeoJSONWriter(path) as w:
        w.write([good(), *bad_nuclei(), good(100)])
    assert (w.count, w.skipped) == (2, 4)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the GeoJSON"))
    assert len(data["features"]) == 2
    for f in data["features"]:
        values = [v for ring in f["geometry"]["coordinates"] for point in ring for v in point]
        assert values and all(isinstance(v, float) and math.isfinite(v) for v in values)  # no null


# -- B: GeoParquet, the same nuclei as the GeoJSON ----------------------------------------------------

pq = pytest.importorskip("pyarrow.parquet", reason="GeoParquet needs pyarrow (pip install 'dannucnet[parquet]')")

from dannucnet.formats.geoparquet import GeoParquetWriter, read_geoparquet  # noqa: E402


def geo_meta(path: Path) -> dict:
    """The ``geo`` metadata as plain pyarrow (geopandas' reader) sees it."""
    return json.loads(pq.read_schema(path).metadata[b"geo"])


def test_geoparquet_skips_non_finite_vertices(tmp_path):
    path = tmp_path / "nan.parquet"
    with GeoParquetWriter(path) as w:
        w.write([good(), *bad_nuclei(), good(100)])
    assert (w.count, w.skipped) == (2, 4)
    back, _ = read_geoparquet(path)
    assert [n.polygon.bounds[0] for n in back] == [0, 100]
    assert np.isfinite(pq.read_table(path).column("centroid_x").to_numpy()).all()


@pytest.mark.parametrize("name", ["id", "geometry", "nucleus_geometry", "centroid_x", "centroid_y"])
def test_geoparquet_refuses_a_measurement_named_like_its_own_columns(tmp_path, name):
    path = tmp_path / "clash.parquet"
    nucleus = Nucleus(polygon=box(0, 0, 10, 10), probability=0.9, measurements={"Area": 1.0, name: 5.0})
    with pytest.raises(OutputError, match=f"measurement '{name}'.*rename"):
        with GeoParquetWriter(path) as w:
            w.write([nucleus])
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no file, no temporary left over


def test_multipolygon_nucleus_is_written_by_both_and_declared(tmp_path):
    multi = MultiPolygon([box(0, 0, 10, 10), box(20, 0, 30, 10)])
    items = [Nucleus(polygon=multi, probability=0.9, measurements={"Area": 200.0}), good(100)]
    with GeoJSONWriter(tmp_path / "m.geojson") as gj:
        gj.write(items)
    with GeoParquetWriter(tmp_path / "m.parquet") as gp:
        gp.write(items)
    assert (gj.count, gj.skipped) == (gp.count, gp.skipped) == (2, 0)
    from_json = features_to_nuclei(read_features(tmp_path / "m.geojson"))
    from_parquet, meta = read_geoparquet(tmp_path / "m.parquet")
    assert [n.polygon.geom_type for n in from_parquet] == [n.polygon.geom_type for n in from_json]
    assert shapely.equals(from_parquet[0].polygon, multi)
    assert geo_meta(tmp_path / "m.parquet")["columns"]["geometry"]["geometry_types"] == ["MultiPolygon", "Polygon"]
    assert meta["geo"] == geo_meta(tmp_path / "m.parquet")
    with GeoParquetWriter(tmp_path / "p.parquet", metadata={"model": "m"}) as w:  # polygons only: just Polygon
        w.write(items[1:])
    _, meta = read_geoparquet(tmp_path / "p.parquet")
    assert meta["geo"]["columns"]["geometry"]["geometry_types"] == ["Polygon"] and meta["dannucnet"] == {"model": "m"}


def test_geometry_types_of_cells_list_what_was_written(tmp_path):
    cell = MultiPolygon([box(-5, -5, 15, 15), box(40, 40, 45, 45)])
    items = [Nucleus(polygon=box(0, 0, 10, 10), probability=0.9, cell=cell),
             Nucleus(polygon=box(100, 0, 110, 10), probability=0.9, cell=box(95, -5, 115, 15))]
    path = tmp_path / "cells.parquet"
    with GeoParquetWriter(path) as w:
        w.write(items)
    assert w.count == 2
    columns = geo_meta(path)["columns"]
    assert columns["geometry"]["geometry_types"] == ["MultiPolygon", "Polygon"]
    assert columns["nucleus_geometry"]["geometry_types"] == ["Polygon"]
    back, _ = read_geoparquet(path)
    assert shapely.equals(back[0].cell, cell)


# -- C: 16-bit greyscale PNG is scaled as a 16-bit TIFF -------------------------------------------------


def test_16bit_png_reads_as_8bit_png_and_16bit_tiff(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(30, 180, (48, 64), dtype=np.uint8)  # not full range: a stretch would change it
    Image.fromarray(grey).save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    tifffile.imwrite(tmp_path / "g16.tif", grey.astype(np.uint16) * 257)
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit PNG
    reads = {}
    for name in ("g8.png", "g16.png", "g16.tif"):
        with open_image(tmp_path / name) as src:
            reads[name] = src.read_region(0, 0, 64, 48)
    np.testing.assert_array_equal(reads["g16.png"], reads["g8.png"])
    np.testing.assert_array_equal(reads["g16.png"], reads["g16.tif"])
    np.testing.assert_array_equal(reads["g16.png"][..., 0], grey)
