"""Windows with nothing to find are not run: glass (tiling.GlassMap), and what lies farther from a
clip (a QuPath annotation, the slide's regions of interest) than a chunk margin (chunk_nuclei.clip_reach).
The nuclei must come back the same, to the vertex; only fewer windows run."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from dannucnet.engine import Predictor
from dannucnet.engine.tiling import GlassMap, cheapest_window, plan_windows
from dannucnet.errors import InputError
from dannucnet.pipeline import SegmentOptions, segment_region
from dannucnet.pipeline.chunk_nuclei import ChunkGeometry, clip_reach
from dannucnet.slides.synthetic import make_synthetic_he


class Counted:
    """The predictor's own windows, counted on their way to the network."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor, self.windows = predictor, 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.windows += len(tiles)
        return self.predictor.predict_tiles(tiles)


def _both_ways(predictor: Predictor, rgb: np.ndarray, **kwargs) -> tuple[list, int, list, int]:
    """Nuclei (as WKB) and windows run with every window run, then with the skip."""
    out = []
    for skip in (False, True):
        predictor.skip_glass = skip
        counted = Counted(predictor)
        try:
            nuclei = segment_region(predictor, rgb, mpp=0.25, options=SegmentOptions(), tile_fn=counted,
                                    **kwargs).nuclei
        finally:
            predictor.skip_glass = True
        out += [[n.polygon.wkb for n in nuclei], counted.windows]
    return out[0], out[1], out[2], out[3]


def test_skipping_glass_windows_gives_the_same_nuclei(shipped):
    rgb = make_synthetic_he(1536, 1024, seed=4, mpp=0.25, tissue_fraction=0.2, density=4000).rgb
    prepared = shipped.prepare(rgb)
    side = cheapest_window(*rgb.shape[:2], shipped.sides, shipped.overlap, GlassMap(prepared))
    assert side == shipped.window_for(*rgb.shape[:2])  # both runs cut the same windows
    blank = GlassMap(prepared).blank(plan_windows(*rgb.shape[:2], side, shipped.overlap), side)
    every, n_every, skipped, n_skipped = _both_ways(shipped, rgb)
    assert len(every) > 30 and skipped == every
    assert (n_every, n_skipped) == (len(blank), len(blank) - sum(blank)) and sum(blank) >= 10


def test_windows_beyond_a_clips_reach_are_not_run_and_its_nuclei_stay_the_same(shipped):
    rgb = make_synthetic_he(1400, 1400, seed=2, mpp=0.25, density=4000).rgb  # all tissue: no window is glass
    clip = shapely.Polygon([(150, 120), (520, 180), (430, 560), (130, 470)])  # drawn in the top-left corner
    fixed = Predictor(shipped.model, device="cpu", tile_size=256)  # one side: the skip is all that differs
    every, n_every, skipped, n_skipped = _both_ways(fixed, rgb, clip=clip)
    assert len(every) > 20 and skipped == every
    reach = clip.buffer(128)  # the 40× model's chunk margin: 32 µm
    near = [w for w in plan_windows(1400, 1400, 256, 32)
            if reach.intersects(shapely.box(w.x, w.y, w.x + 256, w.y + 256))]
    assert n_every == 49 and n_skipped == len(near) < 20  # of 7 × 7 windows of 256²
    # the default predictor may pick another side for what runs: still the clip's nuclei only
    nuclei = segment_region(shipped, rgb, mpp=0.25, options=SegmentOptions(), clip=clip).nuclei
    assert abs(len(nuclei) - len(every)) <= 2 and all(clip.contains(n.polygon.centroid) for n in nuclei)


def test_clip_reach_is_the_clip_grown_by_the_margin_in_model_pixels():
    where = ChunkGeometry(origin=(1000.0, 2000.0), to_level0=2.0, mpp=0.25, core=None, threshold=0.5, min_area_px=1)
    clip = shapely.box(1100, 2100, 1200, 2200)  # level 0: model px 50–100 on both axes
    reach = clip_reach(clip, (300, 400), where, margin_px=20)
    assert reach is not None and reach.shape == (300, 400)
    rows, cols = np.nonzero(reach)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (30, 119, 30, 119)
    assert not reach[30, 30] and not reach[35, 35] and reach[37, 37]  # the corners are round (radius 20)
    assert clip_reach(None, (300, 400), where, 20) is None
    assert clip_reach(shapely.box(0, 0, 5000, 5000), (300, 400), where, 20) is None  # reaches every pixel: no mask
    far = clip_reach(shapely.box(9000, 9000, 9100, 9100), (300, 400), where, 20)
    assert far is not None and not far.any()
    bow_tie = shapely.Polygon([(1100, 2100), (1200, 2200), (1200, 2100), (1100, 2200)])  # drawn crossing itself
    assert not bow_tie.is_valid
    crossed = clip_reach(bow_tie, (300, 400), where, 20)
    assert crossed is not None and not (crossed & ~reach).any() and crossed.sum() > 0.9 * reach.sum()  # two triangles


def test_a_mask_of_another_shape_is_refused(untrained_predictor):
    rgb = np.full((300, 300, 3), 128, np.uint8)
    with pytest.raises(InputError, match="mask of wanted pixels"):
        untrained_predictor.predict(rgb, within=np.ones((300, 299), bool))


def test_the_server_side_predictor_passes_the_mask_on(untrained_predictor):
    """BatchedPredictor (the server's) runs only the wanted windows, like the predictor it wraps."""
    from dannucnet.service.batched_predictor import BatchedPredictor

    rgb = np.random.default_rng(0).integers(0, 200, size=(600, 600, 3), dtype=np.uint8)
    within = np.zeros((600, 600), bool)
    within[:50, :50] = True
    served = BatchedPredictor(untrained_predictor, max_batch=4)
    try:
        counted = Counted(untrained_predictor)
        full = untrained_predictor.predict(rgb, tile_fn=counted)
        n_full, counted.windows = counted.windows, 0
        part = served.predict(rgb, tile_fn=counted, within=within)
    finally:
        served.close()
    assert 0 < counted.windows < n_full
    np.testing.assert_allclose(part[:50, :50], full[:50, :50], atol=1e-5)
