"""Precision where nuclei are few: the fields where a model invents them (issue 20).

A whole-image score hides what a pathologist sees first. On a 512² field of
spleen with a dozen nuclei, 1.6's pixel F1 was fine while a third of what it
called nucleus on the sparse parts was pigment, debris or stroma. So the
evaluation also cuts every image into 64 µm squares (256 px at the models'
0.25 µm/px), half-overlapping, keeps those whose annotated nucleus share is
below ``POOR_SHARE``, segments each as a chunk of its own (a fat or stroma chunk
of a slide is normalised and segmented alone) and pools:

* pixel precision: of the pixels called nucleus, the share annotated nucleus;
* nuclei per mm² found and annotated.

8 %: of these squares a typical one is a fifth nucleus (median share 20 % on
NuInsSeg spleen's `train` images, 22 % on the 16 Kumar training images), so the
rule keeps the few sparse fields and leaves tissue of ordinary density out:
20 of 207 squares of NuInsSeg `train`, 4 of 99 of `val`, 5 of 576 of the Kumar
training images, none of GBM40's 360. Crops with over 5 % of their area outside
the annotated region (a set's "vague areas") are skipped, and within the others
those pixels are not counted.

The pooled precision depends on the annotation too: nuclei the annotators left
out count as false here (NuInsSeg's pale nuclei: docs/training.md). Compare
models on one set, not sets with each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dannucnet.formats.dataset import Sample
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.protocols import Predictor

#: A crop is nuclei-poor when under this share of its pixels are annotated nucleus.
POOR_SHARE = 0.08
#: The crop's side in µm: a 256² model window at 0.25 µm/px.
CROP_UM = 64.0
#: Crops with more than this share of ignored (unannotated) area are left out.
MAX_IGNORED = 0.05


@dataclass(frozen=True)
class PoorCrop:
    """A nuclei-poor square of a sample: its pixels, annotation and ``counted`` mask (False: ignored)."""

    key: str  # "<stem>@x,y"
    stem: str
    rgb: np.ndarray
    truth: np.ndarray
    counted: np.ndarray
    mpp: float


def crop_side(mpp: float) -> int:
    """Pixels of a ``CROP_UM`` square at ``mpp`` µm/px (at least 32)."""
    return max(32, int(round(CROP_UM / mpp)))


def poor_crops_of(
    rgb: np.ndarray, truth: np.ndarray, region: np.ndarray | None, mpp: float, stem: str,
    share: float = POOR_SHARE,
) -> Iterator[PoorCrop]:
    """The nuclei-poor crops of one image, stride half a crop, in row order."""
    side = crop_side(mpp)
    for y in range(0, truth.shape[0] - side + 1, side // 2):
        for x in range(0, truth.shape[1] - side + 1, side // 2):
            window = (slice(y, y + side), slice(x, x + side))
            counted = np.ones((side, side), bool) if region is None else region[window].astype(bool)
            if counted.mean() < 1.0 - MAX_IGNORED:
                continue
            lab = truth[window]
            if (lab[counted] > 0).mean() < share:
                yield PoorCrop(f"{stem}@{x},{y}", stem, rgb[window], lab, counted, mpp)


def poor_crops(samples: Iterable[Sample], share: float = POOR_SHARE, default_mpp: float = 0.25) -> list[PoorCrop]:
    """Every sample's nuclei-poor crops (its pixel size, else ``default_mpp``)."""
    crops: list[PoorCrop] = []
    for s in samples:
        crops += poor_crops_of(s.load_image(), s.load_labels(), s.load_region(), float(s.mpp or default_mpp), s.stem,
                               share)
    return crops


@dataclass
class PoorScore:
    """Pooled over the crops: pixels called nucleus that are / are not annotated, nuclei found / annotated."""

    crops: int = 0
    true_pixels: int = 0
    false_pixels: int = 0
    found: int = 0
    annotated: int = 0
    area_mm2: float = 0.0
    share: float = POOR_SHARE

    def add(self, crop: PoorCrop, predicted: np.ndarray, found: int) -> None:
        called = (predicted > 0) & crop.counted
        self.crops += 1
        self.true_pixels += int((called & (crop.truth > 0)).sum())
        self.false_pixels += int((called & (crop.truth == 0)).sum())
        self.found += int(found)
        self.annotated += len(np.unique(crop.truth[crop.truth > 0]))
        self.area_mm2 += float(crop.counted.sum()) * (crop.mpp / 1000.0) ** 2

    @property
    def precision(self) -> float:
        """Pixel precision; 1.0 when nothing was called (nothing invented)."""
        called = self.true_pixels + self.false_pixels
        return self.true_pixels / called if called else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: with no crops the rates are None (null), not NaN, which strict JSON readers refuse."""
        per_mm2 = (lambda n: n / self.area_mm2) if self.area_mm2 else (lambda n: None)
        return {
            "crops": self.crops, "crop_um": CROP_UM, "share_below": self.share,
            "pixel_precision": self.precision if self.crops else None,
            "true_pixels": self.true_pixels, "false_pixels": self.false_pixels,
            "found_per_mm2": per_mm2(self.found), "annotated_per_mm2": per_mm2(self.annotated),
        }



def score_poor_crops(
    predictor: Predictor, crops: Iterable[PoorCrop], options: SegmentOptions, share: float = POOR_SHARE,
    into: PoorScore | None = None,
) -> PoorScore:
    """Segment each crop alone, as ``segment`` would segment it, and pool (see the module's docstring);
    ``into``: add to this score (its own share) rather than a new one."""
    from dannucnet.evaluate.runner import polygons_to_labels
    from dannucnet.pipeline import segment_region

    score = into if into is not None else PoorScore(share=share)
    for crop in crops:
        result = segment_region(predictor, crop.rgb, mpp=crop.mpp, options=options)
        score.add(crop, polygons_to_labels([n.polygon for n in result.nuclei], crop.truth.shape), len(result.nuclei))
    return score


def poor_line(scores: dict[str, Any]) -> str:
    """One line for a summary, from :meth:`PoorScore.to_dict`."""
    share, side = 100 * scores["share_below"], scores["crop_um"]
    if not scores["crops"]:
        return f"nuclei-poor crops: none in this split (no {side:g} µm square under {share:g} % annotated nucleus)"
    return (f"nuclei-poor crops ({scores['crops']} squares of {side:g} µm under {share:g} % annotated nucleus, each "
            f"segmented alone): pixel precision {scores['pixel_precision']:.3f}; nuclei/mm² found "
            f"{scores['found_per_mm2']:.0f}, annotated {scores['annotated_per_mm2']:.0f}")
