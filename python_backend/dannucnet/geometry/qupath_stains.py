"""QuPath's colour deconvolution, as its Cell detection measures with it.

Follows QuPath 0.5.1 / 0.6.0 (``qupath-core`` ``qupath.lib.color``; the two tags
agree on every rule used here):

* a stain vector is normalised to unit length (``StainVector.setStain``);
* with two stains the third is their cross product, normalised, and called
  "Residual" (``StainVector.makeResidualStainVector``);
* optical density per channel is ``max(0, -log10(max(v, 1) / background))`` for
  the 8-bit value ``v`` (``ColorDeconvolutionHelper.makeOD`` through a 256-entry
  table), background 255 255 255 for "H&E default";
* a stain's amount is ``OD · inverse(M)[:, stain]`` with ``M`` the 3×3 matrix of
  stain rows (``ColorTransformer.deconvolve``), stored as float32.

"H&E default" is haematoxylin (0.65, 0.70, 0.29) and eosin (0.2159, 0.8012,
0.5581) (``StainVector`` defaults). :func:`parse_stains` reads both ways QuPath
writes stains as JSON (the ``setColorDeconvolutionStains`` string and the 0.6
``getColorDeconvolutionStainsAsMap`` map); :func:`estimate_stains` is QuPath's
*Estimate stain vectors*.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dannucnet.errors import InputError

__all__ = ["Stains", "HE_DEFAULT", "parse_stains", "estimate_stains", "stains_to_json"]

_BACKGROUND_KEY = "Background"
_RESIDUAL = "Residual"


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = float(np.sqrt((v**2).sum()))
    if v.shape != (3,) or not np.all(np.isfinite(v)) or n <= 0:
        raise InputError(f"stain vector {what} must be three finite numbers, not all zero; got {v.tolist()}")
    return v / n


@dataclass(frozen=True)
class Stains:
    """A ``ColorDeconvolutionStains``: three unit stain rows, their names, the white background."""

    name: str
    names: tuple[str, str, str]
    vectors: tuple[tuple[float, float, float], ...]
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)
    residual: bool = True  # the third stain is the computed residual (not measured)

    @classmethod
    def make(cls, name: str, stains: list[tuple[str, np.ndarray]],
             background: Sequence[float] = (255.0, 255.0, 255.0)) -> Stains:
        """Normalise two or three ``(name, rgb)`` stains; a missing third becomes the residual."""
        if len(stains) not in (2, 3):
            raise InputError(f"give two or three stain vectors, got {len(stains)}")
        rows = [_unit(v, repr(n)) for n, v in stains]
        names = [str(n) for n, _ in stains]
        residual = len(rows) == 2 or names[2].strip().lower() == _RESIDUAL.lower()
        if len(rows) == 2:
            cross = np.cross(rows[0], rows[1])
            if np.sqrt((cross**2).sum()) < 1e-6:
                raise InputError("the two stain vectors are parallel; give two different stain colours")
            rows.append(_unit(cross, _RESIDUAL))
            names.append(_RESIDUAL)
        bg = tuple(float(b) for b in background)
        if len(bg) != 3 or not all(np.isfinite(b) and b > 0 for b in bg):
            raise InputError(f"stain background must be three positive numbers, got {list(background)}")
        if abs(np.linalg.det(np.stack(rows))) < 1e-9:
            raise InputError("the stain vectors are linearly dependent; give clearly different stain colours")
        vectors = tuple((float(r[0]), float(r[1]), float(r[2])) for r in rows)  # each _unit: shape (3,)
        return cls(name=str(name), names=(names[0], names[1], names[2]), vectors=vectors,
                   background=(bg[0], bg[1], bg[2]), residual=residual)

    @property
    def measured(self) -> list[int]:
        """Indices of the stains Cell detection measures (every non-residual one)."""
        return [0, 1] if self.residual else [0, 1, 2]

    def inverse(self) -> np.ndarray:
        return np.linalg.inv(np.asarray(self.vectors, dtype=np.float64))

    def od_luts(self) -> np.ndarray:
        """3×256 table: channel value → optical density (QuPath's ``makeODLUT``)."""
        v = np.maximum(np.arange(256, dtype=np.float64), 1.0)
        bg = np.asarray(self.background, dtype=np.float64)[:, None]
        return np.maximum(0.0, -np.log10(v[None, :] / bg))

    def deconvolve(self, rgb: np.ndarray, which: list[int] | None = None) -> np.ndarray:
        """uint8 RGB (…×3) → float32 stain amounts (…×k) for the stains ``which`` (default: measured)."""
        rgb = np.asarray(rgb)
        if rgb.shape[-1:] != (3,):
            raise InputError(f"expected RGB pixels (…×3), got shape {rgb.shape}")
        if rgb.dtype != np.uint8:
            rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        which = self.measured if which is None else which
        lut = self.od_luts()
        inv = self.inverse()[:, which]
        od = np.stack([lut[c][rgb[..., c]] for c in range(3)], axis=-1)
        return (od @ inv).astype(np.float32)

    def to_qupath_map(self) -> dict[str, list[float]]:
        """QuPath 0.6's ``getColorDeconvolutionStainsAsMap`` shape (residual left out, as QuPath's string form does)."""
        out = {n: list(v) for n, v, i in zip(self.names, self.vectors, range(3)) if i < 2 or not self.residual}
        out[_BACKGROUND_KEY] = list(self.background)
        return out


HE_DEFAULT = Stains.make(
    "H&E default",
    [("Hematoxylin", np.array([0.65, 0.70, 0.29])), ("Eosin", np.array([0.2159, 0.8012, 0.5581]))],
)


def _numbers(value: object, what: str) -> np.ndarray:
    if isinstance(value, str):
        parts = value.replace(",", " ").replace("[", " ").replace("]", " ").split()
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"{what}: expected three numbers, got {value!r}") from None
    elif isinstance(value, (list, tuple)):
        try:
            nums = [float(p) for p in value]
        except (TypeError, ValueError):
            raise InputError(f"{what}: expected three numbers, got {value!r}") from None
    else:
        raise InputError(f"{what}: expected three numbers, got {value!r}")
    if len(nums) != 3:
        raise InputError(f"{what}: expected three numbers, got {len(nums)}")
    return np.asarray(nums)


