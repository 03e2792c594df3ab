"""GeoParquet output: same nuclei as the GeoJSON, streamed in row groups, atomic, readable by plain pyarrow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box

from dannucnet.errors import OutputError
from dannucnet.formats import geoparquet
from dannucnet.formats.geojson import PROBABILITY_KEY, features_to_nuclei, read_features
from dannucnet.formats.geoparquet import GeoParquetWriter, read_geoparquet
from dannucnet.pipeline.types import Nucleus

pq = pytest.importorskip("pyarrow.parquet", reason="GeoParquet needs pyarrow (pip install 'dannucnet[parquet]')")


def nuclei(n: int, seed: int = 0) -> list[Nucleus]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x, y = rng.uniform(0, 50_000, 2)
        poly = shapely.Point(x, y).buffer(rng.uniform(3, 9), quad_segs=4)
        out.append(Nucleus(polygon=poly, probability=float(rng.uniform(0.5, 1)),
                           measurements={"Area µm^2": float(poly.area / 16), "Circularity": float(rng.uniform())}))
    return out


def test_round_trip_keeps_geometry_ids_and_measurements(tmp_path):
    items = nuclei(300)
    items.append(Nucleus(polygon=Polygon(), probability=0.9))  # degenerate: skipped, counted
    path = tmp_path / "slide.parquet"
    with GeoParquetWriter(path, metadata={"model": "m", "mpp": 0.25}) as w:
        w.write(items)
    assert (w.count, w.skipped) == (300, 1)
    back, meta = read_geoparquet(path)
    assert [b.id for b in back] == [n.id for n in items[:300]]
    assert all(shapely.equals_exact(a.polygon, b.polygon, 0) for a, b in zip(items, back))
    for a, b in zip(items, back):
        assert b.measurements["Area µm^2"] == a.measurements["Area µm^2"]
        assert b.measurements[PROBABILITY_KEY] == a.probability
    assert meta["geo"]["primary_column"] == "geometry" and meta["geo"]["version"] == "1.1.0"
    assert meta["geo"]["columns"]["geometry"]["encoding"] == "WKB"
    assert meta["dannucnet"] == {"model": "m", "mpp": "0.25"}
    # plain pyarrow sees typed columns, and centroids for cheap spatial queries
    table = pq.read_table(path, columns=["centroid_x", "Circularity"])
    c = shapely.get_coordinates(shapely.centroid(items[0].polygon))[0]
    assert table.column("centroid_x")[0].as_py() == pytest.approx(c[0])
    assert str(table.schema.field("Circularity").type) == "double"


def test_streams_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(geoparquet, "ROW_GROUP", 100)
    path = tmp_path / "big.parquet"
    with GeoParquetWriter(path) as w:
        for k in range(5):
            w.write(nuclei(100, seed=k))
            assert len(w._pending) == 0  # written as soon as a row group is full: nothing piles up
    assert pq.ParquetFile(path).num_row_groups == 5 and w.count == 500


def test_failure_leaves_nothing_and_empty_runs_give_a_valid_file(tmp_path):
    path = tmp_path / "fail.parquet"
    with pytest.raises(RuntimeError):
        with GeoParquetWriter(path) as w:
            w.write(nuclei(10))
            raise RuntimeError("cancelled")
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty.parquet"
    with GeoParquetWriter(empty) as w:
        w.write([])
    assert read_geoparquet(empty)[0] == [] and pq.read_table(empty).num_rows == 0
    with pytest.raises(OutputError, match="folder"):
        GeoParquetWriter(tmp_path / "missing" / "x.parquet")


def test_segment_writes_the_same_nuclei_as_geojson(tmp_path, untrained_predictor):
    from dannucnet.formats.geoparquet import GeoParquetWriter
    from dannucnet.jobs.segment_file import segment_to_file, segment_to_geojson
    from dannucnet.jobs.segmenters import LocalSegmenter
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.slides.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.tif", 320, seed=3, mpp=0.25)
    segmenter = LocalSegmenter(untrained_predictor, SegmentOptions(threshold=0.3, min_area_um2=0))
    a = segment_to_geojson(segmenter, slide.path, tmp_path / "s.geojson")
    b = segment_to_file(segmenter, slide.path, tmp_path / "s.parquet", GeoParquetWriter)
    assert a.nuclei == b.nuclei > 0
    from_json = features_to_nuclei(read_features(tmp_path / "s.geojson"))
    from_parquet, meta = read_geoparquet(tmp_path / "s.parquet")
    assert meta["dannucnet"]["model"] == "untrained"

    def key(ns):
        return sorted((round(n.centroid[0], 1), round(n.centroid[1], 1), round(n.polygon.area, 1)) for n in ns)

    assert key(from_json) == key(from_parquet)
    assert json.loads(json.dumps(meta["geo"]))["columns"]["geometry"]["geometry_types"] == ["Polygon"]
    assert all(box(0, 0, 320, 320).contains(n.polygon) for n in from_parquet)


def test_cohort_refuses_an_unknown_format_before_any_work(tmp_path):
    from dannucnet.cohort import run_cohort
    from dannucnet.errors import InputError

    with pytest.raises(InputError, match="output format 'csv'"):
        run_cohort([tmp_path / "a.svs"], tmp_path / "out", model="untrained", output_format="csv")
    from dannucnet.cohort.runner import OUTPUT_SUFFIX

    assert OUTPUT_SUFFIX == {"geojson": ".geojson.gz", "parquet": ".parquet"}
