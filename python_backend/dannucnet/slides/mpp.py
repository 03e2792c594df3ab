"""Pixel size (µm/px) from image metadata, with a plausibility check.

Why a check at all: many plain TIFF/PNG/JPEG files carry a *screen* resolution
(72, 96 or 300 dpi) in their resolution tags. Read naively that is 352.8, 264.6
or 84.7 µm/px, and a segmentation run would rescale the image by a factor of
~1000 and find nothing. A microscope image is somewhere between 0.05 µm/px
(beyond optical resolution) and 10 µm/px (a low-power overview), so anything
outside that range is treated as *missing* and the reason is reported.

This is the one plausibility rule (:data:`MPP_MIN`, :data:`MPP_MAX`, :func:`is_plausible`): slide
reading, ``--mpp``, QuPath project entries and the server's requests (``service.limits.check_mpp``)
and chunk plans (``service.plan``) all apply it; the QuPath script holds no copy, it asks the
server's ``/v1/plan`` (tests/test_pixel_size_rule.py holds every door to it).

How tiffslide (3.x) exposes the pixel size, as read in its source
(``tiffslide/tiffslide.py``, ``_PropertyParser``):

* SVS (Aperio): ``tiffslide.mpp-x``/``-y`` from the ``MPP = ...`` field of the
  ImageDescription; only if absent does it fall back to the resolution tags.
* Generic TIFF (including pyramids written by tifffile): ``recover_mpp`` turns
  ``XResolution``/``YResolution`` + ``ResolutionUnit`` into µm/px
  (INCH → 25400/res, CENTIMETER → 10000/res, MILLIMETER → 1000/res,
  MICROMETER → 1/res, NONE → no value). A TIFF without the tags gives None.
* OME-TIFF is parsed as a generic TIFF: the OME-XML ``PhysicalSizeX`` is ignored
  (the cause of instanseg#38), so we read the OME-XML ourselves and prefer it.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from typing import Any

from dannucnet.errors import InputError

MPP_MIN = 0.05
MPP_MAX = 10.0

_UNIT_TO_UM = {
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,  # Greek mu, as some writers spell it
    "micron": 1.0,
    "nm": 1e-3,
    "Å": 1e-4,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "pm": 1e-6,
}


def is_plausible(mpp: float | None) -> bool:
    """True when ``mpp`` could be a microscope calibration (:data:`MPP_MIN`–:data:`MPP_MAX` µm/px)."""
    return mpp is not None and math.isfinite(mpp) and MPP_MIN <= mpp <= MPP_MAX


def validate_given_mpp(mpp: float) -> float:
    """Check a pixel size the user typed (``--mpp``); refuse nonsense loudly.

    A user-given value outside the plausible range is almost always a
    units mistake (nm, or dpi), so it is an error rather than a warning.
    """
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise InputError(f"--mpp must be a number in µm per pixel, got {mpp!r}") from None
    if not is_plausible(value):
        raise InputError(
            f"--mpp {value:g} is not a plausible pixel size: expected {MPP_MIN}–{MPP_MAX} µm per pixel "
            "(e.g. 0.25 for a 40x scan, 0.5 for 20x)"
        )
    return value


def _describe_implausible(value: float, where: str) -> str:
    dpi = 25400.0 / value if value > 0 else float("nan")
    hint = ""
    if math.isfinite(dpi) and abs(dpi - round(dpi)) < 0.05 and round(dpi) in (72, 96, 150, 200, 300, 600):
        hint = f" = {round(dpi)} dpi, a screen/print resolution"
    return (
        f"missing: {where} says {value:.4g} µm/px{hint}, which is not a microscope calibration "
        f"(plausible: {MPP_MIN}–{MPP_MAX} µm/px)"
    )


def combine_xy(mpp_x: float | None, mpp_y: float | None, where: str) -> tuple[float | None, str]:
    """One pixel size from x and y values, or None with the reason why not."""
    values = [float(v) for v in (mpp_x, mpp_y) if v is not None]
    values = [v for v in values if math.isfinite(v) and v > 0]
    if not values:
        return None, f"missing: {where} has no usable pixel size"
    mpp = sum(values) / len(values)
    if not is_plausible(mpp):
        return None, _describe_implausible(mpp, where)
    note = ""
    if len(values) == 2 and abs(values[0] - values[1]) > 0.02 * mpp:
        note = f"; x {values[0]:.4g} and y {values[1]:.4g} differ, using their mean"
    return mpp, f"{where}{note}"


def mpp_from_ome_xml(xml: str | None) -> tuple[float | None, str | None]:
    """Pixel size from OME-XML ``Pixels@PhysicalSizeX/Y``; (None, None) when absent."""
    if not xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        values = []
        for axis in ("X", "Y"):
            raw = el.get(f"PhysicalSize{axis}")
            if raw is None:
                continue
            unit = el.get(f"PhysicalSize{axis}Unit", "µm")
            scale = _UNIT_TO_UM.get(unit)
            try:
                v = float(raw)
            except ValueError:
                continue
            if scale is None:
                return None, f"missing: OME-XML PhysicalSize{axis} has an unknown unit {unit!r}"
            values.append(v * scale)
        if not values:
            return None, "missing: OME-XML has no PhysicalSizeX"
        return combine_xy(values[0], values[-1], "slide metadata (OME-XML PhysicalSizeX)")
    return None, None


def mpp_from_tiffslide(properties: dict[str, Any], ome_xml: str | None = None) -> tuple[float | None, str]:
    """Pixel size and where it came from, for a file opened with tiffslide."""
    if ome_xml:
        mpp, source = mpp_from_ome_xml(ome_xml)
        if mpp is not None:
            return mpp, source or ""
    mpp_x = properties.get("tiffslide.mpp-x")
    mpp_y = properties.get("tiffslide.mpp-y")
    vendor = properties.get("tiffslide.vendor")
    if mpp_x is None and mpp_y is None:
        unit = properties.get("tiff.ResolutionUnit")
        if unit is not None and str(unit).upper() == "NONE":
            return None, "missing: the TIFF resolution tags have no unit (ResolutionUnit NONE)"
        if vendor == "aperio":
            return None, "missing: the SVS description has no MPP field and the TIFF has no resolution tags"
        return None, "missing: the file has no pixel-size metadata (no TIFF resolution tags)"
    if vendor == "aperio" and "aperio.MPP" in properties:
        where = "slide metadata (aperio MPP)"
    elif "tiff.XResolution" in properties:
        unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
        where = f"slide metadata (tiffslide.mpp-x, from TIFF XResolution per {unit or 'unit'})"
    else:
        where = "slide metadata (tiffslide.mpp-x)"
    return combine_xy(_as_float(mpp_x), _as_float(mpp_y), where)


def mpp_from_dpi(dpi: Any, fmt: str) -> tuple[float | None, str]:
    """Pixel size from a PIL ``info['dpi']`` tuple (PNG pHYs, JPEG JFIF, TIFF tags)."""
    if not dpi:
        return None, f"missing: the {fmt} file has no pixel-size metadata"
    try:
        dx, dy = (float(dpi[0]), float(dpi[1])) if isinstance(dpi, (tuple, list)) else (float(dpi), float(dpi))
    except (TypeError, ValueError, IndexError):
        return None, f"missing: the {fmt} file has an unreadable resolution field"
    if dx <= 0 or dy <= 0:
        return None, f"missing: the {fmt} file has no pixel-size metadata"
    return combine_xy(25400.0 / dx, 25400.0 / dy, f"{fmt} resolution field")


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
