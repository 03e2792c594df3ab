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
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from dannucnet.errors import InputError, OutputError, one_line
from dannucnet.values import is_number

log = logging.getLogger(__name__)

FORMAT_NAME = "dannucnet-instances"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
#: Instance ids at or above this are renumbered 1..n on reading: the resamplers (ResampledSample,
#: train.patches) pass labels through float32, which holds every integer exactly only up to 2**24,
#: and int32 (what every consumer gets) ends at 2**31 (uint32 ids above it wrapped negative, uint64 ones
#: were cut modulo 2**32 and distinct nuclei merged).
EXACT_ID_LIMIT = 2**24
#: A label image whose one id covers this many separate objects is taken for a binary mask (a warning):
#: two pieces can be one nucleus cut by the image border or a region edge, three of one id are not.
BINARY_MASK_OBJECTS = 3


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
        labels = read_tiff(self.label_path, "label image")
        if labels.ndim != 2:
            raise InputError(f"{self.label_path}: instance labels must be a single-channel image")
        return instance_ids(labels, self.label_path)

    def load_region(self) -> np.ndarray | None:
        if self.region_path is None:
            return None
        return self.fit_region(read_tiff(self.region_path, "region mask") > 0, self.region_path)

    def fit_region(self, region: np.ndarray, path: Path) -> np.ndarray:
        """``region`` (read from ``path``) checked against the label image's size, read from its TIFF header
        without decoding it: a mask of another size marks other pixels (it was the metrics' ValueError)."""
        try:
            with tifffile.TiffFile(self.label_path) as tif:
                shape = tuple(tif.series[0].shape)
        except Exception as exc:  # any type: see read_tiff
            raise InputError(f"cannot read label image {self.label_path}: {one_line(exc)}") from exc
        if region.shape != shape:
            raise InputError(f"{path}: the region mask is {_size(region.shape)} px but the label image "
                             f"{self.label_path.name} is {_size(shape)}; they must cover the same pixels")
        return region


@dataclass
class Dataset:
    root: Path
    samples: list[Sample]
    splits: dict[str, list[str]]
    mpp: float | None
    meta: dict[str, Any] = field(default_factory=dict)

    def select(self, split: str | None = None) -> list[Sample]:
        """Samples of a named split; ``None`` means "all", which is every sample unless dataset.json lists its
        own "all" (then checked like any split: an image it names without a label file is an error, not dropped).

        A split without images is an error: scored, it gave a table of NaN and exit 0 (and a card record
        without scores); a NuInsSeg folder of fewer than 3 images has an empty ``val``."""
        name = "all" if split is None else split
        if name == "all" and name not in self.splits:
            return list(self.samples)
        if name not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise InputError(f"dataset {self.root} has no split {name!r} (known splits: {known})")
        by_stem = {s.stem: s for s in self.samples}
        missing = [stem for stem in self.splits[name] if stem not in by_stem]
        if missing:
            raise InputError(f"split {name!r} names images that are not in {self.root}/images "
                             f"(or have no labels/<name>.tif): {missing[:5]}")
        if not self.splits[name]:
            filled = ", ".join(sorted(k for k, v in self.splits.items() if v)) or "none"
            raise InputError(f"split {name!r} of {self.root} has no images; choose another split "
                             f"(splits with images: {filled})")
        return [by_stem[stem] for stem in self.splits[name]]


def _size(shape: tuple[int, ...]) -> str:
    return " x ".join(str(n) for n in shape)


def read_tiff(path: Path, what: str) -> np.ndarray:
    """A TIFF's pixels, or one :class:`InputError` naming the file.

    Any exception: tifffile and its codecs fail on a damaged file in many ways. Of 600 damaged copies of
    a label TIFF (truncated, bytes overwritten) tifffile raised TiffFileError/ValueError, imagecodecs'
    DeflateError (a RuntimeError), ZeroDivisionError, TypeError, and MemoryError (a header claiming 1 TiB);
    a TIFF header followed by garbage reads as an empty array.
    """
    try:
        array = tifffile.imread(path)
    except Exception as exc:  # a damaged file raises any type (see above); re-raised as one named line
        raise InputError(f"cannot read {what} {path}: {one_line(exc)}; replace it with a valid TIFF") from exc
    if not array.size:  # what tifffile makes of a TIFF header followed by garbage
        raise InputError(f"cannot read {what} {path}: it holds no pixels; replace it with a valid TIFF")
    return array


def instance_ids(labels: np.ndarray, path: Path) -> np.ndarray:
    """A label image as int32 instance ids (0 = background); anything that is not such ids is an error.

    Ids of any size work: from :data:`EXACT_ID_LIMIT` up they are renumbered 1..n in their order, so
    distinct ids stay distinct. Floats are accepted when they hold whole numbers. A bool or single-id
    image is read as it is, with a warning when it looks like a binary mask (:func:`_warn_if_binary`).
    """
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    if labels.dtype.kind not in "uif":
        raise InputError(f"{path}: instance labels must be integer ids, not {labels.dtype} values")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all():
            raise InputError(f"{path}: the label image holds NaN or infinite values; ids must be whole "
                             "numbers (0 = background)")
        fractional = labels[labels != np.floor(labels)]
        if fractional.size:
            raise InputError(f"{path}: the label image holds fractional ids such as {fractional[0]:g}; ids "
                             "must be whole numbers (0 = background)")
    if labels.size and labels.dtype.kind in "if" and labels.min() < 0:
        raise InputError(f"{path}: the label image holds negative ids (lowest {labels.min():g}); ids must be "
                         "0 (background) or positive")
    if labels.size and labels.max() >= EXACT_ID_LIMIT:
        ids, inverse = np.unique(labels, return_inverse=True)
        labels = inverse.reshape(labels.shape) + int(ids[0] != 0)  # background stays 0, or there is none
    labels = labels.astype(np.int32, copy=False)
    _warn_if_binary(labels, path)
    return labels


