"""GBM40 (40 glioblastoma tiles) read as an instance dataset, in place.

Layout::

    raw_image/NN.tif                      RGB uint8, 512²
    contour_annotation_xml/NN_data.xml    one ``<Shape>`` per nucleus, from an image-annotation tool

Shapes seen in the 40 files: ``Polygon`` (4874), ``SmoothPolygon`` (102, all in
01) — both ``<Data><Points><Point X Y/>`` — and ``Oval`` (3) — ``<Data><Extent
X Y Width Height/>``, the ellipse inscribed in that box. ``<Data Rotation="deg">``
(9 shapes) turns the shape about the centre of its bounding box, clockwise on
screen (y down). A SmoothPolygon is a smoothed curve through its points; its
points are used as the polygon (they are dense, ≈ 1.5 px apart).

Coordinates: read, like MoNuSeg's XML, as pixel *centres* (+0.5 px onto
QuPath's pixel-edge coordinates). Measured: mean image gradient on the ring
just outside the rasterised nuclei (10 images) is 104.9 / 116.2 / 125.6 /
129.5 / 126.1 for shifts −1 / −0.5 / 0 / +0.5 / +1 px; the same measure on
MoNuSeg, whose +0.5 is verified against its label maps, peaks between 0 and
+0.5, so +0.5 fits GBM40 and a raw (edge) reading would sit half a pixel
up-left. Rasterised like every polygon in the project, at pixel centres; where
two contours overlap the earlier keeps the pixel. Median nucleus 511 px
(MoNuSeg at 0.25 µm/px: similar), so 40×, 0.25 µm/px, is assumed: the data set
does not state it.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon

from dannucnet.errors import InputError
from dannucnet.formats.dataset import Dataset, Sample, read_rgb

IMAGES, XMLS = "raw_image", "contour_annotation_xml"
GBM40_MPP = 0.25  # assumed (see the module docstring)
OVAL_VERTICES = 64
#: XML numbers are pixel centres; QuPath coordinates are pixel edges (see the module docstring).
PIXEL_CENTRE_OFFSET = 0.5


def is_gbm40(root: Path) -> bool:
    return (root / IMAGES).is_dir() and (root / XMLS).is_dir()


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    if not degrees % 360:
        return points
    centre = (points.min(axis=0) + points.max(axis=0)) / 2
    a = math.radians(degrees)
    turn = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    return (points - centre) @ turn + centre


def _shape_points(shape: ET.Element, path: Path) -> np.ndarray | None:
    data = shape.find("Data")
    if data is None:
        return None
    try:
        rotation = float(data.attrib.get("Rotation", 0))
        extent = data.find("Extent")
        oval = shape.attrib.get("Type") == "Oval" and extent is not None
        if oval and extent is not None:
            numbers = np.array([float(extent.attrib[k]) for k in ("X", "Y", "Width", "Height")])
        else:
            numbers = np.array([(float(p.attrib["X"]), float(p.attrib["Y"])) for p in data.iter("Point")])
    except (KeyError, ValueError) as exc:
        raise InputError(f"{path}: a shape has a point or extent without numeric coordinates: {exc}") from exc
    if not (math.isfinite(rotation) and np.isfinite(numbers).all()):  # float() reads "nan", "inf": GEOS then failed
        raise InputError(f"{path}: a shape has a coordinate, size or rotation that is not a finite number "
                         "(nan or inf); correct or delete that shape")
    points = numbers
    if oval:
        x, y, w, h = numbers
        t = np.linspace(0, 2 * np.pi, OVAL_VERTICES, endpoint=False)
        points = np.stack([x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))], axis=1)
    return _rotate(points, rotation) + PIXEL_CENTRE_OFFSET if len(points) >= 3 else None


def read_gbm40_xml(path: Path) -> list[Polygon]:
    """Nucleus polygons of one annotation file, in file order, in pixel-edge coordinates (+0.5 applied)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{path} is not a readable GBM40 annotation XML file: {exc}") from exc
    polygons = []
    for shape in root.iter("Shape"):
        points = _shape_points(shape, path)
        if points is None:
            continue
        polygon = shapely.make_valid(Polygon(points)) if not Polygon(points).is_valid else Polygon(points)
        if polygon.geom_type != "Polygon":
            parts = [g for g in getattr(polygon, "geoms", []) if g.geom_type == "Polygon"]
            polygon = max(parts, key=lambda g: g.area) if parts else None
        if polygon is not None and polygon.area > 0:
            polygons.append(polygon)
    return polygons


class Gbm40Sample(Sample):
    """``label_path`` is the contour XML; labels are rasterised on reading."""

    def load_labels(self) -> np.ndarray:
        from dannucnet.geometry.rasterize import rasterize_polygons

        height, width = read_rgb(self.image_path).shape[:2]
        return rasterize_polygons(read_gbm40_xml(self.label_path), (height, width))


def load_gbm40(root: Path) -> Dataset:
    samples: list[Sample] = []
    for image_path in sorted((root / IMAGES).glob("*.tif")):
        xml = root / XMLS / f"{image_path.stem}_data.xml"
        if xml.exists():
            samples.append(Gbm40Sample(stem=image_path.stem, image_path=image_path, label_path=xml,
                                       organ="brain (glioblastoma)", mpp=GBM40_MPP))
    if not samples:
        raise InputError(f"{root}: no '{IMAGES}/NN.tif' with a matching '{XMLS}/NN_data.xml'")
    info = {"format": "gbm40", "mpp": GBM40_MPP,
            "provenance": {"name": "GBM40 (pengyzhang/cell_seg_matlab)", "licence": "none stated; research data"}}
    return Dataset(root=root, samples=samples, splits={}, mpp=GBM40_MPP, meta=info)
