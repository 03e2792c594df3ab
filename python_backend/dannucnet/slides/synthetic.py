"""Synthetic H&E images with known nuclei, and a pyramidal TIFF writer.

Why synthetic: tests and benchmarks need slides of any size whose every
nucleus is known, without shipping patient data. The images are built in
optical-density space (Beer–Lambert: ``I = I0·exp(-(c_H·h + c_E·e))``) so that
stain deconvolution, tissue detection and colour augmentation behave as on real
H&E: purple haematoxylin nuclei with chromatin texture and darker rims on pink
eosin stroma with fibres, white glass where there is no tissue.

Everything is a deterministic function of global pixel coordinates and the
seed (hashed lattice noise, nuclei placed per 256-px cell), so a slide can be
rendered tile by tile — any tile, any order — and always gives the same pixels.
That is what lets :func:`write_synthetic_slide` stream 8192²+ slides with
memory bounded by a strip, not by the image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from dannucnet.atomic import atomic_path
from dannucnet.errors import InputError, OutputError

RENDER_TILE = 512  # internal render grid; per-tile noise is keyed to this grid
_CELL = 256  # nucleus placement cell (px)

#: Most nuclei per mm² a synthetic slide may hold: nuclei of ~30 µm² packed edge to edge are ~33,000 per mm²
#: (lymphoid tissue, the densest H&E, has 10,000-20,000).
MAX_DENSITY = 50_000.0
#: Largest side of a synthetic slide: the largest real whole slides are about 150,000 px a side at 40×.
MAX_SIDE = 200_000

# Ruifrok & Johnston optical-density directions (R, G, B)
_H_VEC = np.array([0.650, 0.704, 0.286])
_E_VEC = np.array([0.072, 0.990, 0.105])


# ---------------------------------------------------------------------------
# deterministic noise
# ---------------------------------------------------------------------------


def _mix(key: int, *parts: int) -> int:
    """A 64-bit hash of integers (splitmix64 chain), for per-field/per-cell keys."""
    h = key & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


def _hash01(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Uniform [0, 1) value per integer lattice point."""
    with np.errstate(over="ignore"):
        h = ix.astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= iy.astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= np.uint64(key)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _interp_1d(x0: int, n: int, lattice: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Lattice index (relative), smoothstep weight, first index and count for pixel centres x0..x0+n-1."""
    u = (np.arange(x0, x0 + n, dtype=np.float64) + 0.5) / lattice
    i = np.floor(u).astype(np.int64)
    t = u - i
    s = (t * t * (3.0 - 2.0 * t)).astype(np.float32)
    i_min = int(i[0])
    return i - i_min, s, i_min, int(i[-1]) - i_min + 2


def noise_tile(x0: int, y0: int, w: int, h: int, lattice: float, key: int) -> np.ndarray:
    """Value noise in [0, 1] on pixel centres of a tile, float32 (h, w).

    Separable smoothstep interpolation of hashed lattice values: the same
    function as :func:`noise_points`, so tiles agree wherever they are cut.
    """
    jx, sx, ix0, mx = _interp_1d(x0, w, lattice)
    jy, sy, iy0, my = _interp_1d(y0, h, lattice)
    gy, gx = np.meshgrid(np.arange(iy0, iy0 + my), np.arange(ix0, ix0 + mx), indexing="ij")
    v = _hash01(gx, gy, key).astype(np.float32)
    vx = v[:, jx] * (1.0 - sx) + v[:, jx + 1] * sx  # (my, w)
    return vx[jy] * (1.0 - sy)[:, None] + vx[jy + 1] * sy[:, None]


def noise_points(x: np.ndarray, y: np.ndarray, lattice: float, key: int) -> np.ndarray:
    """The same value noise evaluated at pixel centres (x, y) (integer pixel indices)."""
    ux = (np.asarray(x, dtype=np.float64) + 0.5) / lattice
    uy = (np.asarray(y, dtype=np.float64) + 0.5) / lattice
    ix, iy = np.floor(ux).astype(np.int64), np.floor(uy).astype(np.int64)
    tx, ty = ux - ix, uy - iy
    sx, sy = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
    v00 = _hash01(ix, iy, key)
    v10 = _hash01(ix + 1, iy, key)
    v01 = _hash01(ix, iy + 1, key)
    v11 = _hash01(ix + 1, iy + 1, key)
    return (v00 * (1 - sx) + v10 * sx) * (1 - sy) + (v01 * (1 - sx) + v11 * sx) * sy


# ---------------------------------------------------------------------------
# the scene: stains, tissue field, nucleus table
# ---------------------------------------------------------------------------


@dataclass
class NucleusTable:
    """Every nucleus of a synthetic image (pixel units); label value = ``ids``."""

    ids: np.ndarray  # int32, 1..N, also the draw order (later wins overlaps)
    cx: np.ndarray  # centre x (px, continuous)
    cy: np.ndarray
    a: np.ndarray  # semi-axes (px)
    b: np.ndarray
    theta: np.ndarray  # rotation (rad)
    harm_amp: np.ndarray  # (N, 3) boundary irregularity, harmonics 2..4
    harm_phase: np.ndarray  # (N, 3)
    darkness: np.ndarray  # haematoxylin load
    touching: np.ndarray  # bool: placed to touch a partner

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def radius_max(self) -> np.ndarray:
        return self.a * (1.0 + self.harm_amp.sum(axis=1)) + 1.0


class _Scene:
    """All parameters of one synthetic image; renders any tile on demand."""

    def __init__(
        self,
        width: int,
        height: int,
        seed: int,
        mpp: float,
        density: float,
        tissue_fraction: float,
    ) -> None:
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):  # 10**8 px ran on for ever, to fill the disk
            raise InputError(f"synthetic image size must be 1 to {MAX_SIDE:,} px a side, got {width}x{height}")
        if not (0.05 <= mpp <= 10):
            raise InputError(f"synthetic --mpp must be within 0.05–10 µm/px, got {mpp}")
        if not (0.0 <= tissue_fraction <= 1.0):
            raise InputError(f"tissue fraction must be within 0–1, got {tissue_fraction}")
        if not 0 <= density <= MAX_DENSITY:  # NaN and inf were numpy tracebacks, 1e9 an 18 GB pair search
            raise InputError(f"nucleus density must be 0 to {MAX_DENSITY:,.0f} per mm², got {density}")
        if not 0 <= seed < 2**32:
            raise InputError(f"seed must be 0 to {2**32 - 1}, got {seed}")
        self.width, self.height = int(width), int(height)
        self.seed, self.mpp = int(seed), float(mpp)
        self.density, self.tissue_fraction = float(density), float(tissue_fraction)
        self.key = _mix(0x5EED, self.seed)
        rng = np.random.default_rng([self.seed, 1])
        # per-image stain variation: vector tilt and concentration scale
        self.h_vec = self._tilt(_H_VEC, rng, 0.05)
        self.e_vec = self._tilt(_E_VEC, rng, 0.05)
        self.h_scale = float(rng.uniform(0.85, 1.2))
        self.e_scale = float(rng.uniform(0.75, 1.25))
        self.i0 = rng.uniform(238, 250) + rng.uniform(-3, 3, size=3)
        self.fibre_period = float(rng.uniform(3.0, 5.0)) / self.mpp  # µm → px
        a0 = float(rng.uniform(0, math.pi))
        self.fibre_angles = (a0, a0 + 1.1, a0 + 2.2)
        # tissue blobs: value noise with a lattice ~ 1/2.5 of the short side
        self.tissue_lattice = max(64.0, min(self.width, self.height) / 2.5)
        self.tissue_threshold = self._tissue_threshold()
        self.nuclei = self._place_nuclei()
        self._bucket_index()

    @staticmethod
    def _tilt(vec: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
        v = np.clip(vec + rng.normal(0, amount, 3), 0.02, None)
        return v / np.linalg.norm(v)

    # -- tissue ----------------------------------------------------------
    def _tissue_raw_points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        lattice = self.tissue_lattice
        k1, k2 = _mix(self.key, 11), _mix(self.key, 12)
        return 0.8 * noise_points(x, y, lattice, k1) + 0.2 * noise_points(x, y, lattice / 4, k2)

    def _tissue_raw_tile(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        lattice = self.tissue_lattice
        k1, k2 = _mix(self.key, 11), _mix(self.key, 12)
        return 0.8 * noise_tile(x0, y0, w, h, lattice, k1) + 0.2 * noise_tile(x0, y0, w, h, lattice / 4, k2)

    def _tissue_threshold(self) -> float:
        if self.tissue_fraction >= 1.0:
            return -np.inf
        if self.tissue_fraction <= 0.0:
            return np.inf
        step = max(4, int(min(self.width, self.height) // 256))
        ys, xs = np.mgrid[0 : self.height : step, 0 : self.width : step]
        raw = self._tissue_raw_points(xs.ravel(), ys.ravel())
        return float(np.quantile(raw, 1.0 - self.tissue_fraction))

    def tissue_alpha_tile(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Tissue opacity 0..1 per pixel (soft edge a few px wide)."""
        if self.tissue_fraction >= 1.0:
            return np.ones((h, w), np.float32)
        if self.tissue_fraction <= 0.0:
            return np.zeros((h, w), np.float32)
        raw = self._tissue_raw_tile(x0, y0, w, h)
        edge = 0.004 * 256.0 / self.tissue_lattice * 4  # ~3–4 px soft edge
        return np.clip((raw - self.tissue_threshold) / edge + 0.5, 0.0, 1.0)

    # -- nuclei ----------------------------------------------------------
    def _place_nuclei(self) -> NucleusTable:
        """Candidates per cell (seeded by cell), then hard-core thinning (Matérn II)."""
        from scipy.spatial import cKDTree

        um = 1.0 / self.mpp
        cell_mm2 = (_CELL * self.mpp / 1000.0) ** 2
        ncx, ncy = math.ceil(self.width / _CELL), math.ceil(self.height / _CELL)
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("cx", "cy", "d", "q", "theta", "mark", "pair")}
        pair_counter = 0
        cluster_key = _mix(self.key, 21)
        # oversample: hard-core thinning removes ~20 % of candidates
        base = self.density * cell_mm2 * 1.25
        for gy in range(ncy):
            for gx in range(ncx):
                rng = np.random.default_rng([self.seed, 2, gx, gy])
                cc = noise_points(np.array([gx * _CELL + _CELL // 2]), np.array([gy * _CELL + _CELL // 2]),
                                  400.0 * um, cluster_key)[0]
                n = rng.poisson(base * (0.35 + 1.3 * cc))
                cx = gx * _CELL + rng.uniform(0, _CELL, n)
                cy = gy * _CELL + rng.uniform(0, _CELL, n)
                elongated = rng.random(n) < 0.15
                d = np.where(elongated, rng.uniform(5.2, 8.0, n),
                             np.clip(rng.lognormal(math.log(7.6), 0.2, n), 5.2, 11.5))
                q = np.where(elongated, rng.uniform(2.0, 3.0, n), 1.0 + np.abs(rng.normal(0, 0.3, n)))
                q = np.minimum(q, 3.0)
                theta = rng.uniform(0, math.pi, n)
                mark = rng.random(n)
                pair = np.zeros(n, np.int64)
                # touching pairs: a partner placed just touching its candidate
                partners = np.nonzero((rng.random(n) < 0.10) & ~elongated)[0]
                if partners.size:
                    pd = np.clip(rng.lognormal(math.log(7.2), 0.15, partners.size), 5.2, 10.5)
                    ang = rng.uniform(0, 2 * math.pi, partners.size)
                    dist = 0.47 * (d[partners] + pd) * um
                    px = cx[partners] + dist * np.cos(ang)
                    py = cy[partners] + dist * np.sin(ang)
                    ids = pair_counter + 1 + np.arange(partners.size)
                    pair_counter += partners.size
                    pair[partners] = ids
                    cx = np.concatenate([cx, px])
                    cy = np.concatenate([cy, py])
                    d = np.concatenate([d, pd])
                    q = np.concatenate([q, 1.0 + np.abs(rng.normal(0, 0.2, partners.size))])
                    theta = np.concatenate([theta, ang + rng.normal(0, 0.3, partners.size)])
                    mark = np.concatenate([mark, mark[partners] + 1e-9])
                    pair = np.concatenate([pair, ids])
                named = (("cx", cx), ("cy", cy), ("d", d), ("q", q), ("theta", theta), ("mark", mark), ("pair", pair))
                for k, v in named:
                    cols[k].append(v)
        c = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
        inside = (c["cx"] >= 0) & (c["cx"] < self.width) & (c["cy"] >= 0) & (c["cy"] < self.height)
        if self.tissue_fraction < 1.0 and inside.any():
            t = self._tissue_raw_points(np.floor(c["cx"]), np.floor(c["cy"]))
            inside &= t > self.tissue_threshold + 0.01
        c = {k: v[inside] for k, v in c.items()}
        n = c["cx"].size
        keep = np.ones(n, bool)
        if n > 1:
            r_eq = 0.5 * c["d"] * um
            tree = cKDTree(np.column_stack([c["cx"], c["cy"]]))
            pairs = tree.query_pairs(r=float(2 * r_eq.max() * 1.05), output_type="ndarray")
            if pairs.size:
                i, j = pairs[:, 0], pairs[:, 1]
                dist = np.hypot(c["cx"][i] - c["cx"][j], c["cy"][i] - c["cy"][j])
                same_pair = (c["pair"][i] > 0) & (c["pair"][i] == c["pair"][j])
                conflict = (dist < 1.02 * (r_eq[i] + r_eq[j])) & ~same_pair
                i, j = i[conflict], j[conflict]
                loser = np.where(c["mark"][i] > c["mark"][j], i, j)
                keep[loser] = False
        c = {k: v[keep] for k, v in c.items()}
        n = c["cx"].size
        rng = np.random.default_rng([self.seed, 3])
        # per-nucleus look; drawn from one stream in table order (deterministic)
        r_eq = 0.5 * c["d"] * um
        a = r_eq * np.sqrt(c["q"])
        b = r_eq / np.sqrt(c["q"])
        paired = c["pair"] > 0
        if paired.any():  # a pair is touching only if both partners survived
            vals, counts = np.unique(c["pair"][paired], return_counts=True)
            whole = set(vals[counts == 2].tolist())
            paired = np.array([p in whole for p in c["pair"]], bool) if n else paired
        return NucleusTable(
            ids=np.arange(1, n + 1, dtype=np.int32),
            cx=c["cx"],
            cy=c["cy"],
            a=a,
            b=b,
            theta=c["theta"],
            harm_amp=rng.uniform(0.0, 0.06, (n, 3)) / np.array([1.0, 1.4, 1.8]),
            harm_phase=rng.uniform(0, 2 * math.pi, (n, 3)),
            darkness=rng.uniform(0.8, 1.3, n),
            touching=paired,
        )

    def _bucket_index(self) -> None:
        """Nuclei sorted by render-tile row so a strip finds its nuclei quickly."""
        nt = self.nuclei
        self._rmax = nt.radius_max
        self._order = np.argsort(nt.cy, kind="stable")
        self._cy_sorted = nt.cy[self._order]
        self._pad = float(self._rmax.max()) if len(nt) else 0.0

    def _nuclei_in(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Indices (in draw order) of nuclei whose box may touch the tile."""
        nt = self.nuclei
        if len(nt) == 0:
            return np.zeros(0, np.int64)
        lo = np.searchsorted(self._cy_sorted, y0 - self._pad)
        hi = np.searchsorted(self._cy_sorted, y0 + h + self._pad)
        idx = self._order[lo:hi]
        r = self._rmax[idx]
        sel = (
            (nt.cx[idx] + r >= x0) & (nt.cx[idx] - r < x0 + w) & (nt.cy[idx] + r >= y0) & (nt.cy[idx] - r < y0 + h)
        )
        return np.sort(idx[sel])

    # -- rendering -------------------------------------------------------
    def _nucleus_geometry(self, k: int, x0: int, y0: int, w: int, h: int):
        """(slice_y, slice_x, rho, inside) for nucleus k within a tile, or None."""
        nt = self.nuclei
        r = self._rmax[k]
        bx0 = max(x0, int(math.floor(nt.cx[k] - r)))
        bx1 = min(x0 + w, int(math.ceil(nt.cx[k] + r)) + 1)
        by0 = max(y0, int(math.floor(nt.cy[k] - r)))
        by1 = min(y0 + h, int(math.ceil(nt.cy[k] + r)) + 1)
        if bx1 <= bx0 or by1 <= by0:
            return None
        dx = (np.arange(bx0, bx1, dtype=np.float64) + 0.5 - nt.cx[k])[None, :]
        dy = (np.arange(by0, by1, dtype=np.float64) + 0.5 - nt.cy[k])[:, None]
        ct, st = math.cos(nt.theta[k]), math.sin(nt.theta[k])
        u = dx * ct + dy * st
        v = -dx * st + dy * ct
        phi = np.arctan2(v, u)
        ell = np.sqrt((u / nt.a[k]) ** 2 + (v / nt.b[k]) ** 2)
        wobble = 1.0
        for m in range(3):
            wobble = wobble + nt.harm_amp[k, m] * np.cos((m + 2) * phi + nt.harm_phase[k, m])
        rho = ell / wobble  # < 1 inside
        sl = (slice(by0 - y0, by1 - y0), slice(bx0 - x0, bx1 - x0))
        return sl, rho

    def render_labels(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Ground-truth labels (int32, 0 = background) of one tile; later nuclei win overlaps."""
        labels = np.zeros((h, w), np.int32)
        for k in self._nuclei_in(x0, y0, w, h):
            g = self._nucleus_geometry(int(k), x0, y0, w, h)
            if g is None:
                continue
            sl, rho = g
            view = labels[sl]
            view[rho <= 1.0] = self.nuclei.ids[k]
        return labels

    def _stroma(self, x0: int, y0: int, w: int, h: int, lattice_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Eosin and haematoxylin concentrations of stroma on a (possibly half-resolution) grid."""
        key = self.key
        um = lattice_scale / self.mpp  # one µm in grid pixels
        xs = np.arange(x0, x0 + w, dtype=np.float64)
        ys = np.arange(y0, y0 + h, dtype=np.float64)
        warp = noise_tile(x0, y0, w, h, 10.0 * um, _mix(key, 31)) * 14.0
        warp += noise_tile(x0, y0, w, h, 3.0 * um, _mix(key, 35)) * 3.0
        fib = np.zeros((h, w), np.float32)
        wsum = np.zeros((h, w), np.float32)
        k = 2 * math.pi / (self.fibre_period * lattice_scale)
        for d, ang in enumerate(self.fibre_angles):
            wd = noise_tile(x0, y0, w, h, 90.0 * um, _mix(key, 40 + d)) ** 4
            # phase = k·(x cos + y sin), reduced mod 2π in float64 per axis, summed in float32
            px = np.mod(xs * (k * math.cos(ang)), 2 * math.pi).astype(np.float32)
            py = np.mod(ys * (k * math.sin(ang)), 2 * math.pi).astype(np.float32)
            wave = 0.5 + 0.5 * np.sin(py[:, None] + px[None, :] + warp)
            fib += wd * wave * wave
            wsum += wd
        fib /= wsum + 1e-6
        n_mid = noise_tile(x0, y0, w, h, 4.0 * um, _mix(key, 32))
        n_patch = noise_tile(x0, y0, w, h, 25.0 * um, _mix(key, 33))
        c_e = self.e_scale * 0.45 * (0.45 + 0.75 * fib + 0.3 * n_mid) * (0.55 + 0.7 * n_patch)
        c_h = self.h_scale * (0.05 + 0.08 * noise_tile(x0, y0, w, h, 8.0 * um, _mix(key, 34)))
        return c_e, c_h

    def render(self, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 and labels int32 for a tile of the render grid.

        Stroma is smooth at the pixel scale, so it is computed at half
        resolution and upsampled (4× less work); nuclei are drawn at full
        resolution. Tiles start on even coordinates, so this stays seamless.
        """
        key = self.key
        tissue = self.tissue_alpha_tile(x0, y0, w, h)
        hw, hh = (w + 1) // 2, (h + 1) // 2
        c_e_half, c_h_half = self._stroma(x0 // 2, y0 // 2, hw, hh, 0.5)
        c_e = cv2.resize(c_e_half, (w, h), interpolation=cv2.INTER_LINEAR) * tissue
        c_h = cv2.resize(c_h_half, (w, h), interpolation=cv2.INTER_LINEAR) * tissue
        labels = np.zeros((h, w), np.int32)
        idx = self._nuclei_in(x0, y0, w, h)
        if idx.size:
            chrom1 = noise_tile(x0, y0, w, h, 0.8 / self.mpp, _mix(key, 51))
            chrom2 = noise_tile(x0, y0, w, h, 0.4 / self.mpp, _mix(key, 52))
            nt = self.nuclei
            for k in idx:
                g = self._nucleus_geometry(int(k), x0, y0, w, h)
                if g is None:
                    continue
                sl, rho = g
                # soft edge ~1 px: alpha from the distance to the boundary in px
                r_px = 0.5 * (nt.a[k] + nt.b[k])
                alpha = np.clip((1.0 - rho) * r_px + 0.5, 0.0, 1.0).astype(np.float32)
                if not alpha.any():
                    continue
                texture = 0.55 * chrom1[sl] + 0.45 * chrom2[sl]
                rim = np.clip((rho - 0.72) / 0.2, 0.0, 1.0)
                nuc_h = self.h_scale * 1.55 * nt.darkness[k] * (0.6 + 0.75 * texture) * (1.0 + 0.45 * rim)
                nuc_e = self.e_scale * 0.12
                c_h[sl] = c_h[sl] * (1 - alpha) + nuc_h * alpha
                c_e[sl] = c_e[sl] * (1 - alpha) + nuc_e * alpha
                labels[sl][rho <= 1.0] = nt.ids[k]
        od = c_h[..., None] * self.h_vec.astype(np.float32) + c_e[..., None] * self.e_vec.astype(np.float32)
        rgb = self.i0.astype(np.float32) * np.exp(-od)
        # mild sensor noise, seeded by render-tile position
        rng = np.random.default_rng([self.seed, 4, x0, y0])
        noise = rng.standard_normal((h, w, 1), dtype=np.float32)
        noise *= 2.0
        noise += 0.5  # rounding offset for the uint8 cast
        rgb += noise
        np.clip(rgb, 0, 255, out=rgb)
        return rgb.astype(np.uint8), labels

    def strip(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows y0..y1 of the whole image, rendered tile by tile on the render grid."""
        h = y1 - y0
        rgb = np.empty((h, self.width, 3), np.uint8)
        labels = np.empty((h, self.width), np.int32)
        ty0 = (y0 // RENDER_TILE) * RENDER_TILE
        for ty in range(ty0, y1, RENDER_TILE):
            th = min(RENDER_TILE, self.height - ty)
            for tx in range(0, self.width, RENDER_TILE):
                tw = min(RENDER_TILE, self.width - tx)
                t_rgb, t_lab = self.render(tx, ty, tw, th)
                a, b = max(ty, y0), min(ty + th, y1)
                rgb[a - y0 : b - y0, tx : tx + tw] = t_rgb[a - ty : b - ty]
                labels[a - y0 : b - y0, tx : tx + tw] = t_lab[a - ty : b - ty]
        return rgb, labels


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


@dataclass
class SyntheticImage:
    """An in-memory synthetic H&E image and its ground truth."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    labels: np.ndarray  # int32 (H, W), 0 = background, k = nucleus id k
    mpp: float
    nuclei: NucleusTable


def make_synthetic_he(
    width: int,
    height: int,
    seed: int = 0,
    mpp: float = 0.25,
    density: float = 2000.0,
    tissue_fraction: float = 1.0,
) -> SyntheticImage:
    """A synthetic H&E image with known nuclei.

    ``density`` is nuclei per mm² of tissue (real H&E: ~1000–3000); the result
    has slightly fewer because overlapping candidates are thinned out.
    ``tissue_fraction`` < 1 leaves white glass around blobs of tissue.
    """
    scene = _Scene(width, height, seed, mpp, density, tissue_fraction)
    rgb, labels = scene.strip(0, scene.height)
    return SyntheticImage(rgb=rgb, labels=labels, mpp=scene.mpp, nuclei=scene.nuclei)


class StripSource(Protocol):
    """Something that can hand out full-width row strips of an RGB image."""

    width: int
    height: int

    def strip_rgb(self, y0: int, y1: int) -> np.ndarray: ...


class _ArrayStrips:
    def __init__(self, rgb: np.ndarray) -> None:
        from dannucnet.slides.reader import to_rgb_uint8

        self.rgb = to_rgb_uint8(rgb)
        self.height, self.width = self.rgb.shape[:2]
        self.strip_height = 1024

    def strip_rgb(self, y0: int, y1: int) -> np.ndarray:
        return self.rgb[y0:y1]


class _SceneStrips:
    def __init__(self, scene: _Scene) -> None:
        self.scene = scene
        self.width, self.height = scene.width, scene.height
        self.strip_height = RENDER_TILE

    def strip_rgb(self, y0: int, y1: int) -> np.ndarray:
        return self.scene.strip(y0, y1)[0]


_COMPRESSION = {"jpeg": "jpeg", "deflate": "zlib", "zlib": "zlib", "lzw": "lzw", "none": None, None: None}


def _halve(img: np.ndarray) -> np.ndarray:
    """2× area downsample; odd edges are replicated so levels stay exactly 2× apart."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
    return cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)


def _upper_levels(level1: np.ndarray | None, n_levels: int) -> Iterator[np.ndarray]:
    """Pyramid levels 1 … n_levels-1, each the one before halved (none when there is no level 1)."""
    if level1 is None:
        return
    cur = level1
    for lvl in range(1, n_levels):
        if lvl > 1:
            cur = _halve(cur)
        yield cur


def _tiles(img_rows: Iterator[np.ndarray], width: int, tile: int, fill: int) -> Iterator[np.ndarray]:
    """Tiles in row-major order from strips that are exactly one tile-row high (last may be short)."""
    for rows in img_rows:
        h = rows.shape[0]
        for tx in range(0, width, tile):
            t = rows[:, tx : tx + tile]
            if t.shape[0] != tile or t.shape[1] != tile:
                pad = np.full((tile, tile) + t.shape[2:], fill, dtype=t.dtype)
                pad[:h, : t.shape[1]] = t
                t = pad
            yield np.ascontiguousarray(t)


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    rgb_or_tile_source: np.ndarray | StripSource,
    mpp: float | None,
    tile_size: int = 256,
    compression: str | None = "jpeg",
    levels: int | None = None,
    flavour: str = "generic",
    quality: int = 90,
) -> Path:
    """Write a tiled pyramidal RGB TIFF that tiffslide (and QuPath) read level by level.

    ``flavour``: ``"generic"`` (levels as SubIFDs, pixel size in the resolution
    tags, unit centimetre), ``"ome"`` (OME-TIFF, SubIFDs, PhysicalSizeX in the
    OME-XML as well as the tags) or ``"svs"`` (Aperio layout: levels as pages
    after a thumbnail, ``MPP = …`` in the description). Level 0 is streamed strip
    by strip; level 1 (¼ of the pixels) is accumulated in memory while level 0
    is written, and smaller levels are made from it.
    """
    import tifffile

    path = Path(path)
    src: StripSource = (_ArrayStrips(rgb_or_tile_source) if isinstance(rgb_or_tile_source, np.ndarray)
                        else rgb_or_tile_source)
    width, height = int(src.width), int(src.height)
    if tile_size % 16 or tile_size <= 0:
        raise InputError(f"tile size must be a positive multiple of 16, got {tile_size}")
    if compression not in _COMPRESSION:
        raise InputError(f"compression must be one of jpeg, deflate, zlib, lzw, none; got {compression!r}")
    if flavour not in ("generic", "ome", "svs"):
        raise InputError(f"flavour must be generic, ome or svs; got {flavour!r}")
    comp = _COMPRESSION[compression]
    n_levels = 1
    while levels is None and max(width, height) / 2 ** n_levels >= tile_size:
        n_levels += 1
    if levels is not None:
        n_levels = max(1, int(levels))
    ensure_parent_writable(path)
    dims = [(width, height)]
    for _ in range(1, n_levels):
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))

    strip_h = max(tile_size, (getattr(src, "strip_height", 1024) // tile_size) * tile_size)
    level1 = np.empty((dims[1][1], dims[1][0], 3), np.uint8) if n_levels > 1 else None

    def level0_strips() -> Iterator[np.ndarray]:
        for y0 in range(0, height, strip_h):
            y1 = min(height, y0 + strip_h)
            rows = src.strip_rgb(y0, y1)
            if rows.shape != (y1 - y0, width, 3) or rows.dtype != np.uint8:
                raise InputError(
                    f"strip {y0}:{y1} has shape {rows.shape} {rows.dtype}, expected ({y1 - y0}, {width}, 3) uint8"
                )
            if level1 is not None:
                half = _halve(rows)
                level1[y0 // 2 : y0 // 2 + half.shape[0]] = half
            for ty in range(0, y1 - y0, tile_size):
                yield rows[ty : ty + tile_size]

    common: dict = dict(
        tile=(tile_size, tile_size),
        photometric="rgb",
        compression=comp,
        dtype=np.uint8,
    )
    if comp == "jpeg":
        common["compressionargs"] = {"level": int(quality)}
    elif comp == "zlib":
        common["compressionargs"] = {"level": 6}
        common["predictor"] = True
    res: dict = {}
    if mpp is not None:
        res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    big = width * height * 3 > 2**31
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=big, ome=(flavour == "ome")) as tif:
        if flavour == "svs":
            desc = (
                f"Aperio Image Library v12.0.0 \r\n{width}x{height} [0,0 {width}x{height}] "
                f"({tile_size}x{tile_size}) {'JPEG/RGB Q=' + str(quality) if comp == 'jpeg' else 'RGB'}"
                f"|AppMag = {round(10 / mpp) if mpp else 40}" + (f"|MPP = {mpp:.6g}" if mpp else "")
            )
            tif.write(_level0_tiles(level0_strips(), width, tile_size), shape=(height, width, 3),
                      description=desc, metadata=None, software=False, **res, **common)
            thumb = _thumbnail(level1, src, 768)
            tif.write(thumb, photometric="rgb", compression=comp, metadata=None, software=False,
                      description=desc)
            for cur in _upper_levels(level1, n_levels):
                tif.write(cur, metadata=None, software=False, description=desc, **res, **common)
        else:
            meta: dict | None = None
            if flavour == "ome":
                meta = {"axes": "YXS"}
                if mpp is not None:
                    meta.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
            tif.write(_level0_tiles(level0_strips(), width, tile_size), shape=(height, width, 3),
                      subifds=n_levels - 1, metadata=meta, software=False, **res, **common)
            for cur in _upper_levels(level1, n_levels):
                tif.write(cur, subfiletype=1, metadata=None, software=False, **res, **common)
    return path


def _level0_tiles(strips: Iterator[np.ndarray], width: int, tile: int) -> Iterator[np.ndarray]:
    return _tiles(strips, width, tile, 255)


def _thumbnail(level1: np.ndarray | None, src: StripSource, size: int) -> np.ndarray:
    base = level1 if level1 is not None else src.strip_rgb(0, src.height)
    h, w = base.shape[:2]
    s = min(1.0, size / max(h, w))
    return cv2.resize(base, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def ensure_parent_writable(path: Path) -> None:
    """Fail before any work when the output folder is missing or read-only."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: folder {parent} is not writable")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")


@dataclass
class SyntheticSlide:
    """A synthetic slide written to disk, with its ground truth."""

    path: Path
    labels_path: Path | None
    width: int
    height: int
    mpp: float
    nuclei: NucleusTable


def write_synthetic_slide(
    path: str | os.PathLike[str],
    size: int | tuple[int, int],
    seed: int = 0,
    mpp: float = 0.25,
    tissue_fraction: float = 1.0,
    density: float = 2000.0,
    labels_path: str | os.PathLike[str] | None = None,
    tile_size: int = 256,
    compression: str = "jpeg",
    flavour: str = "generic",
) -> SyntheticSlide:
    """Render a synthetic slide strip by strip into a pyramidal TIFF (+ optional label TIFF).

    Peak memory is one 512-row strip plus level 1 of the pyramid (¼ of the
    uint8 image), never a float image of the whole slide. The label TIFF is
    int32, tiled, deflate-compressed, written in a second cheap pass (labels
    only, no stain rendering).
    """
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    path = Path(path)
    ensure_parent_writable(path)
    lpath = Path(labels_path) if labels_path is not None else None
    if lpath is not None:
        ensure_parent_writable(lpath)
    scene = _Scene(width, height, seed, mpp, density, tissue_fraction)
    write_pyramidal_tiff(path, _SceneStrips(scene), mpp, tile_size=tile_size, compression=compression, flavour=flavour)
    if lpath is not None:
        write_label_tiff(lpath, scene, tile_size=tile_size)
    return SyntheticSlide(path=path, labels_path=lpath, width=width, height=height, mpp=scene.mpp, nuclei=scene.nuclei)


def write_label_tiff(path: Path, scene: _Scene, tile_size: int = 256) -> Path:
    """Ground-truth labels as a tiled int32 TIFF, rendered tile row by tile row."""
    import tifffile

    def rows() -> Iterator[np.ndarray]:
        for y0 in range(0, scene.height, tile_size):
            h = min(tile_size, scene.height - y0)
            yield scene.render_labels(0, y0, scene.width, h)

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=scene.width * scene.height * 4 > 2**31) as tif:
        tif.write(
            _tiles(rows(), scene.width, tile_size, 0),
            shape=(scene.height, scene.width),
            dtype=np.int32,
            tile=(tile_size, tile_size),
            compression="zlib",
            photometric="minisblack",
            resolution=(1e4 / scene.mpp, 1e4 / scene.mpp),
            resolutionunit="CENTIMETER",
            metadata=None,
            software=False,
        )
    return path
