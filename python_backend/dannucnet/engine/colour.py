"""Colour normalisation (Reinhard, in CIE L*a*b*) so stain and brightness match the training set.

Why: a CPU-trained network learns "dark purple = nucleus". Frozen sections and
other labs' slides are much darker or paler than the training images (the
Kumar-test colon and bladder frames have L* ≈ 90–130 against ≈ 143 for the
training set) and were called nucleus almost everywhere. Matching each image's
L*a*b* mean and spread to the training set's — the same transform at training
and at inference — removes most of that shift for the cost of one colour
conversion per chunk.

Statistics come from tissue pixels only (glass would make every slide look
pale), and from the whole chunk, not from each 256 px window, so neighbouring
windows see the same transform and blend without seams.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from dannucnet.values import finite_float

__all__ = ["ColourReference", "colour_transform", "dark_share", "lab_stats", "normalise_colour", "reference_from"]

#: Pixels brighter than this in every channel are glass, not tissue.
GLASS_LEVEL = 215
#: Fewer tissue pixels than this share of the image: statistics are unreliable, pixels pass unchanged.
MIN_TISSUE_SHARE = 0.05
#: Per-channel spread ratios are clipped to this range so a near-uniform chunk is not blown up
#: (the 1.x cards' clamp, still what a card without ``max_scale`` gets).
MAX_SPREAD_RATIO = 2.0
#: The clamps new references get (issue 20, benchmarks/bench_colour.py, shipped 1.6 weights):
#: spread ×0.8–1.25 instead of ×0.5–2 cut invented nuclei on eosin-only stroma from 3586 to 76 per mm²
#: and raised pixel precision on nuclei-poor NuInsSeg crops 0.449 → 0.587, whole NuInsSeg/GBM40 F1
#: 0.733/0.884 → 0.730/0.884; the 1 % dark-pixel gate takes the stroma to 0 and changes nothing else.
CHOSEN_MAX_SCALE = 1.25
CHOSEN_MIN_DARK_SHARE = 0.01


@dataclass(frozen=True)
class ColourReference:
    """Target L*a*b* mean and standard deviation (OpenCV's 8-bit L*a*b* scale), and the guards.

    ``max_scale``: per-channel spread ratios are clipped to [1/max_scale, max_scale].
    ``max_shift``: the chunk's mean moves at most this far (8-bit L*a*b* units) per channel
    (None: all the way to the reference mean). ``min_dark_share``: below this share of
    haematoxylin-dark tissue pixels (see :func:`dark_share`) a chunk passes unchanged, since
    its statistics describe stroma or fat, not a stain (0: never). Defaults = the 1.x behaviour.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    method: str = "reinhard-lab"
    max_scale: float = MAX_SPREAD_RATIO
    max_shift: float | None = None
    min_dark_share: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "mean": [round(v, 4) for v in self.mean],
                               "std": [round(v, 4) for v in self.std], "max_scale": self.max_scale}
        if self.max_shift is not None:
            out["max_shift"] = self.max_shift
        if self.min_dark_share:
            out["min_dark_share"] = self.min_dark_share
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ColourReference | None:
        """The card's ``colour_reference`` (None: pixels go in unchanged), checked: every value a finite
        number on OpenCV's 8-bit L*a*b* scale. An infinite mean made every chunk black (0 nuclei) and a
        NaN spread passed chunks unnormalised, both silently."""
        if data is None:
            return None
        if not isinstance(data, dict) or not data:
            raise ValueError(f"a colour reference is an object with method, mean and std (null for none), not {data!r}")
        if data.get("method") != "reinhard-lab":
            raise ValueError(f"unknown colour normalisation {data.get('method')!r} (known: 'reinhard-lab')")
        try:
            mean, std = tuple(_number(v) for v in data["mean"]), tuple(_number(v) for v in data["std"])
            max_scale = _number(data.get("max_scale", MAX_SPREAD_RATIO))
            max_shift = None if data.get("max_shift") is None else _number(data["max_shift"])
            min_dark = _number(data.get("min_dark_share", 0.0))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"colour reference needs finite numbers for mean, std and clamps, got {data}") from None
        on_scale = all(0 <= v <= 255 for v in mean) and all(0 < v <= 255 for v in std)
        if len(mean) != 3 or len(std) != 3 or not on_scale:
            raise ValueError(f"colour reference needs 3 means from 0 to 255, 3 positive spreads up to 255, got {data}")
        if not max_scale >= 1 or (max_shift is not None and not max_shift >= 0) or not 0 <= min_dark < 1:
            raise ValueError(
                f"colour reference needs max_scale >= 1, max_shift >= 0, 0 <= min_dark_share < 1, got {data}"
            )
        return cls(mean=mean, std=std, max_scale=max_scale,  # type: ignore[arg-type]
                   max_shift=max_shift, min_dark_share=min_dark)


