"""Drop objects that are grey: no nucleus stained with haematoxylin is (issue 20).

On the nuclei-poor fields of NuInsSeg spleen, many of 1.6's false nuclei sit on a
grey, glass-like background: brown-black pigment, debris and faint texture. Nuclei
are blue to purple. So a predicted object whose pixels are, on average, nearly
colourless (CIELAB chroma C*ab below ``max_chroma``) is dropped, unless it is
almost black (L* at most ``min_lightness``). A dense nucleus in a dark scan can be
that dark and grey; the rule keeps it.

Chosen by measurement with 1.6. The thresholds were tuned on NuInsSeg `train` only:
the best pixel precision on its nuclei-poor crops, provided whole-image F1, AJI and
PQ did not fall by more than 0.3. Then they were checked once on `val`:

| NuInsSeg | poor-crop precision | F1 | AJI | PQ |
|---|---|---|---|---|
| `train`, no rule | 0.588 | 72.25 | 45.30 | 39.56 |
| `train`, C* < 14, L* > 15.7 | 0.631 | 72.68 | 45.65 | 40.22 |
| `val`, no rule | 0.584 | 74.51 | 47.71 | 42.93 |
| `val`, C* < 14, L* > 15.7 | 0.642 | 74.95 | 48.11 | 43.86 |

C* 16 cost AJI 0.41 on `train`; C* 12 gained less (0.615). The colours are the
chunk's own pixels as read, before colour normalisation: the rule asks what the
slide shows, not what the normalisation made of it. The card holds the rule
(``grey_objects``), so every door (CLI, server, QuPath) applies the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dannucnet.values import is_number

#: OpenCV's 8-bit CIELAB: L* × 255/100, a* + 128, b* + 128.
_L_SCALE = 255.0 / 100.0
_AB_OFFSET = 128.0


@dataclass(frozen=True)
class GreyRule:
    """Drop an object whose mean chroma is below ``max_chroma`` and whose mean L* is above ``min_lightness``."""

    max_chroma: float
    min_lightness: float

    @classmethod
    def from_card(cls, value: dict[str, Any] | None) -> GreyRule | None:
        if value is None:
            return None
        return cls(max_chroma=float(value["max_chroma"]), min_lightness=float(value["min_lightness"]))

    def to_dict(self) -> dict[str, float]:
        return {"max_chroma": self.max_chroma, "min_lightness": self.min_lightness}


def object_colours(labels: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean chroma C*ab, mean L*) per label 1..N of ``labels`` over the uint8 ``rgb`` pixels (index 0: 0).

    Only the labelled pixels are converted: on a synthetic 3072² chunk, 15 % nucleus, 284 → 96 ms (2 cores)."""
    import cv2  # here, not at the top: the model card validates its rule with this module

    inside = labels > 0
    ids = labels[inside].astype(np.int64)
    pixels = np.ascontiguousarray(rgb[..., :3][inside], dtype=np.uint8)[:, None, :]  # N×1×3: one column
    lab = cv2.cvtColor(pixels, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    chroma = np.hypot(lab[:, 1] - _AB_OFFSET, lab[:, 2] - _AB_OFFSET)
    n = int(labels.max(initial=0))
    count = np.maximum(np.bincount(ids, minlength=n + 1), 1)
    mean_chroma = np.bincount(ids, chroma, n + 1) / count
    mean_lightness = np.bincount(ids, lab[:, 0], n + 1) / count / _L_SCALE
    return mean_chroma, mean_lightness


def drop_grey(labels: np.ndarray, rgb: np.ndarray, rule: GreyRule | None) -> np.ndarray:
    """``labels`` without the grey objects (their pixels set to 0; the other ids unchanged)."""
    if rule is None or labels.max(initial=0) == 0:
        return labels
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} and image {rgb.shape[:2]} differ in size")
    chroma, lightness = object_colours(labels, rgb)
    grey = np.flatnonzero((chroma < rule.max_chroma) & (lightness > rule.min_lightness))
    grey = grey[grey > 0]
    if not grey.size:
        return labels
    out = labels.copy()
    out[np.isin(labels, grey)] = 0
    return out


def valid_rule(value: Any) -> bool:
    """A card's ``grey_objects``: null, or max_chroma 0..150 and min_lightness 0..100."""
    if value is None:
        return True
    if not isinstance(value, dict) or set(value) != {"max_chroma", "min_lightness"}:
        return False
    return (all(is_number(v) for v in value.values())
            and 0 <= value["max_chroma"] <= 150 and 0 <= value["min_lightness"] <= 100)
