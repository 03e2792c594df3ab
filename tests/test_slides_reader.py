"""open_image on real files written here: pyramids, pixel size, bad files, region reads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from dannucnet.errors import InputError
from dannucnet.slides import ImageSource, open_image
from dannucnet.slides.mpp import is_plausible
from dannucnet.slides.synthetic import make_synthetic_he, write_pyramidal_tiff


@pytest.fixture(scope="module")
def synth() -> np.ndarray:
    return make_synthetic_he(1100, 900, seed=5).rgb


@pytest.mark.parametrize("flavour", ["generic", "ome", "svs"])
def test_pyramid_every_level_readable_and_mpp(tmp_path: Path, synth: np.ndarray, flavour: str) -> None:
    path = write_pyramidal_tiff(tmp_path / f"s_{flavour}.tif", synth, mpp=0.2467, tile_size=256,
                                compression="deflate", flavour=flavour)
    with open_image(path) as src:
        assert isinstance(src, ImageSource)
        assert (src.width, src.height) == (1100, 900)
        assert src.mpp == pytest.approx(0.2467, rel=1e-4)
        assert src.require_mpp() == pytest.approx(0.2467, rel=1e-4)
        expected_source = {"generic": "tiffslide.mpp-x", "ome": "OME-XML", "svs": "aperio MPP"}[flavour]
        assert expected_source in src.mpp_source
        assert len(src.level_downsamples) >= 3
        assert src.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0), rel=0.01)
        # lossless: level 0 is the array we wrote
        np.testing.assert_array_equal(src.read_region(0, 0, 1100, 900), synth)
        for d in src.level_downsamples:
            out = src.read_region(0, 0, 1100, 900, downsample=d)
            assert out.shape == (round(900 / d), round(1100 / d), 3)
            assert out.dtype == np.uint8
            ref = cv2.resize(synth, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_AREA)
            assert np.abs(out.astype(int) - ref).mean() < 2.0


def test_downsampled_read_matches_resize_of_full_read(tmp_path: Path, synth: np.ndarray) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.tif", synth, mpp=0.25, compression="deflate")
    with open_image(path) as src:
        x, y, w, h = 120, 80, 640, 480
        full = src.read_region(x, y, w, h)
        for d in (2.0, 3.0, 4.0):  # 3.0 falls between levels
            part = src.read_region(x, y, w, h, downsample=d)
            ref = cv2.resize(full, (round(w / d), round(h / d)), interpolation=cv2.INTER_AREA)
            assert part.shape == ref.shape
            assert np.abs(part.astype(int) - ref).mean() < 3.0, d


def test_region_partly_outside_is_padded_white(tmp_path: Path, synth: np.ndarray) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.tif", synth, mpp=0.25, compression="deflate")
    with open_image(path) as src:
        out = src.read_region(-50, -30, 200, 100)
        assert out.shape == (100, 200, 3)
        assert (out[:30] == 255).all() and (out[:, :50] == 255).all()
        np.testing.assert_array_equal(out[30:, 50:], synth[:70, :150])
        edge = src.read_region(1000, 850, 200, 100, downsample=2.0)
        assert edge.shape == (50, 100, 3)
        assert (edge[25:] == 255).all() and (edge[:, 50:] == 255).all()
        with pytest.raises(InputError, match="wholly outside"):
            src.read_region(1100, 0, 10, 10)
        with pytest.raises(InputError, match="wholly outside"):
            src.read_region(-20, -20, 20, 20)


def test_png_without_mpp_and_given_mpp(tmp_path: Path, synth: np.ndarray) -> None:
    path = tmp_path / "tile.png"
    Image.fromarray(synth[:300, :400]).save(path)
    with open_image(path) as src:
        assert src.mpp is None
        assert "missing" in src.mpp_source
        with pytest.raises(InputError, match="--mpp"):
            src.require_mpp()
        np.testing.assert_array_equal(src.read_region(0, 0, 400, 300), synth[:300, :400])
    with open_image(path, mpp=0.5) as src:
        assert src.mpp == 0.5 and src.mpp_source == "given with --mpp"
    with pytest.raises(InputError, match="plausible"):
        open_image(path, mpp=300)


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 15:, 3] = 255  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    with open_image(tmp_path / "a.png") as src:
        out = src.read_region(0, 0, 30, 20)
    assert (out[:, :15] == 255).all()
    assert (out[:, 15:] == (200, 0, 0)).all()


@pytest.mark.parametrize("dpi", [72, 96, 300])
def test_screen_dpi_tiff_is_treated_as_missing(tmp_path: Path, synth: np.ndarray, dpi: int) -> None:
    path = tmp_path / f"dpi{dpi}.tif"
    tifffile.imwrite(path, synth[:200, :200], photometric="rgb", resolution=(dpi, dpi), resolutionunit="INCH")
    with open_image(path) as src:
        assert src.mpp is None
        assert f"{dpi} dpi" in src.mpp_source
        assert not is_plausible(25400 / dpi)
        with pytest.raises(InputError, match="no usable pixel size"):
            src.require_mpp()


def test_plain_tiff_with_calibration(tmp_path: Path, synth: np.ndarray) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, synth, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_image(path) as src:
        assert src.mpp == pytest.approx(0.5)
        assert src.level_downsamples == (1.0,)
        out = src.read_region(0, 0, 1100, 900, downsample=4)
        assert out.shape == (225, 275, 3)


def test_thumbnail_of_single_level_image_is_read_band_by_band(tmp_path: Path, synth: np.ndarray,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from dannucnet.slides import reader

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, synth, photometric="rgb", rowsperstrip=64)
    with open_image(path) as src:
        whole = src.read_region(0, 0, 1100, 900, downsample=8)
        monkeypatch.setattr(reader, "_BAND_BYTES", 1 << 16)  # force many bands
        banded = src.read_region(0, 0, 1100, 900, downsample=8)
    assert banded.shape == whole.shape == (112, 138, 3)
    # bands resample rows on a slightly different grid: compare at the scale of a few output pixels
    blur = lambda a: cv2.blur(a.astype(np.float32), (5, 5))  # noqa: E731
    assert np.abs(blur(banded) - blur(whole)).mean() < 2.0
    row_means = banded.mean(axis=(1, 2))
    assert row_means.min() > 100 and row_means.max() < 250  # no blank or doubled seams


def test_grey_16bit_tiff_becomes_rgb(tmp_path: Path) -> None:
    grey = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    tifffile.imwrite(tmp_path / "g.tif", grey)
    with open_image(tmp_path / "g.tif") as src:
        out = src.read_region(0, 0, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all()
    assert out[-1, -1, 0] == grey[-1, -1] // 257


def test_missing_empty_random_and_truncated_files(tmp_path: Path, synth: np.ndarray) -> None:
    with pytest.raises(InputError, match="not found"):
        open_image(tmp_path / "nope.svs")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        open_image(tmp_path / "empty.tif")
    (tmp_path / "random.svs").write_bytes(os.urandom(5000))
    with pytest.raises(InputError, match="not an image"):
        open_image(tmp_path / "random.svs")
    (tmp_path / "fake.tif").write_bytes(b"II*\x00" + os.urandom(3000))
    with pytest.raises(InputError):
        open_image(tmp_path / "fake.tif")
    good = write_pyramidal_tiff(tmp_path / "good.tif", synth, mpp=0.25, compression="deflate")
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 200):
        bad = tmp_path / f"trunc{cut}.tif"
        bad.write_bytes(data[:cut])
        with pytest.raises(InputError) as exc:
            with open_image(bad) as src:
                src.read_region(0, 0, 1100, 900)
        assert "\n" not in str(exc.value)
    png = tmp_path / "full.png"
    Image.fromarray(synth).save(png)
    (tmp_path / "trunc.png").write_bytes(png.read_bytes()[:3000])
    with pytest.raises(InputError):
        open_image(tmp_path / "trunc.png")
    with pytest.raises(InputError, match="folder"):
        open_image(tmp_path)


def test_concurrent_reads_agree(tmp_path: Path, synth: np.ndarray) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.tif", synth, mpp=0.25, compression="jpeg")
    with open_image(path) as src:
        boxes = [(x, y, 256, 256) for x in range(0, 1000, 200) for y in range(0, 800, 200)]
        expected = {b: src.read_region(*b) for b in boxes}
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for b in boxes:
                    np.testing.assert_array_equal(src.read_region(*b), expected[b])
            except BaseException as e:  # noqa: BLE001 - surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


def _data_root() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("DANNUCNET_DATA", default))


def test_monuseg_tiff_reports_missing_mpp() -> None:
    images = _data_root() / "monuseg-train" / "images"
    tifs = sorted(images.glob("*.tif")) if images.is_dir() else []
    if not tifs:
        pytest.skip(f"MoNuSeg training images not found under {images} (set DANNUCNET_DATA)")
    with open_image(tifs[0]) as src:
        assert (src.width, src.height) == (1000, 1000)
        assert src.mpp is None
        # these files carry no resolution tags at all; a 72-dpi tag would be reported as such
        with tifffile.TiffFile(tifs[0]) as tf:
            tags = tf.pages[0].tags
            if "XResolution" in tags:
                assert "dpi" in src.mpp_source
            else:
                assert "no pixel-size metadata" in src.mpp_source
        with pytest.raises(InputError, match="--mpp"):
            src.require_mpp()
    with open_image(tifs[0], mpp=0.25) as src:
        assert src.require_mpp() == 0.25
