"""Resampling to the model's pixel size: done once, here, never elsewhere."""

from __future__ import annotations

import cv2
import numpy as np

# Pixel sizes within 1 % are treated as equal: resampling by 1 % changes
# nothing a pathologist can see but costs a full pass over the pixels.
TOLERANCE = 0.01


def scale_to_model(region_mpp: float, model_mpp: float) -> float:
    """Factor that brings pixels of ``region_mpp`` to ``model_mpp`` (>1 enlarges)."""
    scale = region_mpp / model_mpp
    return 1.0 if abs(scale - 1.0) <= TOLERANCE else scale


def resample_rgb(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interpolation)
