"""Region and slide pipeline: coordinates, ownership at chunk seams, clipping, bad placements.

The network here is a stand-in that thresholds haematoxylin optical density:
pixel-local and deterministic, so any difference between a chunked and a
single-chunk run can only come from the pipeline's tiling and ownership.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely

from dannucnet.errors import InputError
from dannucnet.evaluate.metrics import score_labels
from dannucnet.geometry.ownership import Rect, centroids_of
from dannucnet.geometry.rasterize import rasterize_polygons
from dannucnet.geometry.stain import hematoxylin_od
from dannucnet.pipeline import SegmentOptions, segment_region, segment_slide
from dannucnet.slides import open_image
from dannucnet.slides.synthetic import make_synthetic_he, write_pyramidal_tiff


def haematoxylin_network(tiles: np.ndarray) -> np.ndarray:
    return np.stack([(hematoxylin_od(t) > 0.5).astype(np.float32) for t in tiles])


@pytest.fixture(scope="module")
def image():
    return make_synthetic_he(1024, 1024, seed=11)


@pytest.fixture(scope="module")
def slide_path(image, tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    write_pyramidal_tiff(path, image.rgb, mpp=0.25, compression="deflate")
    return path


def _polygons(batches) -> list:
    return [n.polygon for batch in batches for n in batch]


def _match(a: list, b: list) -> tuple[int, float]:
    """Greedy IoU matching: (matched count, worst IoU among matches)."""
    tree = shapely.STRtree(b)
    matched, worst = 0, 1.0
    for p in a:
        best = max((p.intersection(b[j]).area / p.union(b[j]).area for j in tree.query(p)), default=0.0)
        if best > 0.5:
            matched += 1
            worst = min(worst, best)
    return matched, worst


def test_chunk_seams_give_each_nucleus_exactly_once(untrained_predictor, slide_path, image):
    with open_image(slide_path) as source:
        single = _polygons(segment_slide(untrained_predictor, source, tile_fn=haematoxylin_network,
                                         options=SegmentOptions(chunk_size=2048, skip_background=False)))
        chunked = _polygons(segment_slide(untrained_predictor, source, tile_fn=haematoxylin_network,
                                          options=SegmentOptions(chunk_size=256, margin=128, skip_background=False)))
    assert len(single) > 60
    # the 256-px cores cut through many nuclei: they must still come back once, whole
    seams = [x for x in (256, 512, 768)]
    crossing = [p for p in single if any(p.bounds[0] < s < p.bounds[2] or p.bounds[1] < s < p.bounds[3] for s in seams)]
    assert len(crossing) > 10
    assert len(chunked) == len(single)
    matched, worst = _match(chunked, single)
    assert matched == len(single) and worst > 0.99
    # no duplicates inside the chunked result
    tree = shapely.STRtree(chunked)
    for i, p in enumerate(chunked):
        for j in tree.query(p):
            if j != i:
                assert p.intersection(chunked[j]).area < 0.1 * p.area
    # and the nuclei are the real ones
    found = rasterize_polygons(chunked, image.labels.shape)
    assert score_labels(image.labels, found)["det_f1"] > 0.9


def test_region_coordinates_are_level0_with_origin_and_downsample(untrained_predictor, image):
    options = SegmentOptions(min_area_um2=4)
    base = segment_region(untrained_predictor, image.rgb, mpp=0.25, tile_fn=haematoxylin_network, options=options)
    shifted = segment_region(untrained_predictor, image.rgb, origin=(1000.0, 2000.5), mpp=0.25,
                             tile_fn=haematoxylin_network, options=options)
    a = sorted(tuple(np.round(centroids_of([n.polygon]), 6)[0]) for n in base.nuclei)
    b = sorted(tuple(np.round(centroids_of([n.polygon])[0] - (1000.0, 2000.5), 6)) for n in shifted.nuclei)
    assert a == b
    # the same tissue sent at half resolution (downsample 2) is resampled back to the
    # model's 0.25 µm/px and its polygons land on the level-0 nuclei
    half = cv2.resize(image.rgb, (512, 512), interpolation=cv2.INTER_AREA)
    low = segment_region(untrained_predictor, half, downsample=2.0, mpp=0.25, tile_fn=haematoxylin_network,
                         options=options)
    found = rasterize_polygons([n.polygon for n in low.nuclei], image.labels.shape)
    assert score_labels(image.labels, found)["det_f1"] > 0.85


def test_core_and_clip_select_by_centroid_without_cutting(untrained_predictor, image):
    full = segment_region(untrained_predictor, image.rgb, mpp=0.25, tile_fn=haematoxylin_network)
    core = Rect(0, 0, 512, 1024)
    left = segment_region(untrained_predictor, image.rgb, mpp=0.25, core=core, tile_fn=haematoxylin_network)
    right = segment_region(untrained_predictor, image.rgb, mpp=0.25, core=Rect(512, 0, 512, 1024),
                           tile_fn=haematoxylin_network)
    assert len(left.nuclei) + len(right.nuclei) == len(full.nuclei)
    assert all(n.centroid[0] < 512 for n in left.nuclei)
    clip = shapely.Point(512, 512).buffer(300)
    inside = segment_region(untrained_predictor, image.rgb, mpp=0.25, clip=clip, tile_fn=haematoxylin_network)
    assert 0 < len(inside.nuclei) < len(full.nuclei)
    full_areas = sorted(round(n.polygon.area, 6) for n in full.nuclei)
    assert all(round(n.polygon.area, 6) in full_areas for n in inside.nuclei)  # never clipped


def test_measurements_are_present_and_sane(untrained_predictor, image):
    result = segment_region(untrained_predictor, image.rgb, mpp=0.25, tile_fn=haematoxylin_network)
    m = result.nuclei[0].measurements
    for key in ("Nucleus: Area", "Nucleus: Perimeter", "Nucleus: Circularity", "Nucleus: Solidity",
                "Detection probability", "Nucleus: Hematoxylin OD mean", "Nucleus: Eosin OD max"):
        assert key in m and np.isfinite(m[key])
    assert m["Nucleus: Area"] == pytest.approx(result.nuclei[0].polygon.area * 0.0625)  # calibrated µm²
    assert not any(k.startswith(("Cell:", "Cytoplasm:")) for k in m)  # no expansion: nuclei only
    assert result.nuclei[0].cell is None
    assert set(result.timings) >= {"model", "instances", "polygons", "measurements"}


def _cells_by_nucleus(batches) -> dict:
    out = {}
    for batch in batches:
        for n in batch:
            c = n.polygon.centroid
            key = (round(c.x, 3), round(c.y, 3))
            assert key not in out, "a nucleus came back twice"
            out[key] = n
    return out


def test_cells_are_seam_exact(untrained_predictor, slide_path):
    """A cell near a chunk seam is the same, whole and once, as in a single-chunk run (3 µm = 12 px expansion)."""
    base = dict(skip_background=False, cell_expansion_um=3.0)
    with open_image(slide_path) as source:
        single = _cells_by_nucleus(segment_slide(untrained_predictor, source, tile_fn=haematoxylin_network,
                                                 options=SegmentOptions(chunk_size=2048, **base)))
        chunked = _cells_by_nucleus(segment_slide(untrained_predictor, source, tile_fn=haematoxylin_network,
                                                  options=SegmentOptions(chunk_size=256, margin=128, **base)))
    assert len(single) > 60 and set(chunked) == set(single)
    seams = (256, 512, 768)
    crossing = [k for k, n in single.items()
                if any(n.cell.bounds[0] < s < n.cell.bounds[2] or n.cell.bounds[1] < s < n.cell.bounds[3]
                       for s in seams)]
    assert len(crossing) > 10, "the test needs cells cut by the 256-px cores"
    for key, n in single.items():
        other = chunked[key]
        assert other.cell.equals(n.cell), f"cell at {key} differs between chunked and single runs"
        for name in ("Cell: Area", "Cytoplasm: Eosin OD mean", "Nucleus/Cell area ratio"):
            assert other.measurements.get(name) == pytest.approx(n.measurements.get(name), rel=1e-6)
    cells = [n.cell for n in chunked.values()]
    tree = shapely.STRtree(cells)
    for i, c in enumerate(cells):
        for j in tree.query(c):
            if j > i:
                assert c.intersection(cells[j]).area < 1e-6, "neighbouring cells overlap"
    for n in chunked.values():
        assert n.cell.covers(n.polygon), "a nucleus sticks out of its cell"
        assert n.cell.area > n.polygon.area


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mpp": None}, "no pixel size"),
        ({"mpp": float("nan")}, "pixel size"),
        ({"mpp": -1.0}, "pixel size"),
        ({"mpp": 0.25, "downsample": 0.0}, "downsample"),
        ({"mpp": 0.25, "downsample": float("inf")}, "downsample"),
        ({"mpp": 0.25, "origin": (float("nan"), 0.0)}, "origin"),
    ],
)
def test_bad_placements_are_refused(untrained_predictor, kwargs, match):
    with pytest.raises(InputError, match=match):
        segment_region(untrained_predictor, np.zeros((32, 32, 3), np.uint8), **kwargs)


def test_bad_options_are_refused():
    with pytest.raises(InputError):
        SegmentOptions(threshold=1.5)
    with pytest.raises(InputError):
        SegmentOptions(chunk_size=10)
    for area in (float("inf"), 1e308, 10_001.0, float("nan"), -1.0):  # inf and 1e308 overflowed int() in px
        with pytest.raises(InputError, match="minimum area must be 0 to 10000"):
            SegmentOptions(min_area_um2=area)
