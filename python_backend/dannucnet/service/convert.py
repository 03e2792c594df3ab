"""Nuclei ↔ proto messages, and rectangles/geometries from requests.

WKB is produced and parsed in bulk with shapely's vectorised functions: for a
response with thousands of nuclei this is most of the serialisation cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from dannucnet.errors import InputError
from dannucnet.geometry.ownership import Rect
from dannucnet.geometry.qupath_stains import Stains
from dannucnet.pipeline.types import Nucleus
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service.limits import MAX_COORDINATE, coordinate
from dannucnet.service.status import invalid
from dannucnet.service.wkb import check_area_wkb


def nuclei_to_proto(nuclei: Sequence[Nucleus]) -> list[pb.Nucleus]:
    if not nuclei:
        return []
    wkbs = shapely.to_wkb(np.asarray([n.polygon for n in nuclei], dtype=object))
    cells = np.empty(len(nuclei), dtype=object)
    cells[:] = [n.cell for n in nuclei]
    cell_wkbs = shapely.to_wkb(cells)  # None stays None: no cell, empty bytes
    return [
        pb.Nucleus(
            id=n.id,
            polygon_wkb=bytes(w),
            probability=float(n.probability),
            measurements={k: float(v) for k, v in n.measurements.items()},
            cell_wkb=bytes(c) if c is not None else b"",
        )
        for n, w, c in zip(nuclei, wkbs, cell_wkbs)
    ]


def nuclei_from_proto(messages: Iterable[pb.Nucleus]) -> list[Nucleus]:
    messages = list(messages)
    if not messages:
        return []
    polygons = shapely.from_wkb([m.polygon_wkb for m in messages])
    cells = shapely.from_wkb([m.cell_wkb or None for m in messages])
    return [
        Nucleus(polygon=poly, probability=m.probability, measurements=dict(m.measurements), id=m.id, cell=cell)
        for m, poly, cell in zip(messages, polygons, cells)
    ]


def stains_to_proto(stains: Stains) -> pb.StainVectors:
    rows = [pb.StainVector(name=n, r=v[0], g=v[1], b=v[2]) for n, v in zip(stains.names, stains.vectors)]
    return pb.StainVectors(name=stains.name, stains=rows[:2] if stains.residual else rows,
                           max_red=stains.background[0], max_green=stains.background[1],
                           max_blue=stains.background[2])


def stains_from_proto(msg: pb.StainVectors) -> Stains:
    """QuPath's ColorDeconvolutionStains from a request; a zero background means 255 (8-bit)."""
    if len(msg.stains) not in (2, 3):
        raise invalid(f"options.stains has {len(msg.stains)} stain vectors: give 2 or 3")
    background = tuple(v if v > 0 else 255.0 for v in (msg.max_red, msg.max_green, msg.max_blue))
    try:
        return Stains.make(msg.name or "Custom", [(s.name or f"Stain {i + 1}", np.array([s.r, s.g, s.b]))
                                                  for i, s in enumerate(msg.stains)], background)
    except InputError as e:
        raise invalid(f"options.stains: {e}") from None


def rect_to_proto(rect: Rect) -> pb.Rect:
    return pb.Rect(x=rect.x, y=rect.y, width=rect.width, height=rect.height)


def rect_from_proto(msg: pb.Rect, name: str) -> Rect:
    values = {"x": msg.x, "y": msg.y, "width": msg.width, "height": msg.height}
    for key, value in values.items():
        if not math.isfinite(value):
            raise invalid(f"{name}.{key} is {value}: it must be a finite number")
    if msg.width <= 0 or msg.height <= 0:
        raise invalid(f"{name} is {msg.width}×{msg.height}: width and height must be positive")
    for key, value in values.items():
        coordinate(value, f"{name}.{key}", lo=-MAX_COORDINATE)
    return Rect(msg.x, msg.y, msg.width, msg.height)


def geometry_from_wkb(data: bytes, name: str) -> BaseGeometry:
    """An area geometry (polygon or multipolygon) from WKB, valid and non-empty.

    The bytes are walked (:func:`~dannucnet.service.wkb.check_area_wkb`) before shapely parses them.
    """
    check_area_wkb(data, name)
    try:
        geom = shapely.from_wkb(data)
    except Exception as exc:  # noqa: BLE001 - shapely.errors.GEOSException and friends
        raise invalid(f"{name} is not valid WKB ({len(data)} bytes): {exc}") from None
    if geom is None or geom.is_empty:
        raise invalid(f"{name} is an empty geometry: send the annotation's polygon")
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise invalid(f"{name} is a {geom.geom_type}; send a Polygon or MultiPolygon (an area)")
    if not geom.is_valid:
        raise invalid(
            f"{name} is not a valid polygon ({shapely.is_valid_reason(geom)}); fix it before sending, "
            "e.g. with JTS GeometryFixer.fix(geometry) or shapely.make_valid"
        )
    xmin, ymin, xmax, ymax = geom.bounds
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
        raise invalid(f"{name} has non-finite coordinates")
    return geom
