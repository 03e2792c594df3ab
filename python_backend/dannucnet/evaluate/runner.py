"""Run a model over a labelled dataset and score what a user would receive.

Two predictions are scored per image:

* ``final``: the polygons that ``segment_region`` hands out (the same call the
  CLI, server and QuPath doors make), rasterised back to a label map at pixel
  centres. This is the number that matters: it includes instance splitting,
  small-object removal and polygon simplification.
* ``raw``: the same forward pass's probability map thresholded, with
  connected components as instances — the paper's setting, for comparison.

Averages are macro over images (every image counts once, images with F1 = 0
included — the authors' script dropped them), per organ and overall.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from scipy import ndimage

from dannucnet.errors import InputError
from dannucnet.evaluate.metrics import SCORE_NAMES, score_labels
from dannucnet.evaluate.poor import POOR_SHARE, PoorScore, poor_crops_of, score_poor_crops
from dannucnet.formats.dataset import Sample
from dannucnet.geometry.instances import split_map
from dannucnet.geometry.rasterize import rasterize_polygons

if TYPE_CHECKING:  # the pipeline imports torch: only when a model is actually run
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.protocols import Predictor

SOURCES = ("final", "raw")


@dataclass
class ImageResult:
    stem: str
    organ: str | None
    mpp: float
    final: dict[str, float]
    raw: dict[str, float]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # segment_region's stages, seconds


@dataclass
class EvaluationResult:
    """Per-image scores and their means; ``to_dict`` is what ``--json`` writes."""

    model: dict[str, Any]
    split: str | None
    threshold: float
    images: list[ImageResult] = field(default_factory=list)
    nuclei_poor: dict[str, Any] | None = None  # evaluate.poor.PoorScore.to_dict(); None: not measured

    @property
    def organs(self) -> list[str]:
        return sorted({r.organ or "unknown" for r in self.images})

    def mean(self, source: str = "final", stems: Iterable[str] | None = None) -> dict[str, float]:
        """Macro mean of every score over the chosen images (all by default)."""
        chosen = set(stems) if stems is not None else None
        rows = [getattr(r, source) for r in self.images if chosen is None or r.stem in chosen]
        return mean_scores(rows)

    def by_organ(self, source: str = "final") -> dict[str, dict[str, float]]:
        return {
            organ: self.mean(source, [r.stem for r in self.images if (r.organ or "unknown") == organ])
            for organ in self.organs
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "split": self.split,
            "threshold": self.threshold,
            "averaging": "macro over images; images with F1 = 0 included",
            "overall": {src: self.mean(src) for src in SOURCES},
            "by_organ": {src: self.by_organ(src) for src in SOURCES},
            "images": [asdict(r) for r in self.images],
            "nuclei_poor_crops": self.nuclei_poor,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        return cls(
            model=data.get("model", {}),
            split=data.get("split"),
            threshold=float(data["threshold"]),
            images=[ImageResult(**r) for r in data.get("images", [])],
            nuclei_poor=data.get("nuclei_poor_crops"),
        )


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each score in ``SCORE_NAMES`` plus summed counts; ``n_images`` says how many."""
    out: dict[str, float] = {"n_images": len(rows)}
    if not rows:
        return out
    for name in SCORE_NAMES:
        out[name] = float(np.mean([r[name] for r in rows]))
    for name in ("n_true", "n_pred"):
        out[name] = int(sum(r.get(name, 0) for r in rows))
    return out


