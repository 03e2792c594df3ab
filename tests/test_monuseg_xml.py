"""MoNuSeg / Aperio XML reader: small hand-made files, then the real MoNuSeg annotations when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dannucnet.errors import InputError
from dannucnet.evaluate.metrics import instance_scores, pixel_scores
from dannucnet.formats.monuseg_xml import DEFAULT_OFFSET, microns_per_pixel, read_monuseg_xml
from dannucnet.geometry.rasterize import rasterize_polygons

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DANNUCNET_DATA", REPO.parent / "shared" / "data"))
MONUSEG = DATA / "monuseg-train"


def _xml(regions: list[list[tuple[float, float]]], mpp: str | None = "0.252000") -> str:
    attr = f' MicronsPerPixel="{mpp}"' if mpp is not None else ""
    body = []
    for i, vertices in enumerate(regions, 1):
        vs = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in vertices)
        body.append(f'<Region Id="{i}" Type="0"><Attributes/><Vertices>{vs}</Vertices></Region>')
    return (
        f"<Annotations{attr}>\n\t<Annotation Id=\"1\" Type=\"4\"><Attributes/><Regions>"
        f"<RegionAttributeHeaders/>{''.join(body)}</Regions><Plots/></Annotation>\n</Annotations>\n"
    )


def test_reads_polygons_in_pixel_edge_coordinates(tmp_path: Path) -> None:
    path = tmp_path / "a.xml"
    # A square with vertices on the centres of pixels (2..5, 1..3), given unclosed as in the files
    # (integer vertices, as throughout TCGA-B0-5710).
    path.write_text(_xml([[(2, 1), (5, 1), (5, 3), (2, 3)]]))
    (poly,) = read_monuseg_xml(path)
    # + 0.5 (centre of pixel c is c + 0.5 in QuPath's convention) + a 0.001 px tie-breaking nudge
    assert poly.bounds == pytest.approx((2.501, 1.501, 5.501, 3.501))
    assert poly.exterior.is_closed
    raw = read_monuseg_xml(path, offset=0.0)[0]
    assert raw.bounds == (2, 1, 5, 3)
    # Rasterised at pixel centres it covers exactly the pixels whose centres the XML outline encloses.
    labels = rasterize_polygons([poly], (6, 8), origin=(0, 0), scale=1.0)
    # Centres exactly on the outline: poly2mask's rule (right and bottom edge pixels in, left and top out).
    expected = np.zeros((6, 8), bool)
    expected[2:4, 3:6] = True
    assert np.array_equal(labels > 0, expected)


def test_skips_degenerate_regions_and_repairs_self_intersections(tmp_path: Path) -> None:
    path = tmp_path / "b.xml"
    bowtie = [(0, 0), (10, 10), (10, 0), (0, 10)]  # crosses itself: two triangles
    lopsided = [(0, 0), (20, 20), (20, 0), (0, 4)]  # crossing near one end: one big and one small loop
    path.write_text(_xml([[(1, 1), (4, 4)], [(1, 1), (1, 1), (1, 1)], bowtie, lopsided,
                          [(30, 30), (34, 30), (32, 33)]]))
    polys = read_monuseg_xml(path)
    assert len(polys) == 3  # 2-vertex region and zero-area region skipped
    assert all(p.is_valid and p.geom_type == "Polygon" and p.area > 0 for p in polys)
    # The larger loop of the lopsided outline is kept as the nucleus.
    assert polys[1].area > 0.7 * 200


def test_microns_per_pixel(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.xml", tmp_path / "b.xml", tmp_path / "c.xml"
    a.write_text(_xml([], mpp="0.252700"))
    b.write_text(_xml([], mpp=None))
    c.write_text(_xml([], mpp="72"))  # not a calibration
    assert microns_per_pixel(a) == pytest.approx(0.2527)
    assert microns_per_pixel(b) is None
    assert microns_per_pixel(c) is None
    assert read_monuseg_xml(b) == []


def test_bad_files_raise_input_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.xml"
    broken.write_text("<Annotations><Annotation>")
    with pytest.raises(InputError, match="not a readable"):
        read_monuseg_xml(broken)
    with pytest.raises(InputError, match="does not exist"):
        read_monuseg_xml(tmp_path / "missing.xml")
    other = tmp_path / "other.xml"
    other.write_text("<svg/>")
    with pytest.raises(InputError, match="Annotations"):
        read_monuseg_xml(other)
    bad_vertex = tmp_path / "bad.xml"
    bad_vertex.write_text(_xml([[(1, 1), (4, "x"), (2, 5)]]))
    with pytest.raises(InputError, match="numeric"):
        read_monuseg_xml(bad_vertex)


def test_vertices_outside_the_image_are_clipped_when_rasterised(tmp_path: Path) -> None:
    path = tmp_path / "edge.xml"
    path.write_text(_xml([[(-2.9, -2.0), (4.2, -2.0), (4.2, 3.2), (-2.9, 3.2)]]))
    (poly,) = read_monuseg_xml(path)
    assert poly.bounds[0] < 0  # kept as drawn; the raster clips
    labels = rasterize_polygons([poly], (10, 10), origin=(0, 0), scale=1.0)
    assert labels.shape == (10, 10)
    # Centres of columns 0..4 (0.5..4.5 < 4.7) and rows 0..3 (0.5..3.5 < 3.7) are inside.
    expected = np.zeros((10, 10), bool)
    expected[0:4, 0:5] = True
    assert np.array_equal(labels > 0, expected)


# ---------------------------------------------------------------- real MoNuSeg files

# <Region> counts from the data MANIFEST minus the 2-vertex regions (one each in 50-5931 and E2-A1B5).
EXPECTED_POLYGONS = {
    "TCGA-21-5784-01Z-00-DX1": 398,
    "TCGA-21-5786-01Z-00-DX1": 440,
    "TCGA-50-5931-01Z-00-DX1": 444,
    "TCGA-A7-A13E-01Z-00-DX1": 314,
    "TCGA-AR-A1AK-01Z-00-DX1": 433,
    "TCGA-AR-A1AS-01Z-00-DX1": 405,
    "TCGA-B0-5698-01Z-00-DX1": 357,
    "TCGA-B0-5710-01Z-00-DX1": 359,
    "TCGA-B0-5711-01Z-00-DX1": 342,
    "TCGA-CH-5767-01Z-00-DX1": 294,
    "TCGA-E2-A1B5-01Z-00-DX1": 328,
    "TCGA-G9-6362-01Z-00-DX1": 472,
    "TCGA-NH-A8F7-01A-01-TS1": 363,
}

needs_data = pytest.mark.skipif(
    not (MONUSEG / "annotations").is_dir(),
    reason=f"MoNuSeg data not found at {MONUSEG} (set DANNUCNET_DATA to the folder holding monuseg-train/)",
)


@pytest.fixture(scope="module")
def real_polygons() -> dict[str, list]:
    return {stem: read_monuseg_xml(MONUSEG / "annotations" / f"{stem}.xml") for stem in EXPECTED_POLYGONS}


@needs_data
@pytest.mark.data
def test_real_polygon_counts(real_polygons: dict[str, list]) -> None:
    counts = {stem: len(polys) for stem, polys in real_polygons.items()}
    assert counts == EXPECTED_POLYGONS
    assert sum(counts.values()) == 4949
    assert all(p.is_valid for polys in real_polygons.values() for p in polys)
    assert microns_per_pixel(MONUSEG / "annotations" / "TCGA-21-5784-01Z-00-DX1.xml") == pytest.approx(0.2527)
    assert microns_per_pixel(MONUSEG / "annotations" / "TCGA-NH-A8F7-01A-01-TS1.xml") is None


@needs_data
@pytest.mark.data
def test_real_labels_agree_with_xml_rasterisation(real_polygons: dict[str, list]) -> None:
    """labels/ = the XML read with vertex (X, Y) at the centre of pixel (col X, row Y).

    The organisers' MATLAB poly2mask masks sit 1 px up-left of that (1-based
    reading); the shipped labels undo it (+1/+1). With our +0.5 px shift into
    pixel-edge coordinates (plus the 0.001 px tie nudge that copies poly2mask's
    edge rule) the two conventions meet: foreground Dice >= 0.99 on every file
    (measured 0.996-0.998) and every labelled nucleus found at IoU > 0.5.
    """
    import tifffile

    for stem, polys in real_polygons.items():
        truth = tifffile.imread(MONUSEG / "labels" / f"{stem}.tif").astype(np.int32)
        raster = rasterize_polygons(polys, truth.shape, origin=(0, 0), scale=1.0)
        dice = pixel_scores(truth, raster).f1
        assert dice >= 0.99, f"{stem}: foreground Dice {dice:.4f}"
        inst = instance_scores(truth, raster)
        assert inst.tp >= inst.n_true - 1, f"{stem}: {inst.n_true - inst.tp} labelled nuclei unmatched"


@needs_data
@pytest.mark.data
def test_real_labels_pick_the_documented_offset() -> None:
    """Offset search on the hardest file (integer vertices): 0.5 + nudge wins, 0 and 1 px lose clearly."""
    import tifffile
    from shapely import affinity

    stem = "TCGA-B0-5710-01Z-00-DX1"
    truth = tifffile.imread(MONUSEG / "labels" / f"{stem}.tif")
    raw = read_monuseg_xml(MONUSEG / "annotations" / f"{stem}.xml", offset=0.0)
    dice = {}
    for offset in (0.0, 0.5, DEFAULT_OFFSET, 1.0):
        shifted = [affinity.translate(p, offset, offset) for p in raw]
        dice[offset] = pixel_scores(truth, rasterize_polygons(shifted, truth.shape, origin=(0, 0), scale=1.0)).f1
    assert max(dice, key=dice.get) == DEFAULT_OFFSET, dice
    assert dice[DEFAULT_OFFSET] > 0.995, dice
    assert dice[0.0] < 0.95 and dice[1.0] < 0.99 and dice[0.5] < 0.95, dice