def _warn_if_binary(labels: np.ndarray, path: Path) -> None:
    """One warning when a single id covers :data:`BINARY_MASK_OBJECTS` or more separate objects: a binary
    mask read as instances makes every nucleus one object (PQ 0, AJI about 3) without any other hint."""
    top = int(labels.max(initial=0))
    if top == 0 or int(np.min(labels, where=labels > 0, initial=top)) != top:
        return  # no nuclei, or more than one id: an instance map
    from scipy import ndimage

    objects = ndimage.label(labels > 0, structure=np.ones((3, 3), bool))[1]
    if objects >= BINARY_MASK_OBJECTS:
        log.warning("%s: all %d separate objects share the id %d: this looks like a binary mask, not an instance "
                    "map; give each nucleus its own id (e.g. scipy.ndimage.label)", path, objects, top)


def read_rgb(path: Path) -> np.ndarray:
    """Read an RGB uint8 image from PNG/JPEG/TIFF, dropping alpha."""
    if path.suffix.lower() in (".tif", ".tiff"):
        array = read_tiff(path, "image")
    else:
        try:
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
        info = read_dataset_info(root / "dataset.json")
    elif (root / "MANIFEST.md").exists() and "MoNuSeg" in (root / "MANIFEST.md").read_text()[:2000]:
        info = _monuseg_info()
    per_sample: dict[str, dict[str, Any]] = info.get("samples") or {}
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
    splits = {name: list(stems) for name, stems in (info.get("splits") or {}).items()}
    return Dataset(root=root, samples=samples, splits=splits, mpp=default_mpp, meta=info)


def _json_type(value: Any) -> str:
    """What a JSON value is, in JSON's words (for the messages)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    kinds = ((dict, "an object"), (list, "a list"), (str, "a string"), ((int, float), "a number"))
    word = next((word for kind, word in kinds if isinstance(value, kind)), type(value).__name__)
    return f"{word} ({_shown(value)})"


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_mpp(path: Path, key: str, value: Any) -> None:
    """A pixel size of the set's images (or null: unknown), held to the one plausibility rule that every
    image's calibration and every ``--mpp`` meet (:mod:`dannucnet.slides.mpp`): 1e6 had cv2 allocate 3e18
    bytes and 0.001 scored an empty prediction, exit 0."""
    from dannucnet.slides.mpp import MPP_MAX, MPP_MIN, is_plausible

    if value is None:
        return
    # compared before float(): a 400-digit integer is valid JSON, and float() of it overflows
    if not (is_number(value) and MPP_MIN <= value <= MPP_MAX and is_plausible(float(value))):
        raise InputError(f"{path}: {key} is {_json_type(value)}; it must be the pixel size in µm/px, a number "
                         f"from {MPP_MIN:g} to {MPP_MAX:g} (0.25 for a 40x scan), or null")


def _object(path: Path, key: str, value: Any, want: str) -> dict[str, Any]:
    """``value`` (of ``key`` in ``path``) as a JSON object; null is an empty one, anything else an error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{path}: {key} is {_json_type(value)}; it must be {want}")
    return value


def read_dataset_info(path: Path) -> dict[str, Any]:
    """``dataset.json``, read and its shape checked once, so that a wrong document is one line naming the key
    rather than a traceback wherever it is used (a list, ``"samples": [1]``, ``"splits": ["test"]``, organs
    given as numbers, a split given as one string and read letter by letter, a folder, UTF-16 text).

    What the readers use: ``mpp`` (number or null), ``splits`` (split name → list of image names),
    ``samples`` (image name → object; its ``organ`` a string or null, its ``mpp`` as the top-level one).
    Other keys (format, provenance...) are kept as they are.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: Notepad's byte-order mark is fine
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; an integer of > 4300 digits; deep nesting
        raise InputError(f"{path} is not valid JSON: {one_line(exc)}") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}; it must be a JSON file") from exc
    if not isinstance(document, dict):
        raise InputError(f"{path} must hold one JSON object ({{\"mpp\": ..., \"splits\": ...}}), not "
                         f"{_json_type(document)}")
    _check_mpp(path, "mpp", document.get("mpp"))
    splits = _object(path, "splits", document.get("splits"),
                     'an object of split name → list of image names, e.g. {"test": ["im0", "im1"]}')
    for name, stems in splits.items():
        if not isinstance(stems, list):
            raise InputError(f"{path}: splits.{name} is {_json_type(stems)}; it must be a list of image names, "
                             'e.g. ["im0", "im1"]')
        wrong = next((stem for stem in stems if not isinstance(stem, str)), None)
        if wrong is not None:
            raise InputError(f"{path}: splits.{name} holds {_json_type(wrong)}; image names are strings (the "
                             "file name without its extension)")
    samples = _object(path, "samples", document.get("samples"),
                      'an object of image name → its details, e.g. {"im0": {"organ": "Breast"}}')
    for stem, meta in samples.items():
        meta = _object(path, f"samples.{stem}", meta, 'an object, e.g. {"organ": "Breast"}')
        organ = meta.get("organ")
        if organ is not None and not isinstance(organ, str):
            raise InputError(f"{path}: samples.{stem}.organ is {_json_type(organ)}; it must be a string or null")
        _check_mpp(path, f"samples.{stem}.mpp", meta.get("mpp"))
    return document


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