_DEFAULT_LETTERS = {"h": ("Hematoxylin", (0.65, 0.70, 0.29)), "e": ("Eosin", (0.2159, 0.8012, 0.5581)),
                    "d": ("DAB", (0.27, 0.57, 0.78))}


def parse_stains(text_or_obj: str | Mapping) -> Stains:
    """Stains from QuPath's JSON: ``{"Name": …, "Stain 1": …, "Values 1": "r g b", …, "Background": "255 255 255"}``
    (what ``setColorDeconvolutionStains`` takes and QuPath's workflow records) or the 0.6 map
    ``{"Hematoxylin": [r, g, b], "Eosin": [r, g, b], "Background": [255, 255, 255]}``.
    """
    obj: object = text_or_obj
    if isinstance(text_or_obj, str):
        try:
            obj = json.loads(text_or_obj)
        except json.JSONDecodeError as e:
            raise InputError(f"stains are not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(obj, Mapping) or not obj:
        raise InputError("stains must be a JSON object in QuPath's ColorDeconvolutionStains format")
    if "Stain 1" in obj or "Values 1" in obj:
        stains = []
        for i in (1, 2, 3):
            if f"Values {i}" not in obj:
                if i < 3:
                    raise InputError(f"stains: 'Values {i}' is missing")
                continue
            raw, name = obj[f"Values {i}"], str(obj.get(f"Stain {i}", f"Stain {i}"))
            if isinstance(raw, str) and raw.strip().lower() in _DEFAULT_LETTERS:
                name, vec = _DEFAULT_LETTERS[raw.strip().lower()]
                stains.append((name, np.asarray(vec)))
            else:
                stains.append((name, _numbers(raw, f"stains 'Values {i}'")))
        bg = _numbers(obj.get(_BACKGROUND_KEY, "255 255 255"), "stains 'Background'")
        return Stains.make(str(obj.get("Name", "Custom")), stains, tuple(bg))
    bg_key = next((k for k in obj if str(k).lower() == _BACKGROUND_KEY.lower()), None)
    bg = _numbers(obj[bg_key], "stains 'Background'") if bg_key else np.array([255.0, 255.0, 255.0])
    stains = [(str(k), _numbers(v, f"stain {k!r}")) for k, v in obj.items() if k != bg_key and str(k).lower() != "name"]
    name = str(obj.get("Name", obj.get("name", "Custom")))
    return Stains.make(name, stains, tuple(bg))


def stains_to_json(stains: Stains) -> str:
    """QuPath's string form (``ColorDeconvolutionStains.getColorDeconvolutionStainsAsString``), JSON-valid."""
    d: dict[str, str] = {"Name": stains.name}
    for i in range(3):
        if i == 2 and stains.residual:
            continue
        d[f"Stain {i + 1}"] = stains.names[i]
        d[f"Values {i + 1}"] = " ".join(f"{v:.5f}" for v in stains.vectors[i])
    d[_BACKGROUND_KEY] = " ".join(f"{b:g}" for b in stains.background)
    return json.dumps(d)


#: QuPath's *Estimate stain vectors* defaults (``EstimateStainVectors.estimateStains``): OD per channel
#: at least 0.05, OD magnitude at most 1, 1 % of the angles ignored at each end.
MIN_STAIN_OD, MAX_STAIN_OD, IGNORE_PERCENT = 0.05, 1.0, 1.0


def estimate_stains(rgb: np.ndarray, start: Stains = HE_DEFAULT, max_pixels: int = 1_000_000) -> Stains:
    """Stain vectors estimated from the pixels as QuPath's *Estimate stain vectors* does for H&E.

    Keeps pixels whose OD lies in [0.05, 1] per channel / magnitude, that are not grey
    (angle to the grey axis > 0.15 rad) and look like H&E (green OD the largest);
    projects them on the two main eigenvectors of their OD covariance, and takes the
    pixels at the 1st and 99th percentile of the angle as the two stains (the one
    with more red OD is haematoxylin). ``max_pixels`` evenly subsamples large images.
    """
    px = np.asarray(rgb).reshape(-1, 3)
    if px.shape[0] > max_pixels:
        px = px[:: int(np.ceil(px.shape[0] / max_pixels))]
    lut = start.od_luts()
    od = np.stack([lut[c][np.clip(px[:, c], 0, 255).astype(np.uint8)] for c in range(3)], axis=1).astype(np.float32)
    r, g, b = od[:, 0].astype(np.float64), od[:, 1].astype(np.float64), od[:, 2].astype(np.float64)
    mag2 = r * r + g * g + b * b
    keep = (mag2 <= MAX_STAIN_OD**2) & (r >= MIN_STAIN_OD) & (g >= MIN_STAIN_OD) & (b >= MIN_STAIN_OD) & (mag2 > 0)
    keep &= ~((r > g) | (b > g))  # H&E colour test
    with np.errstate(invalid="ignore", divide="ignore"):
        keep &= (r + g + b) / np.sqrt(3.0) / np.sqrt(mag2) < np.cos(0.15)  # grey test
    od = od[keep].astype(np.float64)
    if od.shape[0] <= 1:
        raise InputError("cannot estimate stain vectors: too few stained pixels (OD 0.05-1, H&E colours) in the image")
    cov = np.cov(od, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    e1, e2 = vecs[:, np.argsort(vals)[2]], vecs[:, np.argsort(vals)[1]]
    phi = np.arctan2(od @ e1, od @ e2)
    order = np.argsort(phi, kind="stable")
    n, alpha = od.shape[0], IGNORE_PERCENT / 100.0
    s1 = od[order[max(0, int(alpha * n + 0.5))]]
    s2 = od[order[min(n - 1, int((1 - alpha) * n + 0.5))]]
    if s1[0] / np.linalg.norm(s1) < s2[0] / np.linalg.norm(s2):
        s1, s2 = s2, s1
    return Stains.make(start.name, [(start.names[0], s1), (start.names[1], s2)], start.background)