def probability_at(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The model-resolution probability map resampled to the image's own pixels.

    ``segment_region`` runs the network at the model's pixel size; when the
    dataset's differs, the map is scaled back (bilinear) so the raw mask can be
    scored against the image's labels.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.shape == tuple(shape):
        return prob
    return cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def raw_instances(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components (4-connected) of ``prob > threshold``: the paper's output, made countable."""
    labels, _ = ndimage.label(prob > threshold)
    return labels.astype(np.int32, copy=False)


def polygons_to_labels(polygons: Sequence[Any], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise level-0 polygons to a label map of ``shape`` (pixel-centre rule; polygon i → id i + 1)."""
    return np.asarray(rasterize_polygons(list(polygons), shape, origin=(0.0, 0.0), scale=1.0))


def evaluate_model(
    predictor: Predictor,
    samples: Sequence[Sample],
    threshold: float | None = None,
    progress: Callable[[ImageResult], None] | None = None,
    split: str | None = None,
    options: SegmentOptions | None = None,
    poor_share: float | None = POOR_SHARE,
) -> EvaluationResult:
    """Segment every sample's whole image and score final polygons and the raw mask.

    ``predictor``: the engine's or a batched one (``dannucnet.protocols``). The image's pixel
    size is the sample's (the dataset's), else the model's. ``threshold``
    overrides the model card's (and ``options.threshold``). ``options`` are
    the segmentation options a user would pass (default: ``segment``'s
    defaults). ``progress`` is called after each image. ``poor_share``: also pool the pixel precision
    of the image's nuclei-poor crops (:mod:`dannucnet.evaluate.poor`; ``None``: not).
    """
    from dannucnet.pipeline import SegmentOptions, segment_region

    if not samples:  # the means of nothing are NaN: a table of nan, exit 0, a card record without scores
        raise InputError("no images to score: the split is empty; choose a split that lists images")
    card = predictor.card
    options = options or SegmentOptions()
    if threshold is None:
        threshold = options.threshold
    thr = float(card.threshold if threshold is None else threshold)
    options = replace(options, threshold=thr)
    result = EvaluationResult(
        model={
            "name": card.name,
            "version": card.version,
            "trained": bool(getattr(card, "trained", False)),
            "mpp": float(card.mpp),
            "device": str(getattr(predictor, "device", "")),
            "runtime": str(getattr(predictor, "runtime", "torch")),
            "precision": str(getattr(predictor, "precision", "fp32")),
            "windows": [int(side) for side in getattr(predictor, "sides", (predictor.tile,))],
            "min_area_um2": float(options.min_area_um2),
        },
        split=split,
        threshold=thr,
    )
    poor = None if poor_share is None else PoorScore(share=poor_share)
    for sample in samples:
        start = time.perf_counter()
        rgb = sample.load_image()
        truth = sample.load_labels()
        region = sample.load_region()
        ignore = None if region is None else ~region
        mpp = float(sample.mpp) if sample.mpp and math.isfinite(sample.mpp) else float(card.mpp)
        if rgb.shape[:2] != truth.shape:
            raise InputError(f"{sample.stem}: image {rgb.shape[:2]} and labels {truth.shape} differ in size")
        if region is not None and region.shape != truth.shape:  # the readers check theirs; a Sample of one's own
            raise InputError(f"{sample.stem}: region mask {region.shape} and labels {truth.shape} differ in size")

        # The raw probabilities come from the same forward pass as the polygons.
        segmented = segment_region(
            predictor, rgb, origin=(0, 0), downsample=1.0, mpp=mpp, options=options, keep_probability=True
        )
        final = polygons_to_labels([n.polygon for n in segmented.nuclei], truth.shape)
        if segmented.probability is None:  # pragma: no cover - segment_region always keeps it when asked
            raise RuntimeError("segment_region returned no probability map")
        raw = raw_instances(probability_at(split_map(segmented.probability)[0], truth.shape), thr)

        image = ImageResult(
            stem=sample.stem,
            organ=sample.organ,
            mpp=mpp,
            final=score_labels(truth, final, ignore),
            raw=score_labels(truth, raw, ignore),
            seconds=time.perf_counter() - start,
            timings={k: float(v) for k, v in segmented.timings.items()},
        )
        if poor is not None:
            crops = poor_crops_of(rgb, truth, region, mpp, sample.stem, poor.share)
            poor = score_poor_crops(predictor, crops, options, into=poor)
        result.images.append(image)
        if progress is not None:
            progress(image)
    result.nuclei_poor = None if poor is None else poor.to_dict()
    return result
