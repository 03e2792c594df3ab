"""What a user can get wrong in a dataset folder or in `dannucnet evaluate`'s arguments: one clear line each.

Tiny folders written here with numpy/tifffile (64 px images, a few disc nuclei); the loaders and
validators are called directly, the CLI only where the refusal is the CLI's (arguments, outputs), and
every refusal there comes before a model runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from dannucnet.cli import main as cli_main
from dannucnet.errors import InputError
from dannucnet.formats.dataset import load_dataset, resampled
from dannucnet.formats.gbm40 import read_gbm40_xml
from dannucnet.formats.monuseg_xml import read_monuseg_xml

SIZE = 64
STEMS = ("im0", "im1")


def _picture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its uint16 instance labels: six separate discs."""
    rgb = np.full((SIZE, SIZE, 3), (235, 170, 210), np.uint8)
    labels = np.zeros((SIZE, SIZE), np.uint16)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i, (cy, cx) in enumerate([(12, 12), (12, 40), (32, 24), (50, 12), (50, 40), (30, 54)], start=1):
        disc = (yy - cy - seed) ** 2 + (xx - cx) ** 2 < 25
        rgb[disc] = (90, 40, 140)
        labels[disc] = i
    return rgb, labels


def _dataset(root: Path, info: object = None) -> Path:
    """An instance dataset folder of two images; ``info`` is dataset.json (default: mpp 0.25, split all)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k, stem in enumerate(STEMS):
        rgb, labels = _picture(k)
        tifffile.imwrite(root / "images" / f"{stem}.tif", rgb)
        tifffile.imwrite(root / "labels" / f"{stem}.tif", labels)
    document = {"mpp": 0.25, "splits": {"all": list(STEMS)}} if info is None else info
    (root / "dataset.json").write_text(json.dumps(document))
    return root


def _nuinsseg(root: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    for sub in ("tissue images", "label masks modify", "vague areas/mask binary"):
        (root / sub).mkdir(parents=True)
    for k, name in enumerate(names):
        rgb, labels = _picture(k)
        Image.fromarray(rgb).save(root / "tissue images" / f"{name}.png")
        tifffile.imwrite(root / "label masks modify" / f"{name}.tif", labels)
    return root


def _evaluate(data: Path, *args: str) -> int:
    return cli_main(["evaluate", "--model", "untrained", "--data", str(data), "--device", "cpu", "--runtime", "torch",
                     "--no-progress", "--poor-share", "0", *args])


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(err) == 1 and err[0].startswith("dannucnet evaluate: error: "), err
    return err[0]


# -- B4: an empty split -----------------------------------------------------------------------------------------

def test_an_empty_split_is_refused_not_scored_as_nan(tmp_path, capsys):
    root = _dataset(tmp_path / "ds", {"mpp": 0.25, "splits": {"test": [], "all": list(STEMS)}})
    with pytest.raises(InputError, match=r"split 'test' of .* has no images; choose another split \(splits with "
                                         r"images: all\)"):
        load_dataset(root).select("test")
    out = tmp_path / "scores.json"
    assert _evaluate(root, "--split", "test", "--json", str(out)) == 2
    assert "has no images" in _one_error_line(capsys)
    assert not out.exists()
    # NuInsSeg's held-out split is every third image: two images leave it empty (train --extra-data nu:val too)
    with pytest.raises(InputError, match="split 'val' .* has no images"):
        load_dataset(_nuinsseg(tmp_path / "nu")).select("val")


# -- B5: dataset.json of the wrong shape ------------------------------------------------------------------------

@pytest.mark.parametrize(("document", "message"), [
    ([1, 2], r"must hold one JSON object .* not a list \(\[1, 2\]\)"),
    ({"samples": [1]}, r"samples is a list \(\[1\]\); it must be an object"),
    ({"splits": ["test"]}, r"splits is a list \(\[\"test\"\]\); it must be an object"),
    ({"splits": {"x": "im0"}}, r"splits\.x is a string \(\"im0\"\); it must be a list of image names"),
    ({"splits": {"x": ["im0", 1]}}, r"splits\.x holds a number \(1\); image names are strings"),
    ({"samples": {"im0": 5}}, r"samples\.im0 is a number \(5\); it must be an object"),
    ({"samples": {"im0": {"organ": 5}, "im1": {"organ": "x"}}}, r"samples\.im0\.organ is a number \(5\)"),
    ({"mpp": "0.25"}, r"mpp is a string \(\"0\.25\"\); it must be the pixel size in µm/px"),
    ({"mpp": True}, r"mpp is true; it must be the pixel size"),
], ids=["list", "samples-list", "splits-list", "split-string", "split-number", "sample-number", "organ-number",
        "mpp-string", "mpp-bool"])
def test_a_wrong_dataset_json_is_one_line_naming_the_key(tmp_path, document, message):
    root = _dataset(tmp_path / "ds", document)
    with pytest.raises(InputError, match=message):
        load_dataset(root)


def test_a_dataset_json_that_cannot_be_read(tmp_path):
    folder = _dataset(tmp_path / "folder")
    (folder / "dataset.json").unlink()
    (folder / "dataset.json").mkdir()
    with pytest.raises(InputError, match=r"cannot read .*dataset\.json: .*it must be a JSON file"):
        load_dataset(folder)
    utf16 = _dataset(tmp_path / "utf16")
    (utf16 / "dataset.json").write_text(json.dumps({"mpp": 0.25}), encoding="utf-16")
    with pytest.raises(InputError, match=r"dataset\.json is not UTF-8 text .*; save it as UTF-8"):
        load_dataset(utf16)


# -- B6: unreadable or mis-sized label and region files ---------------------------------------------------------

@pytest.mark.parametrize("garbage", [b"not a tiff at all" * 8, b"II*\x00" + b"garbage" * 20],
                         ids=["not-tiff", "tiff-header-then-garbage"])
def test_an_unreadable_label_or_region_file_is_named(tmp_path, garbage):
    root = _dataset(tmp_path / "ds")
    (root / "regions").mkdir()
    (root / "regions" / "im1.tif").write_bytes(garbage)
    (root / "labels" / "im0.tif").write_bytes(garbage)
    first, second = load_dataset(root).samples
    with pytest.raises(InputError, match=r"cannot read label image .*labels/im0\.tif: .*replace it with a valid TIFF"):
        first.load_labels()
    with pytest.raises(InputError, match=r"cannot read region mask .*regions/im1\.tif: .*replace it with a valid"):
        second.load_region()


def test_a_region_mask_of_another_size_is_named(tmp_path):
    root = _dataset(tmp_path / "ds")
    (root / "regions").mkdir()
    tifffile.imwrite(root / "regions" / "im0.tif", np.full((40, 40), 255, np.uint8))
    (sample, _) = load_dataset(root).samples
    with pytest.raises(InputError, match=r"regions/im0\.tif: the region mask is 40 x 40 px but the label image "
                                         r"im0\.tif is 64 x 64"):
        sample.load_region()


def test_nuinsseg_damaged_labels_and_mis_sized_vague_masks(tmp_path):
    root = _nuinsseg(tmp_path / "nu")
    (root / "label masks modify" / "a.tif").write_bytes(b"\x00garbage" * 16)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "vague areas/mask binary" / "b.png")
    damaged, vague = load_dataset(root).samples
    with pytest.raises(InputError, match=r"cannot read label image .*label masks modify/a\.tif"):
        damaged.load_labels()
    with pytest.raises(InputError, match=r"mask binary/b\.png: the region mask is 32 x 32 px but the label image "
                                         r"b\.tif is 64 x 64"):
        vague.load_region()


# -- B7: label ids of every size, and what is not an id ---------------------------------------------------------

def _relabelled(tmp_path: Path, labels: np.ndarray) -> np.ndarray:
    root = _dataset(tmp_path / "ds")
    tifffile.imwrite(root / "labels" / "im0.tif", labels)
    return load_dataset(root).samples[0].load_labels()


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Both maps cut the image into the same objects (ids may differ)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))) and bool(((a == 0) == (b == 0)).all())


def test_large_label_ids_stay_distinct(tmp_path):
    _, labels = _picture(0)
    # uint32 ids at and above 2**31 wrapped negative in int32 (a ValueError traceback)
    high = np.where(labels > 0, labels.astype(np.uint32) + np.uint32(2**31), 0).astype(np.uint32)
    read = _relabelled(tmp_path / "u32", high)
    assert read.dtype == np.int32 and read.min() == 0 and _same_partition(read, labels)
    # uint64 ids k and k + 2**32 were cut modulo 2**32 into one nucleus
    aliased = labels.astype(np.uint64)
    aliased[labels == 2] = 1 + 2**32
    read = _relabelled(tmp_path / "u64", aliased)
    assert _same_partition(read, labels) and len(np.unique(read)) == len(np.unique(labels))
    # whole numbers stored as floats are ids too
    assert np.array_equal(_relabelled(tmp_path / "f32", labels.astype(np.float32)), labels)


def test_ids_above_float32_precision_survive_resampling(tmp_path):
    """`evaluate --mpp` resamples labels through float32, which cannot tell 2**24 from 2**24 + 1."""
    _, labels = _picture(0)
    big = np.where(labels > 0, labels.astype(np.uint32) + np.uint32(2**24 - 1), 0).astype(np.uint32)
    root = _dataset(tmp_path / "ds")
    tifffile.imwrite(root / "labels" / "im0.tif", big)
    (half,) = resampled(load_dataset(root).select("all")[:1], 0.5)
    assert len(np.unique(half.load_labels())) == len(np.unique(labels))


@pytest.mark.parametrize(("labels", "message"), [
    (-(np.arange(SIZE * SIZE, dtype=np.int32).reshape(SIZE, SIZE) % 7), r"negative ids \(lowest -6\)"),
    (np.where(np.eye(SIZE) > 0, np.nan, 1.0).astype(np.float32), "NaN or infinite values"),
    (np.full((SIZE, SIZE), np.inf, np.float64), "NaN or infinite values"),
    (np.full((SIZE, SIZE), 2.5, np.float32), "fractional ids such as 2.5"),
], ids=["negative", "nan", "inf", "fractional"])
def test_what_is_not_an_id_is_refused_naming_the_file(tmp_path, labels, message):
    with pytest.raises(InputError, match=rf"labels/im0\.tif: the label image holds {message}"):
        _relabelled(tmp_path, labels)


def test_evaluate_scores_uint32_ids_above_2_31(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    for stem in STEMS:
        labels = tifffile.imread(root / "labels" / f"{stem}.tif")
        tifffile.imwrite(root / "labels" / f"{stem}.tif",
                         np.where(labels > 0, labels.astype(np.uint32) + np.uint32(3_000_000_000), 0).astype(np.uint32))
    out = tmp_path / "scores.json"
    assert _evaluate(root, "--json", str(out)) == 0
    assert json.loads(out.read_text())["overall"]["final"]["n_images"] == 2


# -- B8: nan and inf coordinates in annotation XML --------------------------------------------------------------

@pytest.mark.parametrize("shape", [
    '<Shape Type="Polygon"><Data><Points><Point X="nan" Y="1"/><Point X="9" Y="1"/><Point X="9" Y="9"/>'
    "</Points></Data></Shape>",
    '<Shape Type="Polygon"><Data Rotation="nan"><Points><Point X="1" Y="1"/><Point X="9" Y="1"/>'
    '<Point X="9" Y="9"/></Points></Data></Shape>',
    '<Shape Type="Oval"><Data><Extent X="10" Y="20" Width="inf" Height="10"/></Data></Shape>',
], ids=["point-nan", "rotation-nan", "oval-inf"])
def test_gbm40_non_finite_numbers_are_named(tmp_path, shape):
    path = tmp_path / "01_data.xml"
    path.write_text(f"<Document><Layers><Layer><Shapes>{shape}</Shapes></Layer></Layers></Document>")
    with pytest.raises(InputError, match=r"01_data\.xml: a shape has a coordinate, size or rotation that is not a "
                                         r"finite number"):
        read_gbm40_xml(path)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_monuseg_non_finite_vertices_are_named(tmp_path, value):
    vertices = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in ((value, 1), (5, 1), (5, 5), (1, 5)))
    path = tmp_path / "a.xml"
    path.write_text(f'<Annotations><Annotation><Regions><Region Id="7"><Vertices>{vertices}</Vertices></Region>'
                    "</Regions></Annotation></Annotations>")
    with pytest.raises(InputError, match=r"a\.xml: region 7 has a vertex whose X or Y is not a finite number"):
        read_monuseg_xml(path)


# -- B9: pixel sizes no microscope has ---------------------------------------------------------------------------

@pytest.mark.parametrize("document", [{"mpp": 1e6}, {"mpp": 0.001}, {"mpp": float("nan")},
                                      {"mpp": 0.25, "samples": {"im0": {"mpp": 1000}}}],
                         ids=["1e6", "0.001", "nan", "per-sample"])
def test_an_implausible_dataset_pixel_size_is_refused(tmp_path, document):
    root = _dataset(tmp_path / "ds", document)
    with pytest.raises(InputError, match=r"mpp is a number .*; it must be the pixel size in µm/px, a number "
                                         r"from 0\.05 to 10"):
        load_dataset(root)


# -- B9, B10: evaluate's numbers, refused before any work ---------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--mpp", "inf"], "--mpp inf is not a plausible pixel size"),
    (["--mpp", "1000"], "--mpp 1000 is not a plausible pixel size"),
    (["--mpp", "1e-9"], "--mpp 1e-09 is not a plausible pixel size"),
    (["--min-area", "inf"], "--min-area must be 0 to 10000 µm²"),
    (["--min-area", "nan"], "--min-area must be 0 to 10000 µm²"),
], ids=["mpp-inf", "mpp-1000", "mpp-1e-9", "min-area-inf", "min-area-nan"])
def test_evaluate_refuses_numbers_it_would_fail_on(tmp_path, capsys, args, message):
    root = _dataset(tmp_path / "ds")
    out = tmp_path / "scores.json"
    assert _evaluate(root, *args, "--json", str(out)) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


# -- B15: outputs checked before the evaluation ------------------------------------------------------------------

def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    root = _dataset(tmp_path / "ds")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    afile = tmp_path / "a-file"
    afile.write_text("keep")
    # a model that does not exist: the output's refusal must come first, before the model is even looked for
    cases = [
        (["--json", str(folder)], "cannot write --json", "it is a folder"),
        (["--json", str(afile / "x.json")], "cannot write --json", "is a file, not a folder"),
        (["--report", str(afile)], "cannot write --report", "it is a file; give a folder"),
        (["--json", str(tmp_path / "new" / "x.json"), "--report", str(afile)], "cannot write --report", "a file"),
    ]
    for args, first, second in cases:
        code = cli_main(["evaluate", "--model", str(tmp_path / "no-such-model"), "--data", str(root), "--no-progress",
                         *args])
        line = _one_error_line(capsys)
        assert code == 2 and first in line and second in line, line
    assert afile.read_text() == "keep" and not (tmp_path / "new").exists()  # nothing written or created


def test_update_card_without_a_model_folder_is_refused_before_scoring(tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert _evaluate(_dataset(tmp_path / "ds"), "--update-card", "--json", str(out)) == 2
    assert "--update-card needs a model folder" in _one_error_line(capsys)
    assert not out.exists()  # it was written, then the run failed


# -- B16: the dataset's own "all" -------------------------------------------------------------------------------

def test_an_image_of_split_all_without_labels_is_an_error_not_dropped(tmp_path):
    root = _dataset(tmp_path / "ds")
    (root / "labels" / "im1.tif").unlink()
    dataset = load_dataset(root)
    for split in ("all", None):
        with pytest.raises(InputError, match=r"split 'all' names images that are not in .*: \['im1'\]"):
            dataset.select(split)
    (root / "dataset.json").write_text(json.dumps({"mpp": 0.25}))  # no "all" of its own: every sample, as before
    assert [s.stem for s in load_dataset(root).select("all")] == ["im0"]


# -- B17b: a binary mask given as instance labels ---------------------------------------------------------------

def test_a_binary_mask_read_as_instances_is_warned_about(tmp_path, caplog):
    _, labels = _picture(0)
    with caplog.at_level(logging.WARNING, logger="dannucnet"):
        _relabelled(tmp_path / "instances", labels)
        assert not caplog.records
        _relabelled(tmp_path / "bool", labels > 0)
        _relabelled(tmp_path / "255", np.where(labels > 0, 255, 0).astype(np.uint8))
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "all 6 separate objects share the id 1: this looks like a binary mask, not an instance map; give each "
        "nucleus its own id (e.g. scipy.ndimage.label)",
        "all 6 separate objects share the id 255: this looks like a binary mask, not an instance map; give each "
        "nucleus its own id (e.g. scipy.ndimage.label)",
    ]
