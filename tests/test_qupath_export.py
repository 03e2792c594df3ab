"""export-training logic on real TIFF files, without QuPath (plain ImageEntryData)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from shapely.geometry import Point, Polygon, box

from dannucnet.errors import InputError
from dannucnet.formats.dataset import load_dataset
from dannucnet.qupath.entries import ANNOTATION, DETECTION, ImageEntryData, ObjectData
from dannucnet.qupath.export import ExportOptions, export_training
from dannucnet.qupath.regions import RegionRules

MPP = 0.5
NUCLEI = [(60, 60, 6), (100, 70, 5), (70, 120, 7), (150, 150, 6), (40, 180, 5)]


def write_tiff(path: Path, size: int = 240, mpp: float | None = MPP) -> Path:
    """A pale H&E-like image with dark round nuclei at NUCLEI (real file, resolution tags in cm)."""
    rgb = np.full((size, size, 3), (235, 200, 225), np.uint8)
    for x, y, r in NUCLEI:
        cv2.circle(rgb, (x, y), r, (90, 40, 140), -1)
    kwargs = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgb, photometric="rgb", **kwargs)
    return path


def nucleus(x: float, y: float, r: float, cls: str | None = "Nucleus", kind: str = ANNOTATION, name=None, id=None):  # noqa: A002 - ObjectData.id
    return ObjectData(kind, Point(x, y).buffer(r), cls, name=name, id=id)


def entry(tmp_path: Path, objects, mpp: float | None = MPP, file_mpp: float | None = MPP, name="slide A.tif"):
    path = write_tiff(tmp_path / name.replace(" ", "_"), mpp=file_mpp)
    anns = [o for o in objects if o.kind == ANNOTATION]
    dets = [o for o in objects if o.kind == DETECTION]
    return ImageEntryData("1", name, path.as_uri(), 240, 240, mpp=mpp, annotations=anns, detections=dets)


def test_region_mask_labels_and_rules(tmp_path):
    region = ObjectData(ANNOTATION, box(20, 20, 130, 130), "Training region", id="r1")
    objs = [region]
    objs += [nucleus(x, y, r, id=f"n{i}") for i, (x, y, r) in enumerate(NUCLEI)]
    # unclassified small closed shape → nucleus; our own model detections are not ground truth
    objs.append(nucleus(30, 100, 4, cls=None))
    objs.append(nucleus(100, 100, 5, kind=DETECTION, name="dannucnet:m:1"))
    e = entry(tmp_path, objs)
    report = export_training([e], tmp_path / "ds", ExportOptions(val_fraction=0), project="p")
    ds = load_dataset(tmp_path / "ds")
    assert len(ds.samples) == 1
    s = ds.samples[0]
    labels, mask = s.load_labels(), s.load_region()
    # nuclei inside the region: NUCLEI[0..2] + the unclassified one; (70,120,r7) crosses y=130? no: 113..127
    assert len(np.unique(labels)) - 1 == 4
    # mask covers the region box (origin 20,20) and nothing else
    assert labels.shape == mask.shape == (110, 110)
    assert mask.all()
    assert report.counts["model detections left out"] == 1
    assert report.counts["nuclei outside every region (not exported)"] == 2
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["mpp"] == MPP
    assert info["samples"][s.stem]["annotation_ids"] == ["r1"]
    assert info["samples"][s.stem]["origin"] == [20, 20]
    # pixels: the image at a nucleus centre is dark
    rgb = s.load_image()
    assert rgb[60 - 20, 60 - 20].mean() < 120
    assert labels[60 - 20, 60 - 20] > 0 and labels[0, 0] == 0


def test_border_nucleus_kept_whole_and_region_grown(tmp_path):
    region = ObjectData(ANNOTATION, box(20, 20, 100, 100), None)  # unclassified but large → region
    n = nucleus(100, 70, 5)  # crosses x=100
    e = entry(tmp_path, [region, n])
    report = export_training([e], tmp_path / "ds", ExportOptions(val_fraction=0))
    s = load_dataset(tmp_path / "ds").samples[0]
    labels, mask = s.load_labels(), s.load_region()
    assert labels.shape[1] == 105 - 20  # bbox grew to the nucleus' right edge
    assert np.count_nonzero(labels) == pytest.approx(np.pi * 25, rel=0.2)
    assert mask[labels > 0].all()
    assert not mask[:, -1][:40].any()  # outside the original region and the nucleus: ignored
    assert report.counts["nuclei crossing a region border (kept whole, region grown)"] == 1


def test_overlap_smaller_on_top_invalid_fixed_empty_skipped(tmp_path):
    region = ObjectData(ANNOTATION, box(0, 0, 120, 120), "Training region")
    empty = ObjectData(ANNOTATION, box(150, 150, 230, 230), "Training region")
    big = nucleus(60, 60, 10)
    small = nucleus(66, 60, 4)
    bowtie = ObjectData(ANNOTATION, Polygon([(20, 20), (30, 30), (30, 20), (20, 30)]), "Nucleus")
    e = entry(tmp_path, [region, empty, big, small, bowtie])
    report = export_training([e], tmp_path / "ds", ExportOptions(val_fraction=0))
    ds = load_dataset(tmp_path / "ds")
    assert len(ds.samples) == 1  # the empty region is skipped
    labels = ds.samples[0].load_labels()
    assert len(np.unique(labels)) - 1 == 3
    assert labels[60, 66] != labels[60, 52]  # the small nucleus keeps its centre
    assert report.counts["empty regions skipped"] == 1
    assert report.counts["invalid geometries fixed"] == 1
    assert report.counts["overlapping nucleus pixels (smaller nucleus kept)"] > 0


def test_resample_patches_and_missing_pixel_size(tmp_path):
    region = ObjectData(ANNOTATION, box(0, 0, 200, 200), "Training region")
    objs = [region] + [nucleus(x, y, r) for x, y, r in NUCLEI]
    e = entry(tmp_path, objs, mpp=None, file_mpp=None)
    with pytest.raises(InputError, match="nothing to export.*no pixel size"):
        export_training([e], tmp_path / "none", ExportOptions())
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.partial").exists()
    opts = ExportOptions(assume_mpp=0.5, target_mpp=1.0, patch_size=64, val_fraction=0)
    report = export_training([e], tmp_path / "ds", opts)
    ds = load_dataset(tmp_path / "ds")
    assert ds.mpp == 1.0
    assert all(s.load_labels().shape == (64, 64) for s in ds.samples)
    # 200 px at 0.5 → 100 px at 1.0; windows at 0 and 36 per axis, all with mask, some without nuclei
    assert report.samples == len(ds.samples) >= 3
    total = {s.meta["origin"][0] for s in ds.samples}
    assert total <= {0.0, 72.0}


def test_region_class_option_and_other_classes(tmp_path):
    """With --region-class only those annotations are regions; other large annotations are ignored."""
    objs = [
        ObjectData(ANNOTATION, box(20, 20, 130, 130), "Tumor"),  # not a training region now
        ObjectData(ANNOTATION, box(130, 130, 200, 200), "Training region"),
        ObjectData(ANNOTATION, Point(60, 60).buffer(30), None),  # unclassified, 2800 px² = 700 µm² > 400: not a nucleus
        ObjectData(ANNOTATION, Point(5, 5), "Nucleus"),  # a point: ignored
        nucleus(150, 150, 6),
    ]
    rules = RegionRules(region_classes=("training REGION",), max_nucleus_um2=400)
    report = export_training([entry(tmp_path, objs)], tmp_path / "ds", ExportOptions(rules=rules, val_fraction=0))
    [s] = load_dataset(tmp_path / "ds").samples
    assert s.meta["origin"] == [130, 130]
    assert report.counts["annotations of other classes ignored"] == 2
    assert report.counts["points/lines ignored"] == 1


def test_moved_image_points_to_update_image_paths(tmp_path):
    e = ImageEntryData("7", "gone.svs", (tmp_path / "gone.svs").as_uri(), 100, 100, mpp=0.5,
                       annotations=[ObjectData(ANNOTATION, box(0, 0, 50, 50), "Training region")])
    with pytest.raises(InputError, match="update_image_paths"):
        export_training([e], tmp_path / "ds", ExportOptions())


def test_synthetic_slide_round_trip_matches_ground_truth(tmp_path):
    """Nuclei traced from a synthetic slide's truth, exported, give back that truth inside the region."""
    from dannucnet.geometry.polygons import labels_to_polygons
    from dannucnet.slides.synthetic import make_synthetic_he, write_pyramidal_tiff

    img = make_synthetic_he(384, 384, seed=3, mpp=0.25)
    path = write_pyramidal_tiff(tmp_path / "synth.tif", img.rgb, 0.25, compression=None)
    polys = labels_to_polygons(img.labels, simplify_px=0)
    region = box(64, 64, 320, 320)
    objs = [ObjectData(ANNOTATION, region, "Training region", id="R")]
    objs += [ObjectData(ANNOTATION, p, "Nucleus", id=str(k)) for k, p in polys.items()]
    e = ImageEntryData("9", "synth.tif", path.as_uri(), 384, 384, mpp=None, annotations=objs)  # mpp from the file
    report = export_training([e], tmp_path / "ds", ExportOptions(val_fraction=0))
    [s] = load_dataset(tmp_path / "ds").samples
    labels, mask = s.load_labels(), s.load_region()
    x0, y0 = (int(v) for v in s.meta["origin"])
    h, w = labels.shape
    truth = img.labels[y0 : y0 + h, x0 : x0 + w]
    inside = mask
    agree = np.mean((labels[inside] > 0) == (truth[inside] > 0))
    assert agree > 0.995
    crossing = [k for k, p in polys.items() if p.intersects(region) and not region.contains(p)]
    touching = {k for k, p in polys.items() if p.intersection(region).area > 0}
    assert len(np.unique(labels)) - 1 == len(touching) - report.counts["nuclei lost (covered or below one pixel)"]
    assert report.counts["nuclei crossing a region border (kept whole, region grown)"] == len(crossing) > 0
    assert s.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(s.load_image(), img.rgb[y0 : y0 + h, x0 : x0 + w])
    # the same export at half resolution: half the size, same nuclei
    export_training([e], tmp_path / "half", ExportOptions(target_mpp=0.5, val_fraction=0))
    [s2] = load_dataset(tmp_path / "half").samples
    assert s2.load_labels().shape == (round(h / 2), round(w / 2))
    assert s2.mpp == 0.5


def test_splits_keep_patches_of_a_region_together():
    from dannucnet.qupath.export import assign_splits

    groups = {f"1/{k}": [f"a_r{k}_p{p}" for p in range(3)] for k in range(10)}
    splits = assign_splits(groups, 0.3)
    assert sorted(splits["all"]) == sorted(s for v in groups.values() for s in v)
    assert set(splits["train"]).isdisjoint(splits["val"]) and splits["val"]
    for stems in groups.values():
        assert set(stems) <= set(splits["train"]) or set(stems) <= set(splits["val"])
    assert assign_splits(groups, 0.3) == splits  # deterministic
    two = assign_splits({"1/0": ["x"], "1/1": ["y"]}, 0.01)
    assert two["val"] and two["train"]
    assert "val" not in assign_splits(groups, 0)
