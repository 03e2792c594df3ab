"""NuInsSeg and GBM40 folders read in place by load_dataset, and scored by `dannucnet evaluate --data`.

Always-run tests write small folders in each data set's own layout (PNG / 16-bit
TIFF / vague-area PNG; TIFF + annotation-tool XML); the data tests read the real
folders under ../shared/data and skip where they are absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import data_root
from dannucnet.cli import main as cli_main
from dannucnet.errors import InputError
from dannucnet.formats.dataset import load_dataset
from dannucnet.formats.gbm40 import read_gbm40_xml
from dannucnet.geometry.polygons import labels_to_polygons
from dannucnet.slides.synthetic import make_synthetic_he

SIZE = 96


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_he(SIZE, SIZE, seed=3, density=3000.0)


def _nuinsseg(root: Path, synthetic, vague_box=(0, 0, 32, 32)) -> Path:
    for sub in ("tissue images", "label masks modify", "vague areas/mask binary"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(synthetic.rgb).save(root / "tissue images" / "human_spleen_01.png")
    tifffile.imwrite(root / "label masks modify" / "human_spleen_01.tif", synthetic.labels.astype(np.uint16))
    vague = np.zeros((SIZE, SIZE), np.uint8)
    x0, y0, x1, y1 = vague_box
    vague[y0:y1, x0:x1] = 255
    Image.fromarray(vague).save(root / "vague areas/mask binary" / "human_spleen_01.png")
    Image.fromarray(synthetic.rgb).save(root / "tissue images" / "human_spleen_02.png")  # no mask: not a sample
    return root


def _shape(kind: str, data: str, rotation: float = 0.0) -> str:
    return (f'<Shape Type="{kind}"><Settings><Line Width="1"/></Settings>'
            f'<Data Rotation="{rotation}">{data}</Data></Shape>')


def _points(poly) -> str:
    xy = np.asarray(poly.exterior.coords)[:-1] - 0.5  # the tool's numbers are pixel centres
    return "<Points>" + "".join(f'<Point X="{x}" Y="{y}" />' for x, y in xy) + "</Points>"


def _gbm40(root: Path, synthetic, extra: str = "") -> Path:
    (root / "raw_image").mkdir(parents=True)
    (root / "contour_annotation_xml").mkdir()
    tifffile.imwrite(root / "raw_image" / "01.tif", synthetic.rgb)
    polygons = labels_to_polygons(synthetic.labels, simplify_px=0).values()
    shapes = "".join(_shape("Polygon", _points(p)) for p in polygons)
    xml = (f'<!--Document--><Document FileVersion="1.0"><Layers><Layer Name="Layer1"><Shapes>{shapes}{extra}</Shapes>'
           '</Layer></Layers></Document>')
    (root / "contour_annotation_xml" / "01_data.xml").write_text(xml)
    return root


def test_nuinsseg_folder_reads_labels_and_ignores_vague_areas(tmp_path, synthetic):
    ds = load_dataset(_nuinsseg(tmp_path / "nuinsseg-human-spleen", synthetic))
    assert [s.stem for s in ds.samples] == ["human_spleen_01"] and ds.mpp == 0.25
    sample = ds.samples[0]
    assert sample.organ == "human spleen"
    assert np.array_equal(sample.load_labels(), synthetic.labels)
    region = sample.load_region()
    assert not region[:32, :32].any() and region[32:, :].all() and region[:, 32:].all()


def test_gbm40_contours_rasterise_back_to_the_labels(tmp_path, synthetic):
    ds = load_dataset(_gbm40(tmp_path / "gbm40", synthetic))
    labels = ds.samples[0].load_labels()
    assert ds.samples[0].load_region() is None and ds.mpp == 0.25
    assert labels.max() == len(np.unique(synthetic.labels)) - 1
    # the polygons trace pixel edges: read as pixel centres + 0.5, they give back every pixel
    assert np.array_equal(labels > 0, synthetic.labels > 0)


def test_gbm40_ovals_and_rotation(tmp_path):
    oval = _shape("Oval", '<Extent X="10" Y="20" Width="20" Height="10" />')
    turned = _shape("Oval", '<Extent X="10" Y="20" Width="20" Height="10" />', rotation=90)
    path = tmp_path / "x_data.xml"
    path.write_text(f"<Document><Layers><Layer><Shapes>{oval}{turned}</Shapes></Layer></Layers></Document>")
    flat, upright = read_gbm40_xml(path)
    assert flat.bounds == pytest.approx((10.5, 20.5, 30.5, 30.5), abs=0.05)
    assert upright.bounds == pytest.approx((15.5, 15.5, 25.5, 35.5), abs=0.05)  # turned about its centre
    assert flat.area == pytest.approx(np.pi * 10 * 5, rel=0.01)


def test_bad_gbm40_files_give_one_clear_error(tmp_path):
    broken = tmp_path / "a_data.xml"
    broken.write_text("<Document><Shapes>")
    with pytest.raises(InputError, match="not a readable GBM40 annotation XML"):
        read_gbm40_xml(broken)
    bad = tmp_path / "b_data.xml"
    bad.write_text('<Document><Shape Type="Polygon"><Data><Points><Point X="a" Y="1"/></Points></Data></Shape>'
                   '</Document>')
    with pytest.raises(InputError, match="without numeric coordinates"):
        read_gbm40_xml(bad)
    (tmp_path / "raw_image").mkdir()
    (tmp_path / "contour_annotation_xml").mkdir()
    with pytest.raises(InputError, match="no 'raw_image/NN.tif'"):
        load_dataset(tmp_path)


def test_both_layouts_resample_through_their_own_readers(tmp_path, synthetic, capsys):
    """`evaluate --mpp 0.5` on NuInsSeg or GBM40: the region is NuInsSeg's vague mask inverted and GBM40's
    labels its contours (read as plain files, both were a TIFF error and a traceback)."""
    from dannucnet.formats.dataset import resampled

    (spleen,) = resampled(load_dataset(_nuinsseg(tmp_path / "n", synthetic)).samples, 0.5)
    region = spleen.load_region()
    assert region.shape == (SIZE // 2, SIZE // 2)
    assert not region[:16, :16].any() and region[16:, :].all()
    (tile,) = resampled(load_dataset(_gbm40(tmp_path / "g", synthetic)).samples, 0.5)
    assert tile.load_labels().shape == (SIZE // 2, SIZE // 2) and tile.load_labels().max() > 0
    assert tile.load_image().shape == (SIZE // 2, SIZE // 2, 3) and tile.mpp == 0.5
    for folder in (tmp_path / "n", tmp_path / "g"):
        assert cli_main(["evaluate", "--model", "untrained", "--data", str(folder), "--device", "cpu", "--runtime",
                         "torch", "--no-progress", "--mpp", "0.5"]) == 0
        assert "resampled to 0.5 µm/px" in capsys.readouterr().out


def test_evaluate_cli_scores_both_layouts(tmp_path, synthetic, capsys):
    nuinsseg = _nuinsseg(tmp_path / "n", synthetic)
    gbm40 = _gbm40(tmp_path / "g", synthetic)
    for folder in (nuinsseg, gbm40):
        code = cli_main(["evaluate", "--model", "untrained", "--data", str(folder), "--device", "cpu",
                         "--runtime", "torch", "--no-progress", "--json", str(tmp_path / f"{folder.name}.json")])
        assert code == 0
        assert f"on {folder} split all" in capsys.readouterr().out
    assert cli_main(["evaluate", "--model", "untrained", "--data", str(tmp_path), "--no-progress"]) == 2
    assert "NuInsSeg or GBM40" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "images", "nuclei"), [("nuinsseg-human-spleen", 34, 3286), ("gbm40", 40, 4979)])
def test_real_folders(name, images, nuclei):
    root = data_root() / name
    if not root.is_dir():
        pytest.skip(f"{root} not found (set DANNUCNET_DATA to the folder holding {name}/)")
    ds = load_dataset(root)
    assert len(ds.samples) == images
    first = ds.samples[0]
    assert first.load_labels().shape == first.load_image().shape[:2] == (512, 512)
    assert sum(len(np.unique(s.load_labels())) - 1 for s in ds.samples) == nuclei
