"""Open an image or whole slide and read regions of it in level-0 coordinates.

One class, :class:`ImageSource`, hides two back-ends: tiffslide for anything
TIFF-shaped (SVS, pyramidal TIFF, OME-TIFF, plain TIFF) so large slides are read
tile by tile, and PIL for small formats (PNG, JPEG, BMP) that are read whole.
Every failure a user can cause — a missing, non-image, corrupt or truncated
file — becomes an :class:`InputError` with one line saying what is wrong.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dannucnet.errors import InputError, one_line
from dannucnet.slides import mpp as mpp_mod

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_WHITE = 255
_BAND_BYTES = 1 << 26  # above this, downsampled reads go band by band


def open_image(path: str | os.PathLike[str], mpp: float | None = None) -> ImageSource:
    """Open ``path`` for region reads; ``mpp`` (µm/px) overrides the file's metadata."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"image not found: {p}")
    if p.is_dir():
        raise InputError(f"expected an image file but got a folder: {p}")
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from None
    if not head:
        raise InputError(f"{p} is empty (0 bytes), not an image")
    given = mpp_mod.validate_given_mpp(mpp) if mpp is not None else None
    if head[:4] in _TIFF_MAGIC:
        backend: _Backend = _TiffBackend(p)
    else:
        backend = _PilBackend(p)
    return ImageSource(p, backend, given)


