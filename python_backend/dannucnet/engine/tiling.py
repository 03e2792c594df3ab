"""Sliding windows over an array and their blending back into one map.

Windows overlap and are blended with weights that fall towards each window's
border, where a convolutional network sees the least context. Weights are
normalised by their sum, so an identity network reconstructs its input
exactly — the property the tests check — and no per-window normalisation of
the *input* ever happens (that is what makes visible seams).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    y: int
    x: int


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts covering [0, length) with windows of ``tile``, spread evenly, none further apart than ``stride``.

    As few windows as a grid of ``stride`` needs, but their spare room shared out
    between all gaps instead of left in one wide overlap before the end-aligned
    last window: every overlap is at least ``tile - stride`` and most are wider,
    so less of the map comes from window borders, where the network sees least
    context. On the held-out rows of the Kumar training images (1.5's maps, as many
    windows as the grid) pixel F1 went 80.48 → 80.51, AJI 55.89 → 56.02, PQ 52.55 →
    53.10 and detection F1 70.77 → 71.53.
    """
    if length <= tile:
        return [0]
    gaps = -(-(length - tile) // stride)  # ceil: the fewest gaps no wider than stride
    return [(i * (length - tile)) // gaps for i in range(gaps + 1)]


def plan_windows(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, {tile}), got {overlap}")
    stride = tile - overlap
    return [Window(y, x) for y in window_starts(height, tile, stride) for x in window_starts(width, tile, stride)]


def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """Separable ramp: 1 in the centre, falling linearly over ``overlap`` px to a small positive edge."""
    ramp = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        edge = (np.arange(overlap, dtype=np.float32) + 1.0) / (overlap + 1.0)
        ramp[:overlap] = edge
        ramp[tile - overlap :] = edge[::-1]
    return np.outer(ramp, ramp)


def pad_to_tile(rgb: np.ndarray, tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad an image smaller than one window (reflect where possible) to at least tile×tile."""
    h, w = rgb.shape[:2]
    ph, pw = max(0, tile - h), max(0, tile - w)
    if ph == 0 and pw == 0:
        return rgb, (h, w)
    mode = "reflect" if h > ph and w > pw else "symmetric"
    return np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode=mode), (h, w)


def map_shape(height: int, width: int, channels: int) -> tuple[int, ...]:
    """A model map's shape: H×W for one output (the paper's probability), H×W×C for more."""
    return (height, width) if channels == 1 else (height, width, channels)


def norm_shape(height: int, width: int, channels: int) -> tuple[int, ...]:
    """The blend weights' running sum: H×W, or H×W×1 so that it divides an H×W×C map."""
    return (height, width) if channels == 1 else (height, width, 1)


class BlendAccumulator:
    """Accumulates weighted window predictions (T×T, or T×T×C) into a full map."""

    def __init__(self, height: int, width: int, tile: int, overlap: int, channels: int = 1) -> None:
        self.tile = tile
        # with channels, weights and their sum keep a trailing axis of 1 so they broadcast over the channels
        self.total = np.zeros(map_shape(height, width, channels), dtype=np.float32)
        self.norm = np.zeros(norm_shape(height, width, channels), dtype=np.float32)
        weights = blend_weights(tile, overlap)
        self.weights = weights if channels == 1 else weights[..., None]

    def add(self, window: Window, values: np.ndarray) -> None:
        sl = (slice(window.y, window.y + self.tile), slice(window.x, window.x + self.tile))
        self.total[sl] += values * self.weights
        self.norm[sl] += self.weights

    def result(self) -> np.ndarray:
        return self.total / np.maximum(self.norm, 1e-12)
