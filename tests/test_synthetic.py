"""Synthetic H&E: determinism, ground truth consistent with the pixels, realistic sizes and density."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dannucnet.commands import synth as synth_cmd
from dannucnet.errors import InputError, OutputError
from dannucnet.slides import open_image
from dannucnet.slides.synthetic import make_synthetic_he, noise_points, noise_tile, write_synthetic_slide

MPP = 0.25


@pytest.fixture(scope="module")
def img():
    return make_synthetic_he(1024, 1024, seed=7, mpp=MPP)


def test_same_seed_same_image_other_seed_differs(img) -> None:
    again = make_synthetic_he(1024, 1024, seed=7, mpp=MPP)
    np.testing.assert_array_equal(img.rgb, again.rgb)
    np.testing.assert_array_equal(img.labels, again.labels)
    other = make_synthetic_he(1024, 1024, seed=8, mpp=MPP)
    assert np.abs(other.rgb.astype(int) - img.rgb).mean() > 5


def test_noise_tiles_agree_with_points_so_tiles_are_seamless() -> None:
    full = noise_tile(0, 0, 300, 200, 17.0, 123)
    part = noise_tile(150, 64, 100, 100, 17.0, 123)
    np.testing.assert_allclose(part, full[64:164, 150:250], atol=1e-5)
    ys, xs = np.array([5, 70, 199]), np.array([3, 160, 299])
    np.testing.assert_allclose(noise_points(xs, ys, 17.0, 123), full[ys, xs], atol=1e-5)


def test_labels_match_drawn_nuclei(img) -> None:
    labels, rgb = img.labels, img.rgb.astype(np.float32)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    assert ids.size == len(img.nuclei) or ids.size >= 0.97 * len(img.nuclei)  # a few hidden under partners
    assert labels.dtype == np.int32
    # nuclei are haematoxylin-dark and blue-purple, stroma is pink and bright
    nuc, bg = labels > 0, labels == 0
    mean_nuc, mean_bg = rgb[nuc].mean(axis=0), rgb[bg].mean(axis=0)
    assert mean_nuc.sum() < 0.7 * mean_bg.sum()
    assert mean_nuc[2] > mean_nuc[1] and mean_bg[0] > mean_bg[1]  # purple nuclei, pink stroma
    # every labelled nucleus is darker than the ring of stroma just outside it
    import cv2

    darker = 0
    for k in ids[:60]:
        m = (labels == k).astype(np.uint8)
        ring = cv2.dilate(m, np.ones((7, 7), np.uint8)).astype(bool) & bg
        if ring.sum() > 10:
            darker += rgb[m.astype(bool)].mean() < rgb[ring].mean() - 20
    assert darker >= 0.95 * min(60, ids.size)


def test_nucleus_size_and_density_realistic(img) -> None:
    labels = img.labels
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    um2 = areas * MPP * MPP
    eq_diam = 2 * np.sqrt(um2 / np.pi)
    whole = eq_diam[eq_diam > 0]
    assert 5.5 < np.median(whole) < 10.0  # µm
    assert np.percentile(whole, 95) < 12.5
    assert (whole > 4.0).mean() > 0.95  # small ones only where cut by the border or a partner
    tissue_mm2 = labels.size * (MPP / 1000) ** 2
    density = len(img.nuclei) / tissue_mm2
    assert 1000 <= density <= 3000, density
    assert img.nuclei.touching.sum() >= 2  # some touching pairs
    # touching pairs really touch: their labels are 4-adjacent
    t = np.nonzero(img.nuclei.touching)[0]
    adj = set()
    a, b = labels[:, :-1], labels[:, 1:]
    m = (a != b) & (a > 0) & (b > 0)
    adj |= set(zip(a[m].tolist(), b[m].tolist()))
    touching_ids = set(img.nuclei.ids[t].tolist())
    assert any(i in touching_ids or j in touching_ids for i, j in adj)


def test_tissue_fraction_leaves_white_glass() -> None:
    s = make_synthetic_he(768, 768, seed=2, tissue_fraction=0.4)
    white = (s.rgb.min(axis=2) > 225).mean()
    assert 0.4 < white < 0.8
    assert (s.labels[s.rgb.min(axis=2) > 235] == 0).mean() > 0.99  # no nuclei on glass
    blank = make_synthetic_he(256, 256, seed=2, tissue_fraction=0.0)
    assert len(blank.nuclei) == 0 and (blank.rgb.min(axis=2) > 220).all()


def test_bad_parameters_are_input_errors() -> None:
    with pytest.raises(InputError):
        make_synthetic_he(0, 10)
    with pytest.raises(InputError):
        make_synthetic_he(10, 10, mpp=300)
    with pytest.raises(InputError):
        make_synthetic_he(10, 10, tissue_fraction=1.5)


def test_written_slide_equals_in_memory_image_and_labels(tmp_path: Path) -> None:
    mem = make_synthetic_he(1300, 700, seed=3, mpp=0.5)
    res = write_synthetic_slide(tmp_path / "s.tif", (1300, 700), seed=3, mpp=0.5,
                                labels_path=tmp_path / "l.tif", compression="deflate")
    assert len(res.nuclei) == len(mem.nuclei)
    with open_image(res.path) as src:
        assert src.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(src.read_region(0, 0, 1300, 700), mem.rgb)
        assert len(src.level_downsamples) >= 2
    np.testing.assert_array_equal(tifffile.imread(res.labels_path), mem.labels)


def test_synth_command_and_speed(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    synth_cmd.add_arguments(parser)
    out = tmp_path / "cmd.tif"
    args = parser.parse_args([str(out), "--size", "2048", "--height", "1024", "--seed", "4",
                              "--tissue-fraction", "0.6", "--labels", str(tmp_path / "lab.tif")])
    t0 = time.process_time()
    assert synth_cmd.run(args) == 0
    cpu = time.process_time() - t0
    with open_image(out) as src:
        assert (src.width, src.height) == (2048, 1024)
        assert src.mpp == pytest.approx(0.25)
    assert tifffile.imread(tmp_path / "lab.tif").shape == (1024, 2048)
    assert cpu < 30, f"2048x1024 took {cpu:.1f} s CPU"
    bad = parser.parse_args([str(tmp_path / "missing_dir" / "x.tif"), "--size", "64"])
    with pytest.raises(OutputError):
        synth_cmd.run(bad)
    assert not (tmp_path / "missing_dir").exists()
