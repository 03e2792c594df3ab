"""H&E colour deconvolution (Ruifrok & Johnston 2001).

Light absorbed by stains adds up in optical density (OD), not in RGB, so each
pixel's OD vector is a non-negative mix of one OD vector per stain. Inverting
the 3×3 stain matrix gives per-pixel stain amounts ("concentrations"). The
haematoxylin amount is a nucleus measurement; training scales and shifts the H
and E amounts for stain jitter and converts back to RGB.

OD uses ``(I + 1) / 256`` so that 0 and 255 both map to finite values and the
RGB → concentrations → RGB round trip is exact up to rounding.
"""

from __future__ import annotations

import numpy as np

from dannucnet.errors import InputError

__all__ = [
    "HE_STAINS",
    "stain_matrix",
    "rgb_to_od",
    "od_to_rgb",
    "rgb_to_hed",
    "hed_to_rgb",
    "hematoxylin_od",
]

#: Ruifrok & Johnston's H&E optical density vectors (rows: haematoxylin, eosin), RGB order.
HE_STAINS = np.array(
    [
        [0.644211, 0.716556, 0.266844],
        [0.092789, 0.954111, 0.283111],
    ],
    dtype=np.float64,
)


_OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def stain_matrix(stains: np.ndarray | None = None) -> np.ndarray:
    """3×3 matrix of unit OD vectors: the given stains, completed by their normalised cross product.

    The third row ("residual") absorbs whatever the two stains cannot explain, so
    the matrix is invertible and the round trip is lossless.
    """
    s = HE_STAINS if stains is None else np.asarray(stains, dtype=np.float64)
    if s.shape not in ((2, 3), (3, 3)):
        raise InputError(f"stain vectors must be a 2×3 or 3×3 array (rows = stains, RGB columns), got {s.shape}")
    norms = np.linalg.norm(s, axis=1)
    if not np.all(np.isfinite(s)) or np.any(norms < 1e-9):
        raise InputError("stain vectors must be finite and non-zero")
    rows = [v / n for v, n in zip(s[:2], norms[:2])]
    third = s[2] if s.shape[0] == 3 else np.cross(rows[0], rows[1])
    if np.linalg.norm(third) < 1e-6:
        raise InputError("stain vectors are (nearly) parallel; give two clearly different stain colours")
    rows.append(third / np.linalg.norm(third))
    m = np.stack(rows)
    if abs(np.linalg.det(m)) < 1e-6:
        raise InputError("stain vectors are (nearly) parallel; give two clearly different stain colours")
    return m


def _rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise InputError(f"expected RGB pixels (…×3), got shape {rgb.shape}")
    return rgb


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB → float32 optical density ``-log10((I + 1) / 256)`` (0 for white, ≈2.41 for black)."""
    rgb = _rgb(rgb)
    if rgb.dtype == np.uint8:
        return _OD_LUT[rgb]  # a table lookup: 256 logs instead of one per pixel
    return (-np.log10((rgb.astype(np.float32) + 1.0) / 256.0)).astype(np.float32)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Optical density → uint8 RGB (inverse of :func:`rgb_to_od`, clipped to 0–255)."""
    od = np.asarray(od, dtype=np.float32)
    rgb = 256.0 * np.power(np.float32(10.0), -od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def rgb_to_hed(rgb: np.ndarray, stains: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB (…×3) → float32 stain amounts (…×3): haematoxylin, eosin, residual."""
    inv = np.linalg.inv(stain_matrix(stains)).astype(np.float32)
    return rgb_to_od(rgb) @ inv


def hed_to_rgb(conc: np.ndarray, stains: np.ndarray | None = None) -> np.ndarray:
    """Stain amounts (…×3) → uint8 RGB; inverse of :func:`rgb_to_hed`."""
    conc = np.asarray(conc, dtype=np.float32)
    if conc.shape[-1] != 3:
        raise InputError(f"expected stain amounts (…×3), got shape {conc.shape}")
    return od_to_rgb(conc @ stain_matrix(stains).astype(np.float32))


def hematoxylin_od(rgb: np.ndarray, stains: np.ndarray | None = None) -> np.ndarray:
    """Haematoxylin amount per pixel (float32, same leading shape as ``rgb``), in OD units."""
    inv = np.linalg.inv(stain_matrix(stains)).astype(np.float32)
    return rgb_to_od(rgb) @ inv[:, 0]
