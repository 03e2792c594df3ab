"""Tissue mask: tissue vs white glass on synthetic slides, rectangle fractions for chunk skipping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dannucnet.slides import open_image
from dannucnet.slides.synthetic import make_synthetic_he, write_pyramidal_tiff
from dannucnet.slides.tissue import TissueMask, tissue_mask


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory):
    s = make_synthetic_he(2048, 1536, seed=11, tissue_fraction=0.45)
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("t") / "s.tif", s.rgb, mpp=0.25, compression="jpeg")
    return s, path


def test_mask_matches_known_tissue(slide) -> None:
    s, path = slide
    with open_image(path) as src:
        tm = tissue_mask(src, mpp_target=8.0)
    assert tm.downsample == pytest.approx(32.0)
    assert tm.mask.shape == (48, 64)
    truth = s.rgb.min(axis=2) < 220  # tissue pixels in the generated image
    truth_small = truth.reshape(48, 32, 64, 32).mean(axis=(1, 3)) > 0.5
    agree = (tm.mask == truth_small).mean()
    assert agree > 0.9, agree
    assert 0.3 < tm.fraction < 0.65
    # every nucleus lies in tissue
    ys, xs = s.nuclei.cy, s.nuclei.cx
    inside = [tm.fraction_in((x - 16, y - 16, 32, 32)) > 0 for x, y in zip(xs, ys)]
    assert np.mean(inside) > 0.97


def test_rect_fractions_and_skipping(slide) -> None:
    s, path = slide
    with open_image(path) as src:
        tm = tissue_mask(src)
    assert tm.fraction_in((0, 0, 2048, 1536)) == pytest.approx(tm.fraction, abs=1e-6)
    glass = s.rgb.min(axis=2) > 235
    # find a 256-px block that is all glass and one that is all tissue
    blocks = [(x, y) for x in range(0, 2048, 256) for y in range(0, 1536, 256)]
    all_glass = [b for b in blocks if glass[b[1]:b[1] + 256, b[0]:b[0] + 256].mean() > 0.99]
    all_tissue = [b for b in blocks if glass[b[1]:b[1] + 256, b[0]:b[0] + 256].mean() < 0.01]
    assert all_glass and all_tissue
    for x, y in all_glass:
        assert not tm.has_tissue((x, y, 256, 256), min_fraction=0.05)
    for x, y in all_tissue:
        assert tm.fraction_in((x, y, 256, 256)) > 0.9
    # outside the image counts as glass
    assert tm.fraction_in((5000, 5000, 100, 100)) == 0.0
    assert tm.fraction_in((0, 0, 0, 10)) == 0.0


def test_accepts_ownership_rect_when_present(slide) -> None:
    _, path = slide
    try:
        from dannucnet.geometry.ownership import Rect
    except ImportError:
        pytest.skip("geometry.ownership.Rect not available yet")
    with open_image(path) as src:
        tm = tissue_mask(src)
    assert tm.fraction_in(Rect(0, 0, 2048, 1536)) == pytest.approx(tm.fraction_in((0, 0, 2048, 1536)))


def test_all_tissue_and_all_glass_images(tmp_path: Path) -> None:
    full = make_synthetic_he(640, 640, seed=1, tissue_fraction=1.0).rgb
    Image.fromarray(full).save(tmp_path / "full.png")
    Image.fromarray(np.full((640, 640, 3), 244, np.uint8)).save(tmp_path / "glass.png")
    with open_image(tmp_path / "full.png", mpp=0.25) as src:
        assert tissue_mask(src).fraction > 0.95  # Otsu must not split pure tissue in two
    with open_image(tmp_path / "glass.png", mpp=0.25) as src:
        assert tissue_mask(src).fraction == 0.0
    # unknown pixel size still works (falls back to a fixed thumbnail size)
    with open_image(tmp_path / "full.png") as src:
        tm = tissue_mask(src)
        assert isinstance(tm, TissueMask) and tm.fraction > 0.95
