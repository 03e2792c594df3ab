"""MoNuSeg / Aperio ImageScope XML nucleus annotations → shapely polygons.

Coordinates. A ``<Vertex X=.. Y=..>`` is read, as the MoNuSeg label maps
read it, as the *centre* of 0-based pixel column X, row Y. This project uses
QuPath's pixel-edge convention (pixel (c, r) is the square [c, c+1) x [r, r+1),
its centre at (c + 0.5, r + 0.5)), so every vertex is moved by +0.5 px in x
and y: rasterising the returned polygons at pixel centres then selects the
pixels whose centres lie inside the raw XML polygon, which is the convention
of the dataset's ``labels/`` (MATLAB ``poly2mask``'s 1-based reading, which
the organisers' own masks used, sits one pixel up-left; the shipped labels
undo that with a +1/+1 shift).

One more detail decides pixel centres that lie *exactly* on an outline
(every vertex of TCGA-B0-5710 is an integer, many others are multiples of
0.1): ``poly2mask`` keeps such pixels on the right and bottom edges and drops
them on the left and top, the opposite of our half-open rasteriser. A nudge of
1/1000 px reproduces poly2mask's choice without moving anything measurably.
Offset search against ``labels/`` on the 13 XMLs (foreground Dice, lowest to
highest file): +0 -> 0.909-0.974, +1.0 -> 0.955-0.986, +0.5 -> 0.919-0.998
(only B0-5710 below 0.98), +0.5005 -> 0.996-0.998, +0.55 -> 0.994-0.998.
Hence the default offset 0.501.

Regions are implicitly closed; regions with fewer than 3 vertices are
skipped; self-intersecting outlines are repaired with ``make_valid`` (keeping
the largest polygon part). Coordinates slightly outside the image are kept
here and clipped by whoever rasterises into an image of known size.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import shapely
import shapely.errors
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from dannucnet.errors import InputError

# Shift from the XML's pixel-centre reading to QuPath's pixel-edge coordinates...
PIXEL_CENTRE_OFFSET = 0.5
# ...plus a hair, so centres exactly on an outline fall as in poly2mask (right/bottom edges inside).
EDGE_TIE_NUDGE = 1e-3
DEFAULT_OFFSET = PIXEL_CENTRE_OFFSET + EDGE_TIE_NUDGE


def _parse(path: str | os.PathLike[str]) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except FileNotFoundError as exc:
        raise InputError(f"annotation file {path} does not exist") from exc
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{path} is not a readable Aperio/MoNuSeg XML file: {exc}") from exc


def _largest_polygon(geom: BaseGeometry) -> Polygon | None:
    """The biggest polygonal part of a repaired outline.

    A hand-drawn outline that crosses itself becomes a MultiPolygon (or a
    collection with stray lines) after ``make_valid``; one nucleus must stay
    one object, and the small loops are drawing slips, not nuclei.
    """
    if isinstance(geom, Polygon):
        return geom if not geom.is_empty else None
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    polys: list[Polygon] = []
    for part in parts:
        polys.extend(part.geoms if isinstance(part, MultiPolygon) else [part])
    polys = [p for p in polys if not p.is_empty and p.area > 0]
    return max(polys, key=lambda p: p.area) if polys else None


def read_monuseg_xml(path: str | os.PathLike[str], offset: float = DEFAULT_OFFSET) -> list[Polygon]:
    """Nucleus polygons of one XML file, in XML order, in pixel-edge coordinates.

    ``offset`` is added to every coordinate (default +0.501, see the module
    docstring); pass 0 to get the raw XML numbers. Degenerate regions (< 3
    vertices, or zero area after repair) are left out, so the list may be
    shorter than the number of ``<Region>`` elements.
    """
    root = _parse(path)
    regions = root.findall("./Annotation/Regions/Region")
    if not regions and root.tag != "Annotations":
        raise InputError(f"{path}: no <Annotations> root; is it an Aperio ImageScope / MoNuSeg annotation file?")
    rings: list[np.ndarray] = []
    for region in regions:
        try:
            coords = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.findall("./Vertices/Vertex")]
        except (KeyError, ValueError) as exc:
            region_id = region.attrib.get("Id", "?")
            raise InputError(f"{path}: region {region_id} has a vertex without numeric X/Y: {exc}") from exc
        if not np.isfinite(coords).all():  # float() reads "nan" and "inf": GEOS failed, or made a nonsense outline
            raise InputError(f"{path}: region {region.attrib.get('Id', '?')} has a vertex whose X or Y is not a "
                             "finite number (nan or inf); correct or delete that region")
        if len(coords) >= 3:
            rings.append(np.asarray(coords, dtype=np.float64) + offset)
    polygons = np.array([shapely.polygons(ring) for ring in rings], dtype=object)
    if polygons.size:
        invalid = ~shapely.is_valid(polygons)
        if invalid.any():
            polygons[invalid] = _repair(polygons[invalid])
    return [p for p in polygons if p is not None and not p.is_empty and p.area > 0]


def _repair(polygons: np.ndarray) -> list[Polygon | None]:
    """Make hand-drawn outlines valid, one polygon each.

    About half of the MoNuSeg outlines touch or cross themselves. GEOS's
    "structure" method is ~20x faster than the default "linework" on these
    dense outlines and gives the same areas; older GEOS lacks it.
    """
    try:
        repaired = shapely.make_valid(polygons, method="structure", keep_collapsed=False)
    except (ValueError, TypeError, shapely.errors.GEOSException):
        repaired = shapely.make_valid(polygons)
    return [_largest_polygon(g) for g in repaired]


def microns_per_pixel(path: str | os.PathLike[str]) -> float | None:
    """The root's ``MicronsPerPixel`` attribute, or None when absent or not a plausible calibration."""
    root = _parse(path)
    value = root.attrib.get("MicronsPerPixel")
    if value is None:
        return None
    try:
        mpp = float(value)
    except ValueError:
        return None
    # Same plausibility window as the slide readers: outside it, it is a dpi tag, not a calibration.
    return mpp if 0.05 <= mpp <= 10 else None


def annotation_path_for(image_path: str | os.PathLike[str]) -> Path | None:
    """``annotations/<stem>.xml`` beside an ``images/`` folder, if it exists (MoNuSeg layout)."""
    image_path = Path(image_path)
    candidate = image_path.parent.parent / "annotations" / f"{image_path.stem}.xml"
    return candidate if candidate.exists() else None
