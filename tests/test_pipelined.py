"""The pipelined slide runner gives exactly the nuclei of the reference chunk loop."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dannucnet.engine import Predictor
from dannucnet.errors import CancelledError
from dannucnet.model import LoadedModel, ModelCard
from dannucnet.pipeline import SegmentOptions, plan_slide, segment_slide
from dannucnet.pipeline.pipelined import PipelineConfig, PipelineStats, segment_slide_pipelined
from dannucnet.slides import open_image
from dannucnet.slides.synthetic import write_synthetic_slide


class DarknessNet(nn.Module):
    """A fixed per-pixel 'network': haematoxylin-dark pixels → high logit.

    Cheap enough to run a many-chunk slide in a test, yet it finds the synthetic
    nuclei, so post-processing, ownership and seams are exercised for real.
    """

    config = SimpleNamespace(stride=16, outputs=1)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([-30.0, -30.0, 0.0]).view(1, 3, 1, 1)
            self.conv.bias[:] = 24.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipelined") / "slide.tif"
    return write_synthetic_slide(path, (1100, 900), seed=3, tissue_fraction=0.7)


def _key(nuclei):
    return sorted((round(n.polygon.centroid.x, 3), round(n.polygon.centroid.y, 3), round(n.polygon.area, 3),
                   round(n.measurements.get("Hematoxylin OD mean", 0.0), 5)) for n in nuclei)


@pytest.mark.parametrize("config", [
    PipelineConfig(readers=2, batch_size=3),  # batches straddle chunk borders
    PipelineConfig(readers=1, batch_size=7, post_workers=2, prefetch=1),
    PipelineConfig(readers=2, batch_size=4, post_workers=1, post_processes=True),  # the GPU-box default
])
def test_same_nuclei_as_segment_slide(slide, config):
    predictor = Predictor(LoadedModel(DarknessNet(), ModelCard(name="darkness", version="1"), "test"), device="cpu")
    options = SegmentOptions(chunk_size=256, margin=64)
    with open_image(slide.path) as src:
        plan = plan_slide(src, predictor.card.mpp, options=options)
        assert len(plan.chunks) >= 9, "the test needs many chunks and seams"
        reference = [n for batch in segment_slide(predictor, src, options=options, plan=plan) for n in batch]
        stats = PipelineStats()
        seen = []
        batches = list(segment_slide_pipelined(predictor, src, options=options, plan=plan, config=config,
                                               stats=stats, progress=lambda d, t, n: seen.append((d, t, n))))
    assert len(batches) == len(plan.chunks)
    pipelined = [n for batch in batches for n in batch]
    assert len(reference) > 50
    assert _key(pipelined) == _key(reference)
    assert {n.polygon.wkb for n in pipelined} == {n.polygon.wkb for n in reference}
    assert seen[-1] == (len(plan.chunks), len(plan.chunks), len(reference))
    assert stats.chunks == len(plan.chunks) and stats.nuclei == len(reference)
    assert stats.tiles > 0 and stats.decode_megapixels > 0 and stats.post_seconds > 0


def _both_runners(predictor, slide, pipelined: bool = True):
    """Nuclei of the reference chunk loop and (unless ``pipelined`` is off) of the pipelined runner."""
    options = SegmentOptions(chunk_size=256, margin=64)
    with open_image(slide.path) as src:
        plan = plan_slide(src, predictor.card.mpp, options=options)
        reference = [n for b in segment_slide(predictor, src, options=options, plan=plan) for n in b]
        piped = [n for b in segment_slide_pipelined(predictor, src, options=options, plan=plan,
                                                    config=PipelineConfig(readers=2, batch_size=3)) for n in b] \
            if pipelined else None
    return reference, piped


def test_colour_normalising_model_gives_the_same_nuclei_in_both_runners(slide):
    """A card with a colour reference: chunks are normalised once (never per window) in both runners,
    and the normalisation really reaches the network (a darker target finds more nucleus pixels)."""
    ref = {"method": "reinhard-lab", "mean": [105.0, 160.0, 112.0], "std": [45.0, 10.0, 8.0]}
    plain = Predictor(LoadedModel(DarknessNet(), ModelCard(name="darkness", version="1"), "test"), device="cpu")
    normalising = Predictor(LoadedModel(DarknessNet(), ModelCard(name="darkness", version="2", colour_reference=ref),
                                        "test"), device="cpu")
    reference, piped = _both_runners(normalising, slide)
    unnormalised, _ = _both_runners(plain, slide, pipelined=False)
    assert _key(piped) == _key(reference) and len(reference) > 50
    assert sum(n.polygon.area for n in reference) > 1.1 * sum(n.polygon.area for n in unnormalised)


class DarknessDistanceNet(DarknessNet):
    """DarknessNet plus a second, distance-like channel (a blurred copy), as a distance-head model returns."""

    config = SimpleNamespace(stride=16, outputs=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.conv(x)
        return torch.cat([logit, nn.functional.avg_pool2d(logit, 9, stride=1, padding=4)], dim=1)


def test_distance_head_model_gives_the_same_nuclei_in_both_runners(slide):
    """Two-channel maps (probability, distance) blend and travel through both runners alike."""
    predictor = Predictor(LoadedModel(DarknessDistanceNet(), ModelCard(name="darkness", version="3"), "test"),
                          device="cpu")
    reference, piped = _both_runners(predictor, slide)
    assert len(reference) > 50 and _key(piped) == _key(reference)
    assert all(0.5 <= n.probability <= 1.0 for n in reference)


def test_engine_matches_predictor_with_the_real_network(untrained_predictor):
    """DAN-NucNet through the pinned-batch engine (batches of 3 over 9 windows) gives the
    probabilities of Predictor.predict; an untrained network finds no nuclei, so compare maps."""
    from dannucnet.engine.tile_engine import TileEngine
    from dannucnet.slides.synthetic import make_synthetic_he

    rgb = make_synthetic_he(300, 280, seed=2).rgb
    reference = untrained_predictor.predict(rgb)
    got = TileEngine(untrained_predictor, batch_size=3).predict(rgb)
    assert got.shape == reference.shape == (280, 300)
    assert np.abs(got - reference).max() < 1e-5


def test_cancel_and_early_close_stop_cleanly(slide):
    predictor = Predictor(LoadedModel(DarknessNet(), ModelCard(name="darkness", version="1"), "test"), device="cpu")
    options = SegmentOptions(chunk_size=256, margin=64)
    with open_image(slide.path) as src:
        gen = segment_slide_pipelined(predictor, src, options=options, config=PipelineConfig(batch_size=2))
        next(gen)
        gen.close()  # stops the threads without hanging
        with pytest.raises(CancelledError):
            list(segment_slide_pipelined(predictor, src, options=options, cancel=lambda: True))


def test_flip_tta_is_the_mean_of_the_four_flips_in_both_engines(untrained_predictor):
    """--tta: each window's map is the mean over its four flips (flipped back), alike in Predictor and TileEngine."""
    from dannucnet.engine.tile_engine import TileEngine
    from dannucnet.slides.synthetic import make_synthetic_he

    plain = untrained_predictor
    tta = Predictor(plain.model, device="cpu", tta=True)
    tiles = make_synthetic_he(256, 512, seed=4).rgb.reshape(1, 256, 512, 3)[:, :, :256].copy()
    tiles = np.concatenate([tiles, tiles[:, ::-1].copy()])
    by_hand = (plain.predict_tiles(tiles) + plain.predict_tiles(tiles[:, :, ::-1].copy())[:, :, ::-1]
               + plain.predict_tiles(tiles[:, ::-1].copy())[:, ::-1]
               + plain.predict_tiles(tiles[:, ::-1, ::-1].copy())[:, ::-1, ::-1]) / 4
    got = tta.predict_tiles(tiles)
    assert np.abs(got - by_hand).max() < 1e-5
    assert np.abs(got - plain.predict_tiles(tiles)).max() > 1e-4  # an untrained network is not flip-symmetric
    rgb = make_synthetic_he(300, 280, seed=2).rgb
    assert np.abs(TileEngine(tta, batch_size=3).predict(rgb) - tta.predict(rgb)).max() < 1e-5
