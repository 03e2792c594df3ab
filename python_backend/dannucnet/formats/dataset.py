"""The instance dataset folder: what export writes and train/evaluate read.

Layout::

    images/<stem>.<png|tif|jpg>   RGB uint8
    labels/<stem>.tif             uint16/uint32 instance ids, 0 = background
    regions/<stem>.tif            optional uint8, non-zero = annotated; pixels outside are ignored
    dataset.json                  pixel size, splits, per-sample metadata, provenance

The optional region mask matters: a person rarely annotates every nucleus of an
image, and unannotated area taught as background would train the model to miss
nuclei. A folder without ``dataset.json`` is still read (every sample in split
"all"); the read-only MoNuSeg folder gets the Kumar split and organs built in.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from dannucnet.errors import InputError, OutputError

FORMAT_NAME = "dannucnet-instances"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass
class Sample:
    stem: str
    image_path: Path
    label_path: Path
    region_path: Path | None = None
    organ: str | None = None
    mpp: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> np.ndarray:
        return read_rgb(self.image_path)

    def load_labels(self) -> np.ndarray:
        labels = tifffile.imread(self.label_path)
        if labels.ndim != 2:
            raise InputError(f"{self.label_path}: instance labels must be a single-channel image")
        return labels.astype(np.int32, copy=False)

    def load_region(self) -> np.ndarray | None:
        if self.region_path is None:
            return None
        return tifffile.imread(self.region_path) > 0


@dataclass
class Dataset:
    root: Path
    samples: list[Sample]
    splits: dict[str, list[str]]
    mpp: float | None
    meta: dict[str, Any] = field(default_factory=dict)

    def select(self, split: str | None = None) -> list[Sample]:
        """Samples of a named split; ``None`` or "all" gives every sample."""
        if split in (None, "all"):
            return list(self.samples)
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise InputError(f"dataset {self.root} has no split {split!r} (known splits: {known})")
        by_stem = {s.stem: s for s in self.samples}
        missing = [stem for stem in self.splits[split] if stem not in by_stem]
        if missing:
            raise InputError(f"split {split!r} names images that are not in {self.root}/images: {missing[:5]}")
        return [by_stem[stem] for stem in self.splits[split]]


def read_rgb(path: Path) -> np.ndarray:
    """Read an RGB uint8 image from PNG/JPEG/TIFF, dropping alpha."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            array = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] < 3:
        raise InputError(f"{path}: expected an RGB image, got shape {array.shape}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        raise InputError(f"{path}: expected 8-bit RGB, got {array.dtype}")
    return np.ascontiguousarray(array)


def _find_image(images_dir: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = images_dir / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return None


def split_spec(spec: str) -> tuple[str, str | None]:
    """``DIR`` or ``DIR:SPLIT`` (``--extra-data``) → (folder, split or None); an existing folder is taken whole,
    so a folder whose name holds a colon still works."""
    if Path(spec).exists():
        return spec, None
    folder, _, split = spec.partition(":")
    return folder, split or None


def load_dataset(root: str | os.PathLike[str]) -> Dataset:
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        external = _external_dataset(root)
        if external is not None:
            return external
        raise InputError(f"{root} is not an instance dataset folder: it needs images/ and labels/ subfolders "
                         "(or a NuInsSeg or GBM40 folder as published)")
    info: dict[str, Any] = {}
    if (root / "dataset.json").exists():
        try:
            info = json.loads((root / "dataset.json").read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{root}/dataset.json is not valid JSON: {exc}") from exc
    elif (root / "MANIFEST.md").exists() and "MoNuSeg" in (root / "MANIFEST.md").read_text()[:2000]:
        info = _monuseg_info()
    per_sample: dict[str, dict[str, Any]] = info.get("samples", {})
    default_mpp = info.get("mpp")
    samples = []
    for label_path in sorted(labels_dir.glob("*.tif")):
        stem = label_path.stem
        image_path = _find_image(images_dir, stem)
        if image_path is None:
            continue
        meta = dict(per_sample.get(stem, {}))
        region = root / "regions" / f"{stem}.tif"
        samples.append(
            Sample(
                stem=stem,
                image_path=image_path,
                label_path=label_path,
                region_path=region if region.exists() else None,
                organ=meta.pop("organ", None),
                mpp=meta.pop("mpp", default_mpp),
                meta=meta,
            )
        )
    if not samples:
        raise InputError(f"{root} holds no image with a matching labels/<stem>.tif")
    splits = {name: list(stems) for name, stems in info.get("splits", {}).items()}
    return Dataset(root=root, samples=samples, splits=splits, mpp=default_mpp, meta=info)


def _external_dataset(root: Path) -> Dataset | None:
    """A public data set's own layout, read in place (NuInsSeg, GBM40); None if it is neither."""
    from dannucnet.formats import gbm40, nuinsseg

    if nuinsseg.is_nuinsseg(root):
        return nuinsseg.load_nuinsseg(root)
    if gbm40.is_gbm40(root):
        return gbm40.load_gbm40(root)
    return None


def _monuseg_info() -> dict[str, Any]:
    from dannucnet.formats.kumar_split import MONUSEG_MPP, ORGANS, SPLITS

    return {
        "format": FORMAT_NAME,
        "mpp": MONUSEG_MPP,
        "splits": SPLITS,
        "samples": {stem: {"organ": organ} for stem, organ in ORGANS.items()},
        "provenance": {"name": "MoNuSeg 2018 training set (Kumar 2017)", "licence": "CC BY-NC-SA 4.0"},
    }


class DatasetWriter:
    """Writes a dataset folder all-or-nothing: into ``<root>.partial``, renamed on ``close``.

    A run that fails half-way leaves the partial folder (for inspection) but
    never a folder that looks complete.
    """

    def __init__(self, root: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.root = Path(root)
        if self.root.exists() and not overwrite:
            raise OutputError(f"{self.root} exists already; choose another folder or pass --overwrite")
        self.partial = self.root.with_name(self.root.name + ".partial")
        try:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            for sub in ("images", "labels"):
                (self.partial / sub).mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.partial}: {exc}") from exc
        self.samples: dict[str, dict[str, Any]] = {}

    def add(
        self,
        stem: str,
        rgb: np.ndarray,
        labels: np.ndarray,
        region: np.ndarray | None = None,
        **meta: Any,
    ) -> None:
        if stem in self.samples:
            raise ValueError(f"duplicate sample stem {stem!r}")
        if rgb.shape[:2] != labels.shape:
            raise ValueError(f"image {rgb.shape[:2]} and labels {labels.shape} differ in size")
        Image.fromarray(np.ascontiguousarray(rgb[..., :3])).save(self.partial / "images" / f"{stem}.png")
        dtype = np.uint16 if labels.max(initial=0) < 65536 else np.uint32
        tifffile.imwrite(self.partial / "labels" / f"{stem}.tif", labels.astype(dtype), compression="zlib")
        if region is not None:
            (self.partial / "regions").mkdir(exist_ok=True)
            tifffile.imwrite(
                self.partial / "regions" / f"{stem}.tif", (region > 0).astype(np.uint8) * 255, compression="zlib"
            )
        self.samples[stem] = {k: v for k, v in meta.items() if v is not None}

    def close(self, mpp: float | None, splits: dict[str, list[str]] | None = None, **info: Any) -> Path:
        document = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "mpp": mpp,
            "splits": splits or {"all": sorted(self.samples)},
            "samples": self.samples,
            **info,
        }
        (self.partial / "dataset.json").write_text(json.dumps(document, indent=2, sort_keys=False))
        if self.root.exists():
            shutil.rmtree(self.root)
        self.partial.rename(self.root)
        return self.root


@dataclass
class ResampledSample(Sample):
    """A sample seen at another pixel size: the image area-averaged (as a scanner's coarser level
    would be), instance labels and region nearest-neighbour (ids stay ids). How the Kumar
    test split at 0.25 µm/px becomes a 20× (0.5 µm/px) test set.

    ``source`` is the sample as its set's reader gives it, and reads the pixels: a NuInsSeg region is
    its vague mask inverted, GBM40's labels are contours rasterised (read as a plain sample, both were
    a TIFF error)."""

    source: Sample | None = None

    @property
    def source_mpp(self) -> float:
        assert self.source is not None and self.source.mpp  # resampled() sets both
        return float(self.source.mpp)

    def _size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        assert self.mpp is not None  # resampled() gives every resampled sample its pixel size
        scale = self.source_mpp / float(self.mpp)
        return max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale))

    def load_image(self) -> np.ndarray:
        import cv2

        assert self.source is not None
        rgb = self.source.load_image()
        size = self._size(rgb.shape)
        return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if size[0] < rgb.shape[1] else cv2.INTER_LINEAR)

    def load_labels(self) -> np.ndarray:
        import cv2

        assert self.source is not None
        labels = self.source.load_labels()
        resized = cv2.resize(labels.astype(np.float32), self._size(labels.shape), interpolation=cv2.INTER_NEAREST)
        return resized.astype(np.int32)

    def load_region(self) -> np.ndarray | None:
        import cv2

        assert self.source is not None
        region = self.source.load_region()
        if region is None:
            return None
        size = self._size(region.shape)
        return cv2.resize(region.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0


def resampled(samples: list[Sample], mpp: float) -> list[Sample]:
    """The samples at ``mpp`` µm/px (those within 1 % of it, or of unknown pixel size, as they are)."""
    out: list[Sample] = []
    for s in samples:
        if not s.mpp or abs(s.mpp / mpp - 1.0) <= 0.01:
            out.append(s)
            continue
        out.append(ResampledSample(s.stem, s.image_path, s.label_path, s.region_path, s.organ, mpp,
                                   {**s.meta, "resampled_from_mpp": s.mpp}, source=s))
    return out
