"""Limits that keep one request from taking the server down, and safe decoding.

Image sizes are read from the file header (PNG IHDR, JPEG SOF, TIFF IFD via
Pillow's lazy ``Image.open``) and checked against ``max_pixels`` *before* any
pixel is decoded, so a 100 kB PNG declaring 100 000 × 100 000 pixels (a
decompression bomb) costs nothing.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image, UnidentifiedImageError

from dannucnet.service.status import ServiceError, invalid
from dannucnet.slides.mpp import MPP_MAX, MPP_MIN, is_plausible

MIN_SIDE = 16  # px; a nucleus is ~20-40 px at 0.25 µm/px, anything smaller holds none
_FORMATS = ("PNG", "JPEG", "TIFF")

# ---- bounds on every number a request carries (all refused with INVALID_ARGUMENT / 400) ----
# Level-0 coordinates: QuPath's ImageServer sizes are Java ints, so no slide pixel lies beyond
# 2^31; there a float64 still resolves 2^-22 px, while at 1e17 one ulp is 16 px (wrong polygons).
MAX_COORDINATE = float(2**31)
# QuPath pyramids reach downsample 32-256; below 1/64 a 4096-px image covers < 64 level-0 px.
DOWNSAMPLE_RANGE = (1.0 / 64.0, 4096.0)
# Linux PATH_MAX and NAME_MAX (bytes): longer paths cannot name a file (ENAMETOOLONG).
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255
MAX_TIMEOUT_SECONDS = 24 * 3600.0  # X-Timeout-Seconds: a day is longer than any slide takes
MAX_ROIS = 10_000  # roiWkb entries per SegmentSlide (QuPath projects hold hundreds per slide)
# WKB geometries (clipWkb, roiWkb) are walked before any geometry library parses them: GEOS
# recurses once per nesting level and crashes the process at ~20,000 (a 180 kB message).
# Only Polygon / MultiPolygon pass, so nesting is at most 2 by construction.
MAX_WKB_VERTICES = 1_000_000  # 16 MB of coordinates; a detailed hand-drawn annotation has ~10^4
MAX_WKB_PARTS = 100_000  # polygons in a MultiPolygon, rings in a Polygon


@dataclass(frozen=True)
class Limits:
    """Per-request limits; the defaults fit a 16 GB server and QuPath's chunk sizes."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_polygons: int = 200_000
    max_pending: int = 64  # requests admitted (running or queued) before RESOURCE_EXHAUSTED
    # Model work: windows (tiles) one request may need. None: as many as a max_pixels square
    # (4096² with 256-px tiles overlapping 32 px: 19 × 19 = 361; with 512-px ones 9 × 9 = 81), so a
    # 16 × 1,000,000 strip (4,464 windows of 256 px, ~40 min on a CPU) is refused although its pixels
    # are within max_pixels.
    max_windows: int | None = None
    # Longest side / shortest side of a region. Chunks from QuPath and the Python client are
    # square (2048 px) plus margins; 64:1 still admits a 64 × 4096 strip.
    max_aspect: float = 64.0
    # HTTP: open connections (one thread each; QuPath keeps ~4 per user), and seconds a client
    # has to send one whole request (line, headers and body) — a per-read timeout alone lets a
    # body trickled one byte every 20 s hold a connection forever. 120 s moves 64 MB at 4 Mbit/s.
    max_connections: int = 100
    request_read_seconds: float = 120.0