def _number(value: Any) -> float:
    """A finite JSON number (not a bool or a string) as a float; ValueError otherwise."""
    number = finite_float(value)
    if number is None:
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _tissue(rgb: np.ndarray) -> np.ndarray:
    return (rgb < GLASS_LEVEL).any(axis=2) & (rgb > 0).any(axis=2)


def _lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)


def _stats(lab: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, spread and share of the ``keep`` pixels: OpenCV's masked mean and standard deviation,
    which gather nothing. Copying the tissue pixels out to float64 first took 0.8-3 s per
    2176² chunk here (the largest cost beside the network on a 20× slide), this 0.01 s; the
    spreads agree to 1e-7."""
    count = int(np.count_nonzero(keep))
    if count == 0:
        return np.zeros(3), np.ones(3), 0.0
    mean, std = cv2.meanStdDev(np.ascontiguousarray(lab), mask=np.ascontiguousarray(keep).view(np.uint8))
    return mean.ravel(), std.ravel() + 1e-6, count / keep.size


def _dark_share(lab: np.ndarray, keep: np.ndarray, reference: ColourReference) -> float:
    count = int(np.count_nonzero(keep))
    if count == 0:
        return 0.0
    return int(np.count_nonzero(keep & (lab[..., 0] < reference.mean[0] - reference.std[0]))) / count


def lab_stats(rgb: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean and std of L*a*b* over tissue pixels (and ``mask``), and the tissue share."""
    keep = _tissue(rgb)
    if mask is not None:
        keep &= mask.astype(bool)
    return _stats(_lab(rgb), keep)


def reference_from(stats: Iterable[tuple[np.ndarray, np.ndarray]]) -> ColourReference:
    """The training set's reference: the average of its images' means and spreads, with the chosen clamps."""
    items = list(stats)
    if not items:
        raise ValueError("no images to build a colour reference from")
    mean = np.mean([m for m, _ in items], axis=0)
    std = np.mean([s for _, s in items], axis=0)
    return ColourReference(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),  # type: ignore[arg-type]
                           max_scale=CHOSEN_MAX_SCALE, min_dark_share=CHOSEN_MIN_DARK_SHARE)


def dark_share(rgb: np.ndarray, reference: ColourReference) -> float:
    """Share of tissue pixels darker than the reference's mean L* minus one spread (≈ L* 101 of 255
    for 1.6's reference): haematoxylin-dark, nucleus-like pixels. 0 for an image without tissue."""
    keep = _tissue(rgb)
    return _dark_share(_lab(rgb), keep, reference) if keep.any() else 0.0


def colour_transform(
    mean: np.ndarray, std: np.ndarray, reference: ColourReference
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) with ``lab * scale + shift``, within the reference's clamps."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scale = np.clip(np.asarray(reference.std) / std, 1 / reference.max_scale, reference.max_scale)
    target = np.asarray(reference.mean, np.float64)
    if reference.max_shift is not None:
        target = mean + np.clip(target - mean, -reference.max_shift, reference.max_shift)
    return scale, target - mean * scale


def normalise_colour(
    rgb: np.ndarray, reference: ColourReference | None, stats: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """Map ``rgb``'s tissue colours onto ``reference`` (uint8 in, uint8 out; glass stays glass).

    ``stats`` = (mean, std) computed elsewhere (e.g. over a whole training image); by default
    they are taken from ``rgb`` itself. Images with almost no tissue, or (``min_dark_share``)
    almost no haematoxylin-dark tissue, pass unchanged.
    """
    if reference is None or rgb.size == 0:
        return rgb
    keep, lab8 = _tissue(rgb), _lab(rgb)  # once per chunk: statistics, the dark gate and the transform share them
    if stats is None:
        mean, std, share = _stats(lab8, keep)
        if share < MIN_TISSUE_SHARE:
            return rgb
        if reference.min_dark_share and _dark_share(lab8, keep, reference) < reference.min_dark_share:
            return rgb
    else:
        mean, std = np.asarray(stats[0], np.float64), np.asarray(stats[1], np.float64)
    scale, shift = colour_transform(mean, std, reference)
    # the transform is per channel on 8-bit values: a 256-entry table per channel gives the very bytes
    # ``clip(lab * scale + shift + 0.5)`` gives, at a third of the time (0.3 → 0.1 s per 2176² chunk)
    levels = np.arange(256, dtype=np.float32)[:, None] * scale.astype(np.float32) + shift.astype(np.float32)
    table = np.clip(levels + 0.5, 0, 255).astype(np.uint8).reshape(256, 1, 3)
    out = cv2.cvtColor(cv2.LUT(lab8, table), cv2.COLOR_LAB2RGB)
    glass = ~keep
    out[glass] = rgb[glass]
    return out
