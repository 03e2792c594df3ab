"""Issue 20's training additions: negatives, pigment dots, more training sets, NuInsSeg's held-out split."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from dannucnet.engine.colour import ColourReference, lab_stats, normalise_colour
from dannucnet.errors import InputError
from dannucnet.formats.dataset import DatasetWriter
from dannucnet.formats.nuinsseg import heldout_splits
from dannucnet.geometry.stain import rgb_to_hed, rgb_to_od
from dannucnet.slides.synthetic import make_synthetic_he
from dannucnet.train.loop import TrainConfig, train
from dannucnet.train.patches import PatchSampler, TrainImage, add_pigment, add_pigment_as_scanned, strip_haematoxylin


def _image(stem: str, size: int, seed: int) -> TrainImage:
    im = make_synthetic_he(size, size, seed=seed, density=3000.0)
    mask = (im.labels > 0).astype(np.uint8)
    return TrainImage(stem, im.rgb, mask, np.ones_like(mask), (0, size), (mask * 255).astype(np.uint8))


def _dataset(root, name: str, seed: int, n: int = 2, size: int = 160):
    writer = DatasetWriter(root / name)
    for i in range(n):
        im = make_synthetic_he(size, size, seed=seed + i)
        writer.add(f"{name}{i}", im.rgb, im.labels, organ="Synthetic")
    writer.close(mpp=0.25, splits={"train": [f"{name}{i}" for i in range(n)], "one": [f"{name}0"]},
                 provenance={"name": f"set {name}", "licence": "CC BY 4.0"})
    return root / name


def test_stripping_haematoxylin_leaves_eosin_only_tissue():
    rgb = make_synthetic_he(128, 128, seed=4, density=4000.0).rgb
    before, after = rgb_to_hed(rgb), rgb_to_hed(strip_haematoxylin(rgb, np.random.default_rng(0)))
    assert before[..., 0].max() > 0.3
    assert after[..., 0].max() < 0.1 * before[..., 0].max() + 0.02  # uint8 rounding
    assert np.abs(after[..., 1] - before[..., 1]).mean() < 0.02  # the eosin stays where it was


def test_negative_patches_have_an_empty_target_and_come_at_the_asked_share():
    sampler = PatchSampler([_image("a", 160, 1)], size=128, seed=3, negatives=0.3)
    n, empty = 300, 0
    for _ in range(n):
        rgb, mask, valid, depth = sampler.sample()
        if not mask.any():
            empty += 1
            assert not depth.any() and valid.all()
            assert rgb_to_hed(rgb)[..., 0].max() < 0.5  # no nucleus-strength haematoxylin left, even jittered
    assert 0.2 < empty / n < 0.4
    none = PatchSampler([_image("a", 160, 1)], size=128, seed=3)
    assert all(none.sample()[1].any() for _ in range(50))  # this image has nuclei everywhere: no negatives


def test_images_are_picked_by_area_when_sizes_differ():
    small, large = _image("small", 130, 1), _image("large", 390, 2)
    sampler = PatchSampler([small, large], size=128, seed=0, augment=False)
    large_share = np.mean([sampler._pick() is large for _ in range(2000)])
    assert abs(large_share - 0.9) < 0.03  # 390² / (390² + 130²)


def test_bad_negative_share_is_refused(tmp_path):
    with pytest.raises(ValueError, match="negative share"):
        PatchSampler([_image("a", 160, 1)], size=128, negatives=1.0)
    data = _dataset(tmp_path, "a", 10)
    with pytest.raises(InputError, match="--negatives"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "m"), negatives=-0.1))
    with pytest.raises(InputError, match="--pigment"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "m"), pigment=1.2))


def test_pigment_dots_are_dark_not_haematoxylin_blue_and_keep_off_the_nuclei():
    im = make_synthetic_he(256, 256, seed=5, density=1500.0)
    mask = (im.labels > 0).astype(np.uint8)
    near = cv2.dilate(mask, np.ones((7, 7), np.uint8)) > 0
    rng = np.random.default_rng(0)
    dotted = 0
    for _ in range(20):
        out = add_pigment(im.rgb, mask, rng)
        assert np.array_equal(out[near], im.rgb[near])  # nucleus pixels and their 3 px rim untouched
        added = rgb_to_od(out).astype(np.float64) - rgb_to_od(im.rgb)
        painted = added.sum(axis=-1) > 0.6
        if painted.any():
            dotted += 1
            r, g, b = (added[painted][:, c].mean() for c in range(3))
            assert b > 0.8 * max(r, g)  # haematoxylin adds least in blue (0.29 against 0.65 / 0.70): these do not
    assert dotted >= 18  # a sparse image has room for dots nearly every time


def test_pigment_as_another_lab_scanned_it_comes_back_in_the_reference_colours():
    """The round trip (onto a foreign lab's colours, dots painted, normalised back) leaves the tissue in the
    reference's colours, and the dots dark: as the engine's normalisation leaves a real slide's pigment."""
    im = make_synthetic_he(256, 256, seed=6, density=1500.0)
    mean, std, _ = lab_stats(im.rgb)
    reference = ColourReference(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), max_scale=1.25)
    rgb = normalise_colour(im.rgb, reference)
    mask = (im.labels > 0).astype(np.uint8)
    near = cv2.dilate(mask, np.ones((7, 7), np.uint8)) > 0
    rng, dotted = np.random.default_rng(1), 0
    for _ in range(10):
        out = add_pigment_as_scanned(rgb, mask, rng, 0.25, reference)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        dark = rgb_to_od(out).sum(axis=-1) > rgb_to_od(rgb).sum(axis=-1) + 0.6
        assert not (dark & near).any()  # no dot on a nucleus or its rim
        dotted += bool(dark.any())
        untouched = ~dark & ~cv2.dilate(dark.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert np.abs(out[untouched].astype(int) - rgb[untouched]).mean() < 6  # the tissue keeps its colours
        out_mean = lab_stats(out, untouched)[0]
        assert np.abs(out_mean - lab_stats(rgb, untouched)[0]).max() < 6
    assert dotted >= 8


def test_pigment_comes_at_the_asked_share_with_the_target_unchanged():
    image = _image("a", 256, 7)
    plain = PatchSampler([image], size=128, seed=2, augment=False)
    dotted = PatchSampler([image], size=128, seed=2, augment=False, pigment=0.5)
    changed, n = 0, 200
    for _ in range(n):
        rgb, mask, valid, depth = dotted.sample()
        y, x = _find(image.rgb, rgb)
        assert np.array_equal(mask, image.mask[y:y + 128, x:x + 128])
        changed += not np.array_equal(rgb, image.rgb[y:y + 128, x:x + 128])
    assert 0.35 < changed / n < 0.65
    for _ in range(20):  # without --pigment every patch is a plain cut of the image
        rgb = plain.sample()[0]
        y, x = _find(image.rgb, rgb)
        assert np.array_equal(rgb, image.rgb[y:y + 128, x:x + 128])
    with pytest.raises(ValueError, match="pigment share"):
        PatchSampler([image], size=128, pigment=1.5)


def test_a_teacher_is_shown_each_patch_before_its_pigment_under_the_same_augmentation():
    image = _image("a", 256, 7)
    painted = PatchSampler([image], size=128, seed=5, pigment=1.0)
    same = PatchSampler([image], size=128, seed=5, pigment=1.0)
    unpainted = PatchSampler([image], size=128, seed=5)
    differ = 0
    for _ in range(12):
        rgb, mask, valid, depth, clean = painted.sample(clean=True)
        # asking for the clean patch draws nothing more: the student's patches are those of a run without a teacher
        assert all(np.array_equal(a, b) for a, b in zip((rgb, mask, valid, depth), same.sample()))
        dots = rgb_to_od(rgb).sum(axis=-1) > rgb_to_od(clean).sum(axis=-1) + 0.6
        differ += bool(dots.any())
        away = ~cv2.dilate(dots.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
        # the clean patch had the painted one's flips and colours: it matches it away from the dots
        assert np.abs(clean[away].astype(int) - rgb[away]).mean() < 3
        assert not (dots & (mask > 0)).any()
    assert differ >= 10
    rgb, mask, valid, depth, clean = unpainted.sample(clean=True)
    assert np.array_equal(rgb, clean)  # nothing painted: the teacher sees what the student sees


def _find(big: np.ndarray, patch: np.ndarray) -> tuple[int, int]:
    """Where an un-augmented patch was cut from (its top row, matched exactly or after dots were painted)."""
    scores = cv2.matchTemplate(big, patch, cv2.TM_SQDIFF)
    y, x = np.unravel_index(int(np.argmin(scores)), scores.shape)
    return int(y), int(x)


def test_extra_training_sets_are_trained_on_and_recorded(tmp_path):
    a, b = _dataset(tmp_path, "a", 10), _dataset(tmp_path, "b", 20)
    out = tmp_path / "model"
    logs: list[str] = []
    train(TrainConfig(data=str(a), out=str(out), split="train", val_fraction=0.0, epochs=1, steps_per_epoch=1,
                      batch_size=2, patch_size=128, extra_data=[f"{b}:one"], negatives=0.5), report=logs.append)
    assert any("3 images" in line for line in logs)  # a0, a1 and b's split "one"
    card = json.loads((out / "model_card.json").read_text())
    (extra,) = card["provenance"]["extra_data"]
    assert extra["images"] == ["b0"] and extra["split"] == "one" and extra["dataset_name"] == "set b"
    assert "set b (CC BY 4.0)" in card["licence"]
    assert card["training"]["config"]["negatives"] == 0.5


def test_fine_tuning_keeps_the_colour_reference_of_the_model_it_starts_from(tmp_path):
    a, b = _dataset(tmp_path, "a", 10), _dataset(tmp_path, "b", 20)
    first, second = tmp_path / "first", tmp_path / "second"
    common = dict(split="train", val_fraction=0.0, epochs=1, steps_per_epoch=1, batch_size=2, patch_size=128)
    train(TrainConfig(data=str(a), out=str(first), **common), report=lambda _: None)
    train(TrainConfig(data=str(b), out=str(second), init_from=str(first), **common), report=lambda _: None)
    ref = [json.loads((d / "model_card.json").read_text())["colour_reference"] for d in (first, second)]
    assert ref[0] == ref[1]
    fresh = tmp_path / "fresh"
    train(TrainConfig(data=str(b), out=str(fresh), **common), report=lambda _: None)
    assert json.loads((fresh / "model_card.json").read_text())["colour_reference"]["mean"] != ref[0]["mean"]


def test_nuinsseg_heldout_split_is_every_third_image_by_name():
    stems = [f"human_spleen_{i:02d}" for i in range(34, 0, -1)]
    splits = heldout_splits(stems)
    assert len(splits["val"]) == 11 and len(splits["train"]) == 23
    assert splits["val"][:2] == ["human_spleen_03", "human_spleen_06"]
    assert not set(splits["val"]) & set(splits["train"])