def check_size(width: int, height: int, limits: Limits, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise invalid(f"{what} is {width}×{height} px: width and height must be positive")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise invalid(
            f"{what} is {width}×{height} px, smaller than {MIN_SIDE}×{MIN_SIDE}: send a region "
            "large enough to hold a nucleus"
        )
    if width * height > limits.max_pixels:
        raise invalid(
            f"{what} is {width}×{height} = {width * height:,} px, more than this server's limit of "
            f"{limits.max_pixels:,} px per request: split the region into chunks "
            "(dannucnet.client.segment_large_region does) or start the server with a larger --max-pixels"
        )


def decode_image(image, limits: Limits) -> np.ndarray:
    """Decode an ``Image`` message into uint8 H×W×3 RGB, refusing oversize input first."""
    which = image.WhichOneof("data") if image is not None else None
    if which is None:
        raise invalid("image is missing: set image.encoded (PNG/JPEG/TIFF bytes) or image.raw")
    if which == "raw":
        return _decode_raw(image.raw, limits)
    return _decode_encoded(image.encoded, limits)


def _decode_raw(raw, limits: Limits) -> np.ndarray:
    check_size(raw.width, raw.height, limits, "raw image")
    expected = raw.width * raw.height * 3
    if len(raw.data) != expected:
        raise invalid(
            f"raw image data has {len(raw.data):,} bytes but {raw.width}×{raw.height} RGB needs "
            f"{expected:,} (width × height × 3, interleaved 8-bit RGB)"
        )
    return np.frombuffer(raw.data, dtype=np.uint8).reshape(raw.height, raw.width, 3).copy()


def _decode_encoded(data: bytes, limits: Limits) -> np.ndarray:
    if not data:
        raise invalid("image.encoded is empty: send the bytes of a PNG, JPEG or TIFF file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces Pillow's global bomb guard (a
            # process-wide setting we must not change from a request thread).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as exc:
        raise invalid(
            f"image declares more pixels than this server accepts ({limits.max_pixels:,} px per request; "
            f"Pillow: {exc}): split the region into chunks"
        ) from None
    except UnidentifiedImageError:
        raise invalid(
            f"image.encoded is not a readable PNG, JPEG or TIFF file ({len(data):,} bytes starting "
            f"{data[:8]!r}); send an 8-bit RGB PNG, JPEG or TIFF"
        ) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises assorted errors on corrupt headers
        raise invalid(
            f"image.encoded is a corrupt or truncated image file ({type(exc).__name__}: {exc}); "
            "send a complete 8-bit RGB PNG, JPEG or TIFF"
        ) from None
    width, height = img.size
    check_size(width, height, limits, f"{img.format} image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "I;16", "I;16B", "I"):
                raise invalid(f"{img.format} image has pixel mode {img.mode}; send 8-bit RGB")
            rgb = img.convert("RGB")
    except ServiceError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise invalid(
            f"{img.format} image ({width}×{height}) could not be decoded: {type(exc).__name__}: {exc}. "
            "The file is truncated or corrupt; re-encode it"
        ) from None
    return np.asarray(rgb, dtype=np.uint8)


def finite(value: float, name: str, *, positive: bool = False, non_negative: bool = False) -> float:
    """Check one scalar parameter, naming it in the message."""
    if not math.isfinite(value):
        raise invalid(f"{name} is {value}: it must be a finite number")
    if positive and value <= 0:
        raise invalid(f"{name} is {value}: it must be greater than 0")
    if non_negative and value < 0:
        raise invalid(f"{name} is {value}: it must not be negative")
    return float(value)


def check_mpp(value: float, name: str = "pixelSizeMicrons") -> float:
    """A pixel size a request sends, held to the one plausibility rule (:func:`dannucnet.slides.mpp.is_plausible`)."""
    finite(value, name, positive=True)
    if not is_plausible(value):
        raise invalid(
            f"{name} is {value} µm/px, outside the plausible microscope range {MPP_MIN}–{MPP_MAX} µm/px "
            "(values like 352.8 come from a 72-dpi tag, not a calibration): send the real level-0 pixel size"
        )
    return float(value)


def too_many_polygons(count: int, limits: Limits) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.OUT_OF_RANGE,
        f"the region holds {count:,} nuclei, more than this server returns in one response "
        f"({limits.max_polygons:,}): split the region into smaller chunks",
    )


def in_range(value: float, name: str, lo: float, hi: float, *, what: str = "") -> float:
    """A finite number within [lo, hi], or INVALID_ARGUMENT naming the field and the range."""
    finite(value, name)
    if not lo <= value <= hi:
        raise invalid(f"{name} is {value:g}: it must lie between {lo:g} and {hi:g}{what}")
    return float(value)


def coordinate(value: float, name: str, *, lo: float = 0.0) -> float:
    return in_range(value, name, lo, MAX_COORDINATE, what=" (level-0 pixels; QuPath image sizes are < 2^31)")


def windows_for(width: int, height: int, tile: int, overlap: int) -> int:
    """Model windows (tiles) the engine runs for a width × height image at the model's pixel size."""
    from dannucnet.engine.tiling import WindowGrid

    return WindowGrid(tile, overlap).over(height, width)


def window_budget(limits: Limits, tile: int, overlap: int) -> int:
    """``limits.max_windows``, or the windows a square of ``max_pixels`` needs."""
    if limits.max_windows is not None:
        return limits.max_windows
    side = math.isqrt(limits.max_pixels)
    return windows_for(side, side, tile, overlap)


def check_work(
    width: int, height: int, resampled: tuple[float, float], tile: int, overlap: int, limits: Limits
) -> None:
    """Bound the model work of one request (windows), and its aspect ratio, not only its pixels."""
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise invalid(
            f"the image is {width}×{height} px, an aspect ratio of {aspect:,.0f}:1, more than this server's "
            f"{limits.max_aspect:g}:1: send square-ish chunks (split long strips)"
        )
    rw, rh = (max(1, round(v)) for v in resampled)
    needed, budget = windows_for(rw, rh, tile, overlap), window_budget(limits, tile, overlap)
    if needed > budget:
        raise invalid(
            f"the region needs {needed:,} model windows of {tile} px ({rw}×{rh} px at the model's pixel size), "
            f"more than this server's limit of {budget:,} per request: split the region into chunks"
        )
