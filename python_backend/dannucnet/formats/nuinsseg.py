"""NuInsSeg folders (Mahbod et al. 2024) read as an instance dataset, in place.

Layout of one organ's folder, as the dataset ships it::

    tissue images/<name>.png            RGB, 512², 40× (0.25 µm/px, the dataset's stated size)
    label masks modify/<name>.tif       16-bit instance ids, 0 = background
    vague areas/mask binary/<name>.png  non-zero = ambiguous, annotators unsure

The dataset's own advice is to leave the vague areas out of the loss and the
scores, not to count them as background: they become the sample's region mask
(annotated = not vague), which train and evaluate already honour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dannucnet.errors import InputError
from dannucnet.formats.dataset import Dataset, Sample

IMAGES, LABELS, VAGUE = "tissue images", "label masks modify", "vague areas/mask binary"
#: NuInsSeg states 40× for all its images; its paper gives 0.25 µm/px (MoNuSeg's 0.2527 is within 1 %).
NUINSSEG_MPP = 0.25


def is_nuinsseg(root: Path) -> bool:
    return (root / IMAGES).is_dir() and (root / LABELS).is_dir()


class NuInsSegSample(Sample):
    """A sample whose region is "everything but the vague area" (``region_path`` = the vague mask)."""

    def load_region(self) -> np.ndarray | None:
        if self.region_path is None:
            return None
        try:
            with Image.open(self.region_path) as im:
                vague = np.asarray(im.convert("L")) > 0
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read vague-area mask {self.region_path}: {exc}") from exc
        return ~self.fit_region(vague, self.region_path)


def load_nuinsseg(root: Path) -> Dataset:
    """Every image with an instance mask of the same name; the vague-area mask where there is one."""
    samples: list[Sample] = []
    for image_path in sorted((root / IMAGES).glob("*.png")):
        label_path = root / LABELS / f"{image_path.stem}.tif"
        if not label_path.exists():
            continue
        vague = root / VAGUE / image_path.name
        samples.append(NuInsSegSample(
            stem=image_path.stem, image_path=image_path, label_path=label_path,
            region_path=vague if vague.exists() else None, organ=_organ(root), mpp=NUINSSEG_MPP,
        ))
    if not samples:
        raise InputError(f"{root}: no '{IMAGES}/<name>.png' with a matching '{LABELS}/<name>.tif'")
    info = {"format": "nuinsseg", "mpp": NUINSSEG_MPP,
            "provenance": {"name": "NuInsSeg (Mahbod et al. 2024)", "licence": "CC BY 4.0"}}
    return Dataset(root=root, samples=samples, splits=heldout_splits([s.stem for s in samples]),
                   mpp=NUINSSEG_MPP, meta=info)


def heldout_splits(stems: list[str], every: int = 3) -> dict[str, list[str]]:
    """``val``: every third image by name (11 of the spleen set's 34), never trained on; ``train``: the rest.

    NuInsSeg has no official split. Issue 20 trains on ``train`` and decides on ``val``
    (its F1 / AJI / PQ and the precision on its nuclei-poor crops); a fixed rule by name
    keeps the two apart in every run without a file to keep in step.
    """
    ordered = sorted(stems)
    val = ordered[every - 1::every]
    return {"train": [s for s in ordered if s not in val], "val": val}


def _organ(root: Path) -> str:
    """"nuinsseg-human-spleen" → "human spleen"; any other folder name as it is."""
    name = root.resolve().name
    return name.removeprefix("nuinsseg-").replace("-", " ").replace("_", " ") or name
