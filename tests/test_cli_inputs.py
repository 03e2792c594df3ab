"""Files and addresses a user hands the commands, each refused in one line, or written as its name says.

Found by a QA pass: a stain file or token file saved as UTF-16 (Windows Notepad's "Unicode") was a
UnicodeDecodeError traceback, a malformed --scheduler address a traceback from distributed, synth's
density NaN, inf or 1e9 a numpy traceback or an 18 GB pair search, and -o x.GEOJSON.GZ plain JSON under a
gzip name.
"""

from __future__ import annotations

import gzip
import json

import pytest

from dannucnet.cli import main as cli_main
from dannucnet.commands._common import parse_stains_argument
from dannucnet.errors import InputError
from dannucnet.formats.geojson import GeoJSONWriter
from dannucnet.service.auth import read_token

STAINS = {"Name": "H&E", "Stain 1": "Hematoxylin", "Values 1": "0.65 0.70 0.29", "Stain 2": "Eosin",
          "Values 2": "0.2159 0.8012 0.5581", "Background": "255 255 255"}


def test_a_stain_file_saved_as_utf16_is_one_clear_error_and_a_bom_is_fine(tmp_path):
    utf16 = tmp_path / "stains16.json"
    utf16.write_text(json.dumps(STAINS), encoding="utf-16")
    with pytest.raises(InputError, match="is not UTF-8 text .*save it as UTF-8"):
        parse_stains_argument(str(utf16))
    bom = tmp_path / "stains-bom.json"
    bom.write_text(json.dumps(STAINS), encoding="utf-8-sig")
    assert parse_stains_argument(str(bom)) is not None


def test_a_token_file_that_is_not_text_is_one_clear_error(tmp_path):
    binary = tmp_path / "token"
    binary.write_bytes(b"\xff\xfe\n")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        read_token(None, str(binary))
    bom = tmp_path / "token-bom"
    bom.write_text("0123456789abcdef0123\n", encoding="utf-8-sig")
    assert read_token(None, str(bom)) == "0123456789abcdef0123"


@pytest.mark.parametrize(("args", "message"), [
    (["--density", "nan"], "nucleus density must be 0 to 50,000 per mm², got nan"),
    (["--density", "inf"], "nucleus density must be 0 to 50,000 per mm², got inf"),
    (["--density", "1e9"], "nucleus density must be 0 to 50,000 per mm²"),
    (["--seed", "-1"], "seed must be 0 to 4294967295, got -1"),
])
def test_synth_refuses_what_it_cannot_draw(tmp_path, capsys, args, message):
    out = tmp_path / "s.tif"
    assert cli_main(["synth", str(out), "--size", "64", *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("address", ["garbage", "tcp://127.0.0.1:notaport", "foo://127.0.0.1:8786"])
def test_a_malformed_scheduler_address_is_one_clear_error(tmp_path, capsys, address):
    pytest.importorskip("distributed", reason="batch-slides needs dannucnet[cluster]")
    slides = tmp_path / "slides"
    slides.mkdir()
    assert cli_main(["synth", str(slides / "a.tif"), "--size", "256"]) == 0
    assert cli_main(["batch-slides", str(slides), "-o", str(tmp_path / "out"), "--scheduler", address]) == 2
    err = capsys.readouterr().err
    assert f"--scheduler {address!r} is not a Dask scheduler address" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["n.GEOJSON.GZ", "n.Geojson.Gz", "n.geojson.gz"])
def test_a_gz_name_in_any_case_is_gzip(tmp_path, name):
    path = tmp_path / name
    with GeoJSONWriter(path) as writer:
        writer.write([])
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(path.read_bytes()))["type"] == "FeatureCollection"


def test_models_refuses_a_pixel_size_it_would_read_as_unknown(capsys):
    assert cli_main(["models", "--for-mpp", "inf"]) == 2
    assert "--for-mpp must be a pixel size from 0.05 to 10 µm/px, not inf" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--mpp", "0"], "--mpp 0 is not a plausible pixel size"),  # failed every slide's task, one by one
    (["-o", ""], "-o is empty"),  # wrote into the current folder
])
def test_batch_slides_refuses_before_any_slide(tmp_path, capsys, args, message):
    slides = tmp_path / "slides"
    slides.mkdir()
    argv = ["batch-slides", str(slides), "-o", str(tmp_path / "out"), *args]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_tls_files_that_are_not_pem_are_named_not_blamed_on_the_port(tmp_path, capsys):
    """gRPC reported them as a failed bind: "the port is in use or the address is not this machine's"."""
    junk = tmp_path / "cert.txt"
    junk.write_text("not a certificate")
    argv = ["serve", "--model", "untrained", "--device", "cpu", "--port", "0", "--http-port", "-1",
            "--tls-cert", str(junk), "--tls-key", str(junk)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{junk} holds no PEM certificate" in err and "in use" not in err


@pytest.mark.parametrize("name", ["o.jpg", "o.tif", "o"])
def test_an_overlay_not_named_png_is_refused(tmp_path, capsys, name):
    """The overlay is always a PNG: o.jpg held PNG bytes."""
    argv = ["segment", str(tmp_path / "in.tif"), "-o", str(tmp_path / "n.geojson"), "--overlay", str(tmp_path / name)]
    assert cli_main(argv) == 2
    assert "the overlay is a PNG; give a name ending in .png" in capsys.readouterr().err


def test_synth_refuses_a_size_no_slide_has(tmp_path, capsys):
    """10**8 px a side ran on for ever, toward terabytes."""
    assert cli_main(["synth", str(tmp_path / "big.tif"), "--size", "100000000"]) == 2
    assert "synthetic image size must be 1 to 200,000 px a side" in capsys.readouterr().err


def test_the_client_refuses_options_it_would_drop():
    """{"min_area": 150} was dropped without a word (0 nuclei were asked for, 22 came back)."""
    from dannucnet.client import options_to_proto
    from dannucnet.pipeline import SegmentOptions

    with pytest.raises(InputError, match=r"unknown segmentation options \['min_area'\]"):
        options_to_proto({"min_area": 150.0})
    with pytest.raises(InputError, match="auto_stains is estimated on the client's side"):
        options_to_proto(SegmentOptions(auto_stains=True))
    sent = options_to_proto({"min_area_um2": 150.0, "threshold": 0.6})
    assert (sent.min_area_microns2, sent.threshold) == (150.0, 0.6)


@pytest.mark.parametrize("mpp", [1e-9, 1e9, 0.01, 20.0])
def test_segment_region_holds_the_pixel_size_to_the_rule_of_every_door(untrained_predictor, mpp):
    """1e-9 shrank the image to 1 px (0 nuclei, silently), 1e9 was a cv2.error."""
    import numpy as np

    from dannucnet.pipeline import segment_region

    with pytest.raises(InputError, match="outside the plausible microscope range"):
        segment_region(untrained_predictor, np.zeros((64, 64, 3), np.uint8), mpp=mpp)


def test_a_region_with_a_coordinate_that_is_not_a_number_is_refused():
    from dannucnet.geometry.ownership import Rect
    from dannucnet.pipeline.slide import plan_slide
    from dannucnet.service.plan import _Extent

    for region in (Rect(float("nan"), 0, 100, 100), Rect(0, 0, float("inf"), 100)):
        with pytest.raises(InputError, match="not a finite number"):
            plan_slide(_Extent(1000, 1000, 0.25), 0.25, region)  # type: ignore[arg-type]