class ImageSource:
    """An open image: size, pixel size (with its provenance) and region reads.

    Safe for concurrent ``read_region`` calls from several threads: the
    underlying file handle is guarded by a lock (decoding is cheap next to the
    network, so the lock costs little).
    """

    def __init__(self, path: Path, backend: _Backend, given_mpp: float | None) -> None:
        self.path = path
        self._backend = backend
        self.width, self.height = backend.level_dimensions[0]
        self.level_dimensions: tuple[tuple[int, int], ...] = backend.level_dimensions
        self.level_downsamples: tuple[float, ...] = backend.level_downsamples
        self.format: str = backend.format
        self.given_mpp = given_mpp  # the --mpp that overrides the file's, if any (a server reading the file needs it)
        if given_mpp is not None:
            self.mpp: float | None = given_mpp
            self.mpp_source = "given with --mpp"
        else:
            self.mpp, self.mpp_source = backend.mpp, backend.mpp_source
        self._closed = False

    # -- context manager -------------------------------------------------
    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __repr__(self) -> str:
        return (
            f"ImageSource({self.path.name!r}, {self.width}x{self.height}, format={self.format}, "
            f"levels={len(self.level_downsamples)}, mpp={self.mpp}, mpp_source={self.mpp_source!r})"
        )

    # -- pixel size ------------------------------------------------------
    def require_mpp(self) -> float:
        """The pixel size, or an error telling the user how to supply it."""
        if self.mpp is None:
            raise InputError(
                f"{self.path.name} has no usable pixel size ({self.mpp_source}); "
                "pass --mpp MICRONS_PER_PIXEL (e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x)"
            )
        return self.mpp

    # -- pixels ------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_region(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """RGB uint8 array of shape (round(h/d), round(w/d), 3) for a level-0 rectangle.

        Reads the best pyramid level at or below ``downsample`` and resizes with
        area averaging, so the result looks like a resize of the full-resolution
        read. Parts outside the image are white; RGBA is composited on white.
        """
        if self._closed:
            raise InputError(f"{self.path.name} is closed")
        d = float(downsample)
        if not math.isfinite(d) or d <= 0:
            raise InputError(f"downsample must be a positive number, got {downsample!r}")
        x, y, w, h = int(x), int(y), int(w), int(h)
        if w <= 0 or h <= 0:
            raise InputError(f"region size must be positive, got {w}x{h}")
        if x >= self.width or y >= self.height or x + w <= 0 or y + h <= 0:
            raise InputError(
                f"region x={x} y={y} w={w} h={h} lies wholly outside {self.path.name} "
                f"({self.width}x{self.height} px)"
            )
        out_w, out_h = max(1, round(w / d)), max(1, round(h / d))
        level = self.best_level(d)
        ds = self.level_downsamples[level]
        # level-pixel box covering the request
        lx0, ly0 = math.floor(x / ds), math.floor(y / ds)
        lx1, ly1 = math.ceil((x + w) / ds), math.ceil((y + h) / ds)
        scale = ds / d
        if abs(scale - 1.0) < 1e-9 and lx0 * ds == x and ly0 * ds == y:
            out = self._block(level, lx0, ly0, lx0 + out_w, ly0 + out_h, x, y)
        else:
            bw = max(1, round((lx1 - lx0) * scale))
            bh = max(1, round((ly1 - ly0) * scale))
            if scale < 0.5 and (lx1 - lx0) * (ly1 - ly0) * 3 > _BAND_BYTES:
                resized = self._banded_resize(level, lx0, ly0, lx1, ly1, bw, bh, scale, x, y)
            else:
                block = self._block(level, lx0, ly0, lx1, ly1, x, y)
                interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
                resized = cv2.resize(block, (bw, bh), interpolation=interp)
            ox = max(0, round((x - lx0 * ds) / d))
            oy = max(0, round((y - ly0 * ds) / d))
            out = resized[oy : oy + out_h, ox : ox + out_w]
        if out.shape[:2] != (out_h, out_w):  # rounding left us a pixel short
            padded = np.full((out_h, out_w, 3), _WHITE, dtype=np.uint8)
            padded[: out.shape[0], : out.shape[1]] = out[:out_h, :out_w]
            out = padded
        return np.ascontiguousarray(out)

    def _block(self, level: int, lx0: int, ly0: int, lx1: int, ly1: int, x: int, y: int) -> np.ndarray:
        """Level pixels [lx0, lx1) × [ly0, ly1), white where outside the level."""
        lw, lh = self.level_dimensions[level]
        cx0, cy0, cx1, cy1 = max(lx0, 0), max(ly0, 0), min(lx1, lw), min(ly1, lh)
        block = np.full((ly1 - ly0, lx1 - lx0, 3), _WHITE, dtype=np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            try:
                data = self._backend.read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - decoder errors: corrupt or truncated data
                raise InputError(
                    f"cannot decode pixels of {self.path.name} at x={x} y={y} (level {level}): "
                    f"the file is corrupt or truncated ({type(exc).__name__}: {exc})"
                ) from None
            block[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0] = to_rgb_uint8(data)
        return block

    def _banded_resize(self, level: int, lx0: int, ly0: int, lx1: int, ly1: int,
                       bw: int, bh: int, scale: float, x: int, y: int) -> np.ndarray:
        """Downsample a large block band by band, so a thumbnail of a huge
        single-level image never needs the whole image in memory."""
        ratio = max(1, round(1.0 / scale))
        rows = max(ratio, (_BAND_BYTES // max(1, (lx1 - lx0) * 3)) // ratio * ratio)
        parts = []
        total = ly1 - ly0
        for r0 in range(ly0, ly1, rows):
            r1 = min(ly1, r0 + rows)
            # distribute exactly bh output rows over the bands, in proportion
            n_out = round((r1 - ly0) * bh / total) - round((r0 - ly0) * bh / total)
            if n_out <= 0:
                continue
            band = self._block(level, lx0, r0, lx1, r1, x, y)
            parts.append(cv2.resize(band, (bw, n_out), interpolation=cv2.INTER_AREA))
        out = np.concatenate(parts, axis=0)
        return out


def to_rgb_uint8(data: np.ndarray) -> np.ndarray:
    """Any decoded pixel block (grey, RGB, RGBA, 16-bit, float) → RGB uint8, alpha on white."""
    a = np.asarray(data)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8:
        if a.dtype.kind == "f":
            hi = 1.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else 255.0
            a = np.clip(np.nan_to_num(a) * (255.0 / hi), 0, 255).astype(np.uint8)
        elif a.dtype == np.uint16:
            a = (a // 257).astype(np.uint8)
        elif a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    c = a.shape[2]
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 2:  # grey + alpha
        a = np.concatenate([np.repeat(a[..., :1], 3, axis=2), a[..., 1:2]], axis=2)
        c = 4
    if c >= 4:
        rgb = a[..., :3].astype(np.uint16)
        alpha = a[..., 3:4].astype(np.uint16)
        return ((rgb * alpha + _WHITE * (255 - alpha) + 127) // 255).astype(np.uint8)
    return a[..., :3]


# ---------------------------------------------------------------------------
# back-ends
# ---------------------------------------------------------------------------


class _Backend:
    format: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TiffBackend(_Backend):
    """tiffslide-backed reader for SVS, pyramidal/OME/plain TIFF."""

    def __init__(self, path: Path) -> None:
        import tifffile
        import tiffslide

        self._lock = threading.Lock()
        name = path.name
        try:
            slide = tiffslide.TiffSlide(path)
        except (tifffile.TiffFileError, ValueError, OSError, EOFError, IndexError, KeyError, struct_error()) as exc:
            raise InputError(f"{name} is not a readable TIFF (corrupt or truncated): {_short(exc)}") from None
        try:
            props = slide.properties
            self.level_dimensions = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in slide.level_downsamples)
            tf = slide.ts_tifffile
            self._check_complete(tf, path, props)
            ome = tf.ome_metadata if tf.is_ome else None
        except InputError:
            slide.close()
            raise
        except NotImplementedError as exc:
            slide.close()
            raise InputError(
                f"{name}: unsupported TIFF layout ({_short(exc)}); convert it to an RGB pyramidal TIFF"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any other reader failure: the file is unreadable
            slide.close()
            raise InputError(f"{name} is not a readable TIFF (corrupt or truncated): {_short(exc)}") from None
        self._slide = slide
        self.format = str(props.get("tiffslide.vendor") or ("ome-tiff" if ome else "generic-tiff"))
        if self.format == "generic-tiff" and ome:
            self.format = "ome-tiff"
        self.mpp, self.mpp_source = mpp_mod.mpp_from_tiffslide(props, ome)

    @staticmethod
    def _check_complete(tf: Any, path: Path, props: dict[str, Any]) -> None:
        """Refuse a truncated file now rather than halfway through a slide."""
        size = path.stat().st_size
        idx = int(props.get("tiffslide.series-index", 0) or 0)
        series = tf.series[idx]
        for level in series.levels:
            for page in level.pages:
                if page is None:
                    continue
                offsets = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                if offsets and counts:
                    end = max(int(o) + int(c) for o, c in zip(offsets, counts))
                    if end > size:
                        raise InputError(
                            f"{path.name} is truncated: image data runs to byte {end} but the file has {size} bytes"
                        )

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        # tiffslide maps a level-0 location to level pixels with int(loc / ds);
        # pick a level-0 location that maps exactly onto (x, y).
        bx, by = _level0_location(x, ds), _level0_location(y, ds)
        with self._lock:
            arr = self._slide.read_region((bx, by), level, (w, h), as_array=True, padding=False)
        if arr.shape[0] != h or arr.shape[1] != w:
            raise InputError(f"unexpected block size {arr.shape[:2]} for a {w}x{h} read at level {level}")
        return arr

    def close(self) -> None:
        with self._lock:
            self._slide.close()


def _level0_location(v: int, ds: float) -> int:
    """Smallest integer ``b`` with ``int(b / ds) == v`` (tiffslide's mapping)."""
    b = math.ceil(v * ds)
    while b > 0 and int((b - 1) / ds) == v:
        b -= 1
    while int(b / ds) < v:
        b += 1
    return b


class _PilBackend(_Backend):
    """PNG/JPEG/BMP and other small formats: decoded whole, one level."""

    def __init__(self, path: Path) -> None:
        from PIL import Image, UnidentifiedImageError

        name = path.name
        try:
            with Image.open(path) as im:
                fmt = (im.format or "image").upper()
                dpi = im.info.get("dpi")
                im.load()
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    arr = np.asarray(im.convert("RGBA"))
                elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # 16-bit grey (mode "I" is how older Pillow opens a 16-bit PNG): full range 0..65535,
                    # scaled by to_rgb_uint8 as a 16-bit TIFF is (/257), never stretched to the image's own
                    # maximum, so the same pixels give the same nuclei whatever the file format.
                    arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
                else:
                    arr = np.asarray(im.convert("RGB"))
        except UnidentifiedImageError:
            raise InputError(
                f"{name} is not an image format we can read (expected SVS, TIFF, OME-TIFF, PNG or JPEG)"
            ) from None
        except Image.DecompressionBombError:
            raise InputError(f"{name} is too large to decode whole; convert it to a pyramidal TIFF") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{name} is corrupt or truncated: {_short(exc)}") from None
        self._rgb = to_rgb_uint8(arr)
        h, w = self._rgb.shape[:2]
        self.format = fmt.lower()
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.mpp, self.mpp_source = mpp_mod.mpp_from_dpi(dpi, fmt)

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._rgb[y : y + h, x : x + w]

    def close(self) -> None:
        self._rgb = np.zeros((0, 0, 3), np.uint8)


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def _short(exc: BaseException) -> str:
    return one_line(exc, 200)
