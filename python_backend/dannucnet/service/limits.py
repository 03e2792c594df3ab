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

MIN_SIDE = 16  # px; a nucleus is ~20-40 px at 0.25 µm/px, anything smaller holds none
MPP_RANGE = (0.05, 10.0)  # µm/px; outside: a dpi tag, not a microscope calibration
_FORMATS = ("PNG", "JPEG", "TIFF")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; the defaults fit a 16 GB server and QuPath's chunk sizes."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_polygons: int = 200_000
    max_pending: int = 64  # requests admitted (running or queued) before RESOURCE_EXHAUSTED


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
    except Exception as exc:  # Pillow raises assorted errors on corrupt headers
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
    except Exception as exc:  # truncated or corrupt pixel data
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
    finite(value, name, positive=True)
    lo, hi = MPP_RANGE
    if not lo <= value <= hi:
        raise invalid(
            f"{name} is {value} µm/px, outside the plausible microscope range {lo}–{hi} µm/px "
            "(values like 352.8 come from a 72-dpi tag, not a calibration): send the real level-0 pixel size"
        )
    return float(value)


def too_many_polygons(count: int, limits: Limits) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.OUT_OF_RANGE,
        f"the region holds {count:,} nuclei, more than this server returns in one response "
        f"({limits.max_polygons:,}): split the region into smaller chunks",
    )
