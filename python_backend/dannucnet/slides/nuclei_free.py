"""Nuclei-free H&E-like fields (fat, loose stroma): eosin only, for "nothing here" checks.

Rendered by Beer–Lambert with the eosin vector alone (no haematoxylin at all),
so any nucleus a model finds in them is invented. Fat: empty adipocytes
(≈ 50–100 µm across, glass-white) divided by thin pink septa; stroma: pale,
wavy pink fibres on a faint pink ground. These are the fields where per-chunk
Reinhard normalisation, matching a faint chunk's spread to the training set's,
turns eosin into something nucleus-dark (issue 20).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dannucnet.slides.synthetic import _E_VEC  # the same eosin colour as the synthetic H&E

__all__ = ["make_fat_like", "make_stroma_like"]


def _render(eosin_od: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    od = eosin_od[..., None] * _E_VEC / np.linalg.norm(_E_VEC)
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 2.0, od.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def make_fat_like(size: int, seed: int = 0, mpp: float = 0.25) -> np.ndarray:
    """Adipocytes ≈ 75 µm across (Voronoi cells) with ≈ 2 µm pink septa, no nuclei."""
    rng = np.random.default_rng(seed)
    cell_px = 75.0 / mpp
    n = max(4, int(size * size / cell_px**2 * 1.3))
    seeds = rng.uniform(-cell_px / 2, size + cell_px / 2, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d = np.sort(np.stack([np.hypot(xx - sx, yy - sy) for sx, sy in seeds]), axis=0)
    septum = np.exp(-(((d[1] - d[0]) / 2) / (2.0 / mpp)) ** 2)
    od = 0.04 + 0.8 * septum * rng.uniform(0.7, 1.1)
    return _render(ndimage.gaussian_filter(od, 1.0), rng)


def make_stroma_like(size: int, seed: int = 0, mpp: float = 0.25) -> np.ndarray:
    """Loose connective tissue: wavy collagen fibres (eosin) on a faint pink ground, no nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    od = np.full((size, size), 0.25, np.float32)
    for _ in range(max(6, size // 24)):
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(-size, size)
        along = xx * np.cos(angle) + yy * np.sin(angle)
        across = -xx * np.sin(angle) + yy * np.cos(angle) - offset
        across += 6.0 / mpp * np.sin(along / (20.0 / mpp) + phase)
        od += rng.uniform(0.3, 0.6) * np.exp(-(across / (1.5 / mpp)) ** 2)
    return _render(ndimage.gaussian_filter(od, 1.5), rng)
