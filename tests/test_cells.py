"""Cells (nucleus expansion), QuPath's Cell detection measurements and colour deconvolution, cell I/O."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from dannucnet.errors import InputError
from dannucnet.formats.geojson import GeoJSONWriter, features_to_nuclei, nucleus_feature, object_name, read_features
from dannucnet.geometry.cells import cell_margin_px, expand_labels
from dannucnet.geometry.polygons import labels_to_polygons
from dannucnet.geometry.qupath_measurements import (
    TRACED_CORNER,
    hull_calipers,
    imagej_length,
    measure_cells,
    measurement_names,
)
from dannucnet.geometry.qupath_stains import HE_DEFAULT, Stains, estimate_stains, parse_stains, stains_to_json
from dannucnet.pipeline import SegmentOptions
from dannucnet.pipeline.chunk_nuclei import ChunkGeometry, chunk_cells
from dannucnet.pipeline.types import Nucleus

FIXTURE = Path(__file__).parent / "fixtures" / "qupath_cell_measurements.txt"


# ---- expansion ---------------------------------------------------------------------------------------
def _random_labels(seed: int, shape=(90, 110), n=14) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        cy, cx = rng.uniform(5, shape[0] - 5), rng.uniform(5, shape[1] - 5)
        ry, rx = rng.uniform(2, 7), rng.uniform(2, 7)
        disc = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        lab[disc & (lab == 0)] = i
    return lab


@pytest.mark.parametrize("seed", range(6))
def test_expansion_is_nearest_nucleus_within_the_distance(seed):
    lab = _random_labels(seed)
    d = 6.5
    cells = expand_labels(lab, d)
    assert np.array_equal(cells[lab > 0], lab[lab > 0])  # every nucleus pixel stays with its nucleus
    # brute force: distance from every pixel to every nucleus pixel
    ys, xs = np.nonzero(lab)
    owner = lab[ys, xs]
    gy, gx = np.mgrid[: lab.shape[0], : lab.shape[1]]
    dist2 = (gy.ravel()[:, None] - ys[None, :]) ** 2 + (gx.ravel()[:, None] - xs[None, :]) ** 2
    best = dist2.min(1).reshape(lab.shape)
    grown = cells > 0
    assert np.array_equal(grown, best <= d * d)  # exactly the pixels within the distance
    # each grown pixel goes to a nucleus at the smallest distance (ties may go either way)
    nearest_of_owner = np.full(lab.shape, np.inf)
    flat_cells = cells.ravel()
    for i in np.unique(owner):
        di = dist2[:, owner == i].min(1)
        here = flat_cells == i
        nearest_of_owner.ravel()[here] = di[here]
    assert np.array_equal(nearest_of_owner[grown], best[grown])


def test_expansion_clipped_by_allowed_mask_keeps_nuclei():
    lab = np.zeros((40, 40), np.int32)
    lab[15:25, 15:25] = 1
    allowed = np.zeros((40, 40), bool)
    allowed[:, :20] = True  # a parent annotation covering only the left half of the nucleus
    cells = expand_labels(lab, 5, allowed)
    assert (cells[lab > 0] == 1).all()
    assert not (cells[:, 25:] > 0).any() and (cells[:, 10:15] == 1).any()
    assert np.array_equal(expand_labels(lab, 0), lab)
    with pytest.raises(InputError, match="cell expansion"):
        expand_labels(lab, -1)


@pytest.mark.parametrize("seed", range(4))
def test_cell_polygons_never_overlap_and_contain_their_nucleus(seed):
    lab = _random_labels(seed + 10, n=20)
    where = ChunkGeometry(origin=(100.0, 50.0), to_level0=2.0, mpp=0.25, core=None, threshold=0.5, min_area_px=1)
    nuclei = labels_to_polygons(lab, origin=where.origin, scale=where.to_level0, simplify_px=0)
    clip = shapely.Point(200, 140).buffer(80)
    nuclei, cells, cell_labels = chunk_cells(lab, nuclei, where, clip, expansion_um=2.0)
    assert set(cells) == set(nuclei)
    geoms = [cells[i] for i in sorted(cells)]
    assert all(g.is_valid and g.geom_type == "Polygon" for g in geoms)
    for i, a in enumerate(geoms):
        for b in geoms[i + 1 :]:
            assert a.intersection(b).area < 1e-9
    # clipped at pixel centres (QuPath's membership rule): a cell pixel whose centre is outside is a nucleus pixel
    from dannucnet.geometry.rasterize import rasterize_mask

    inside = rasterize_mask(clip, lab.shape, origin=where.origin, scale=where.to_level0)
    assert ((cell_labels > 0) & ~inside <= (lab > 0)).all()
    assert (cell_labels[inside] > 0).sum() > (lab[inside] > 0).sum()  # and it did grow inside
    for i, c in cells.items():
        assert c.covers(nuclei[i])
    # the polygons are the label image: areas match pixel counts (pixel side 2 level-0 px)
    for i, c in cells.items():
        if c.difference(nuclei[i]).area > 0:
            assert c.area == pytest.approx((cell_labels == i).sum() * 4.0)


def test_margin_grows_with_expansion():
    assert cell_margin_px(0) == 0 and cell_margin_px(20) == 40
    assert SegmentOptions(cell_expansion_um=5).chunk_margin(0.25) == 128 + 40
    assert SegmentOptions().chunk_margin(0.25) == 128
    for bad in (-1, 26, float("nan")):
        with pytest.raises(InputError, match="cell expansion"):
            SegmentOptions(cell_expansion_um=bad)


# ---- names -----------------------------------------------------------------------------------------
def test_names_are_qupath_cell_detection_names():
    rows = [line.split("\t") for line in FIXTURE.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    assert all(len(r) == 3 and r[1] and r[2] for r in rows)  # every name has its source line at both tags
    assert measurement_names() == [r[0] for r in rows]
    assert len(rows) == 41
    shared = Path(__file__).resolve().parents[1].parent.parent / "shared" / "qupath" / "cell_detection_measurements.txt"
    if shared.exists():  # what QuPath 0.6.0 itself wrote on a MoNuSeg image
        written = [x for x in shared.read_text(encoding="utf-8").splitlines() if x and not x.startswith("#")]
        assert written == measurement_names()


def test_pipeline_names_are_qupaths_plus_clear_extras():
    lab = np.zeros((30, 30), np.int32)
    lab[5:15, 5:15] = 1
    rgb = np.full((30, 30, 3), 230, np.uint8)
    nuclei = labels_to_polygons(lab, simplify_px=0)
    cells_lab = expand_labels(lab, 4)
    cells = labels_to_polygons(cells_lab, simplify_px=0)
    m = measure_cells(nuclei, lab, rgb, 0.25, cells=cells, cell_labels=cells_lab, prob=np.full((30, 30), 0.9))[1]
    assert list(m)[:41] == measurement_names()
    assert set(m) - set(measurement_names()) == {"Nucleus: Solidity", "Detection probability"}
    only_nuclei = measure_cells(nuclei, lab, rgb, 0.25)[1]
    assert set(only_nuclei) == set(measurement_names(cells=False)) | {"Nucleus: Solidity"}


# ---- values, by hand -------------------------------------------------------------------------------
def test_perimeter_is_imagejs_traced_length():
    """Cell detection's Perimeter is ImageJ's PolygonRoi.getLength: a pixel-edge outline counts as traced
    (staircase length less 2 - sqrt 2 per counted corner), not its staircase length."""
    # an L of three pixels: staircase 8 px; corners counted from vertex 0: 2 (long edges in) + 2 of the 4 unit steps
    ell = [(0, 0), (2, 0), (2, 1), (1, 1), (1, 2), (0, 2), (0, 0)]
    assert imagej_length(np.array(ell)) == pytest.approx(8 - 4 * TRACED_CORNER)
    assert imagej_length(np.array([(0, 0), (4, 0), (4, 2), (0, 2), (0, 0)])) == pytest.approx(12)  # RectangleROI
    assert imagej_length(np.array([(0, 0), (3, 0.5), (0, 2), (0, 0)])) == pytest.approx(
        math.hypot(3, 0.5) + math.hypot(3, 1.5) + 2)  # not a pixel-edge outline: plain length
    lab = np.zeros((6, 6), np.int32)
    lab[1:3, 1:3] = 1
    lab[3, 1] = 1  # the L, through the pipeline's own tracing, at 0.5 µm/px
    v = measure_cells(labels_to_polygons(lab, simplify_px=0), lab, None, 0.5)[1]
    assert v["Nucleus: Perimeter"] == pytest.approx((10 - 4 * TRACED_CORNER) * 0.5)
    # a digitised disc (r = 20 px): traced, circularity 0.89; its staircase length would give about pi/4
    yy, xx = np.mgrid[:45, :45]
    disc = (((yy - 22) ** 2 + (xx - 22) ** 2) <= 20**2).astype(np.int32)
    d = measure_cells(labels_to_polygons(disc, simplify_px=0), disc, None, 1.0)[1]
    assert d["Nucleus: Circularity"] > 0.85 and d["Nucleus: Perimeter"] < 0.85 * shapely.length(
        labels_to_polygons(disc, simplify_px=0)[1].exterior)


def test_shape_values_by_hand():
    # a 4 × 2 px rectangle at 0.5 µm/px
    lab = np.zeros((6, 8), np.int32)
    lab[2:4, 2:6] = 1
    poly = {1: box(2, 2, 6, 4)}
    v = measure_cells(poly, lab, None, 0.5)[1]
    assert v["Nucleus: Area"] == pytest.approx(8 * 0.25)
    assert v["Nucleus: Perimeter"] == pytest.approx(12 * 0.5)
    assert v["Nucleus: Circularity"] == pytest.approx(4 * math.pi * 2.0 / 36.0)
    assert v["Nucleus: Max caliper"] == pytest.approx(math.hypot(4, 2) * 0.5)
    assert v["Nucleus: Min caliper"] == pytest.approx(2 * 0.5)
    # moments of 4 × 2 pixels (+1/12 each): var x = 1.25 + 1/12, var y = 0.25 + 1/12 → ratio 1/4
    assert v["Nucleus: Eccentricity"] == pytest.approx(math.sqrt(1 - 0.25))
    assert v["Nucleus: Solidity"] == pytest.approx(1.0)
    # a right triangle (legs 3, 4): min caliper is its height on the hypotenuse, 12/5
    mx, mn = hull_calipers(np.array([shapely.Polygon([(0, 0), (4, 0), (0, 3)])], dtype=object))
    assert mx[0] == pytest.approx(5) and mn[0] == pytest.approx(2.4)
    # a disc: circularity capped at 1, eccentricity 0 (pixel-square symmetric)
    yy, xx = np.mgrid[:41, :41]
    disc = (((yy - 20) ** 2 + (xx - 20) ** 2) <= 15**2).astype(np.int32)
    d = measure_cells(labels_to_polygons(disc, simplify_px=0), disc, None, None)[1]
    assert d["Nucleus: Eccentricity"] == pytest.approx(0.0, abs=1e-6)
    assert d["Nucleus: Max caliper"] == pytest.approx(31, abs=1.5)


def _od(v: np.ndarray) -> np.ndarray:
    return -np.log10(np.maximum(v, 1) / 255.0)


def test_intensity_values_by_hand():
    # nucleus: two pixels, cell: + two cytoplasm pixels; one pixel white (OD 0)
    lab = np.array([[1, 1, 0, 0]], np.int32)
    cl = np.array([[1, 1, 1, 1]], np.int32)
    rgb = np.array([[[90, 40, 140], [120, 60, 160], [230, 150, 200], [255, 255, 255]]], np.uint8)
    m = np.array([[0.65, 0.70, 0.29], [0.2159, 0.8012, 0.5581]])
    m = m / np.linalg.norm(m, axis=1, keepdims=True)
    third = np.cross(m[0], m[1])
    mat = np.vstack([m, third / np.linalg.norm(third)])
    conc = np.linalg.solve(mat.T, _od(rgb[0].astype(float)).T).T  # OD = conc · M
    h, e = conc[:, 0], conc[:, 1]
    nuc, cell = {1: box(0, 0, 2, 1)}, {1: box(0, 0, 4, 1)}
    v = measure_cells(nuc, lab, rgb, 1.0, cells=cell, cell_labels=cl)[1]
    assert v["Nucleus: Hematoxylin OD mean"] == pytest.approx(h[:2].mean(), rel=1e-5)
    assert v["Nucleus: Hematoxylin OD sum"] == pytest.approx(h[:2].sum(), rel=1e-5)
    assert v["Nucleus: Hematoxylin OD std dev"] == pytest.approx(abs(h[0] - h[1]) / math.sqrt(2), rel=1e-4)
    assert v["Nucleus: Hematoxylin OD range"] == pytest.approx(abs(h[0] - h[1]), rel=1e-4)
    assert v["Nucleus: Eosin OD max"] == pytest.approx(e[:2].max(), rel=1e-5)
    assert v["Cell: Eosin OD mean"] == pytest.approx(e.mean(), rel=1e-5, abs=1e-6)
    assert v["Cell: Hematoxylin OD min"] == pytest.approx(h.min(), abs=1e-6)
    assert v["Cytoplasm: Hematoxylin OD mean"] == pytest.approx(h[2:].mean(), rel=1e-5, abs=1e-6)
    assert v["Cytoplasm: Eosin OD std dev"] == pytest.approx(np.std(e[2:], ddof=1), rel=1e-4)
    assert v["Nucleus/Cell area ratio"] == pytest.approx(0.5)
    assert h[3] == pytest.approx(0.0, abs=1e-12) and v["Cell: Hematoxylin OD max"] == pytest.approx(h.max(), rel=1e-5)


def test_single_pixel_std_dev_is_missing_as_in_qupath():
    lab = np.array([[1]], np.int32)
    v = measure_cells({1: box(0, 0, 1, 1)}, lab, np.zeros((1, 1, 3), np.uint8), 1.0)[1]
    assert "Nucleus: Hematoxylin OD std dev" not in v  # n − 1 = 0: NaN in QuPath, left out here
    # black: OD = log10(255) per channel
    assert v["Nucleus: Hematoxylin OD mean"] == pytest.approx(HE_DEFAULT.deconvolve(np.zeros((1, 3), np.uint8))[0, 0])


# ---- stains ----------------------------------------------------------------------------------------
def test_stains_parse_both_qupath_json_forms():
    text = ('{"Name" : "H&E estimated", "Stain 1" : "Hematoxylin", "Values 1" : "0.6443 0.7167 0.2669", '
            '"Stain 2" : "Eosin", "Values 2" : "0.0928 0.9541 0.2831", "Background" : " 243 241 245"}')
    s = parse_stains(text)
    assert s.name == "H&E estimated" and s.names == ("Hematoxylin", "Eosin", "Residual") and s.residual
    assert s.background == (243.0, 241.0, 245.0)
    assert np.allclose(np.linalg.norm(np.array(s.vectors), axis=1), 1.0)
    third = np.cross(s.vectors[0], s.vectors[1])
    assert np.allclose(s.vectors[2], third / np.linalg.norm(third))
    m = parse_stains({"Hematoxylin": [0.65, 0.70, 0.29], "DAB": [0.27, 0.57, 0.78], "Background": [255, 255, 255]})
    assert m.names[:2] == ("Hematoxylin", "DAB") and measurement_names(m)[6] == "Nucleus: Hematoxylin OD mean"
    assert "Cell: DAB OD mean" in measurement_names(m)
    again = parse_stains(stains_to_json(s))  # QuPath's string form keeps 5 decimals
    assert again.names == s.names and again.background == s.background
    assert np.allclose(again.vectors, s.vectors, atol=1e-5)
    default = parse_stains('{"Name": "H&E default", "Values 1": "h", "Stain 1": "Hematoxylin", "Values 2": "e"}')
    assert np.allclose(default.vectors, HE_DEFAULT.vectors)
    for bad, msg in (("{nope", "not valid JSON"), ('{"Values 1": "1 2"}', "three numbers"),
                     ('{"Values 1": "1 0 0", "Values 2": "2 0 0"}', "parallel"), ("[]", "JSON object")):
        with pytest.raises(InputError, match=msg):
            parse_stains(bad)


def test_estimate_stains_recovers_the_stains_of_a_synthetic_image():
    rng = np.random.default_rng(1)
    h = np.array([0.60, 0.75, 0.28])
    e = np.array([0.10, 0.95, 0.30])
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    amounts = rng.uniform(0, 1, (20000, 2)) ** 2 * np.array([[0.8, 0.6]])
    amounts[:5000, 1] = 0.0  # pure haematoxylin pixels
    amounts[5000:10000, 0] = 0.0  # pure eosin pixels
    od = amounts @ np.vstack([h, e])
    rgb = np.clip(np.rint(255 * 10 ** (-od)), 0, 255).astype(np.uint8).reshape(100, 200, 3)
    est = estimate_stains(rgb)
    assert np.degrees(np.arccos(np.clip(np.dot(est.vectors[0], h), -1, 1))) < 3
    assert np.degrees(np.arccos(np.clip(np.dot(est.vectors[1], e), -1, 1))) < 3
    with pytest.raises(InputError, match="too few stained pixels"):
        estimate_stains(np.full((10, 10, 3), 255, np.uint8))


# ---- GeoJSON / GeoParquet --------------------------------------------------------------------------
def _cell_nucleus(x=10.0) -> Nucleus:
    return Nucleus(polygon=box(x, 10, x + 6, 16), probability=0.8, cell=box(x - 3, 7, x + 9, 19),
                   measurements={"Nucleus: Area": 2.25, "Cell: Area": 9.0, "Nucleus/Cell area ratio": 0.25})


def test_cells_written_as_qupath_cells_and_read_back(tmp_path):
    meta = {"model": "dan-nucnet-monuseg", "model_version": "1.5"}
    f = nucleus_feature(_cell_nucleus(), meta)
    assert list(f) == ["type", "id", "geometry", "nucleusGeometry", "properties"]
    assert f["properties"]["objectType"] == "cell"
    assert f["properties"]["name"] == "dannucnet:dan-nucnet-monuseg@1.5"
    assert shapely.geometry.shape(f["geometry"]).equals(box(7, 7, 19, 19))
    assert shapely.geometry.shape(f["nucleusGeometry"]).equals(box(10, 10, 16, 16))
    out = tmp_path / "cells.geojson"
    nuclei = [_cell_nucleus(10.0 + 20 * i) for i in range(3)]
    nuclei.append(Nucleus(polygon=box(100, 100, 104, 104), probability=0.5))
    with GeoJSONWriter(out, meta) as w:
        w.write(nuclei)
    features = read_features(out)
    assert [ft["properties"]["objectType"] for ft in features] == ["cell"] * 3 + ["detection"]
    assert all(ft["properties"]["name"] == object_name(meta) for ft in features)
    back = features_to_nuclei(features)
    for a, b in zip(nuclei, back):
        assert a.polygon.equals(b.polygon) and a.id == b.id
        assert (a.cell is None and b.cell is None) or a.cell.equals(b.cell)
        assert b.measurements.items() >= a.measurements.items()
    json.dumps(features, allow_nan=False)


def test_object_name_is_the_batch_tag():
    from dannucnet.qupath.batch import detection_tag
    from dannucnet.qupath.regions import is_own_detection

    name = object_name({"model": "m", "model_version": "2.0"})
    assert name == detection_tag("m", "2.0") and is_own_detection(name)
    assert object_name({}) is None


def test_geoparquet_cells_have_both_geometries_and_the_columns(tmp_path):
    pytest.importorskip("pyarrow")
    from dannucnet.formats.geoparquet import GeoParquetWriter, read_geoparquet

    out = tmp_path / "cells.parquet"
    nuclei = [_cell_nucleus(10.0 + 20 * i) for i in range(3)]
    with GeoParquetWriter(out, {"model": "m"}) as w:
        w.write(nuclei)
    back, meta = read_geoparquet(out)
    assert set(meta["geo"]["columns"]) == {"geometry", "nucleus_geometry"}
    for a, b in zip(nuclei, back):
        assert a.cell.equals(b.cell) and a.polygon.equals(b.polygon)
        assert b.measurements["Nucleus/Cell area ratio"] == 0.25 and b.measurements["Cell: Area"] == 9.0


def test_proto_carries_cells_and_stains():
    from dannucnet.service.convert import nuclei_from_proto, nuclei_to_proto, stains_from_proto, stains_to_proto

    nuclei = [_cell_nucleus(), Nucleus(polygon=box(0, 0, 3, 3), probability=0.4)]
    msgs = nuclei_to_proto(nuclei)
    assert msgs[0].cell_wkb and msgs[1].cell_wkb == b""
    back = nuclei_from_proto(msgs)
    assert back[0].cell.equals(nuclei[0].cell) and back[1].cell is None
    s = parse_stains('{"Hematoxylin": [0.6, 0.7, 0.3], "Eosin": [0.1, 0.9, 0.3], "Background": [250, 250, 250]}')
    assert stains_from_proto(stains_to_proto(s)) == Stains.make(s.name, [("Hematoxylin", np.array([0.6, 0.7, 0.3])),
                                                                         ("Eosin", np.array([0.1, 0.9, 0.3]))],
                                                                (250.0, 250.0, 250.0))


def test_auto_stains_are_estimated_per_image(tmp_path):
    from dannucnet.pipeline.slide import resolve_stains
    from dannucnet.slides import open_image
    from dannucnet.slides.synthetic import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "s.tif", (512, 384), seed=3, mpp=0.25).path
    options = SegmentOptions(auto_stains=True, cell_expansion_um=2.0)
    with open_image(path) as source:
        resolved = resolve_stains(source, options)
    assert not resolved.auto_stains and resolved.cell_expansion_um == 2.0
    assert resolved.stains is not None and resolved.stains.names[:2] == ("Hematoxylin", "Eosin")
    h = np.array(resolved.stains.vectors[0])
    assert h[0] > resolved.stains.vectors[1][0]  # haematoxylin has more red OD than eosin
    assert resolve_stains(source, SegmentOptions()) == SegmentOptions()  # nothing asked, nothing read

