"""A structural check of client WKB, in pure Python, before any geometry library sees it.

GEOS parses WKB recursively; a GeometryCollection nested 20,000 levels deep
(≈ 180 kB) overflows its C stack and kills the whole server (5,000 levels still
parse). So ``clipWkb`` and ``roiWkb`` are walked here first, byte by byte:
only Polygon and MultiPolygon (of Polygons) pass — nesting is at most two
levels by construction — every count must fit in the bytes that remain (a
count of 2^32 − 1 allocates nothing), the vertex and part totals are bounded
(:data:`~dannucnet.service.limits.MAX_WKB_VERTICES`,
:data:`~dannucnet.service.limits.MAX_WKB_PARTS`), every coordinate is finite
and within ±2^31, and no byte may follow the geometry.

Accepted encodings: ISO WKB (types 3 / 6, +1000 Z, +2000 M, +3000 ZM) and
PostGIS EWKB flags (Z 0x80000000, M 0x40000000, SRID 0x20000000), in either
byte order — what JTS's ``WKBWriter`` (QuPath) and shapely write.
"""

from __future__ import annotations

import struct

import numpy as np

from dannucnet.service.limits import MAX_COORDINATE, MAX_WKB_PARTS, MAX_WKB_VERTICES
from dannucnet.service.status import invalid

POLYGON, MULTIPOLYGON = 3, 6
_NAMES = {1: "Point", 2: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString", 6: "MultiPolygon",
          7: "GeometryCollection"}
_EWKB_Z, _EWKB_M, _EWKB_SRID = 0x80000000, 0x40000000, 0x20000000


class _Reader:
    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name, self.pos = data, name, 0
        self.vertices = self.parts = 0

    def fail(self, why: str):
        return invalid(f"{self.name} is not valid area WKB ({len(self.data):,} bytes): {why}")

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise self.fail(f"it ends at byte {len(self.data):,} where {self.pos + size:,} are needed (truncated)")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def count(self, order: str, item_bytes: int, what: str) -> int:
        (n,) = struct.unpack(order + "I", self.take(4))
        if n * item_bytes > len(self.data) - self.pos:
            left = len(self.data) - self.pos
            raise self.fail(f"it declares {n:,} {what} but only {left:,} bytes follow (truncated?)")
        return n


def check_area_wkb(data: bytes, name: str) -> None:
    """Raise INVALID_ARGUMENT unless ``data`` is one well-formed, bounded Polygon or MultiPolygon."""
    reader = _Reader(bytes(data), name)
    kind = _geometry(reader, top=True)
    if reader.pos != len(reader.data):
        raise reader.fail(f"{len(reader.data) - reader.pos:,} bytes follow the {_NAMES[kind]}")


def _header(reader: _Reader) -> tuple[str, int, int]:
    """Byte order, geometry type (1-7) and coordinate dimensions of the geometry at the cursor."""
    order_byte = reader.take(1)[0]
    if order_byte not in (0, 1):
        raise reader.fail(f"byte-order flag {order_byte} at byte {reader.pos - 1} (must be 0 or 1)")
    order = "<" if order_byte == 1 else ">"
    (raw,) = struct.unpack(order + "I", reader.take(4))
    dims = 2 + bool(raw & _EWKB_Z) + bool(raw & _EWKB_M)
    if raw & _EWKB_SRID:
        reader.take(4)
    code = raw & 0x0FFFFFFF
    iso, kind = divmod(code, 1000)
    if iso > 3 or (iso and raw & (_EWKB_Z | _EWKB_M)):
        raise reader.fail(f"unknown geometry type code {raw}")
    dims += {0: 0, 1: 1, 2: 1, 3: 2}[iso]
    return order, kind, dims


def _geometry(reader: _Reader, top: bool) -> int:
    order, kind, dims = _header(reader)
    if kind == POLYGON:
        _polygon(reader, order, dims)
    elif kind == MULTIPOLYGON and top:
        for _ in range(reader.count(order, 9, "polygons")):  # each at least byte order + type + ring count
            _bump(reader, "parts", 1)
            if _geometry(reader, top=False) != POLYGON:
                raise reader.fail("a MultiPolygon may only hold Polygons")
    else:
        what = _NAMES.get(kind, f"geometry type {kind}")
        inside = "" if top else " inside a MultiPolygon"
        raise reader.fail(f"it holds a {what}{inside}; send a Polygon or MultiPolygon (an area)")
    return kind


def _polygon(reader: _Reader, order: str, dims: int) -> None:
    for _ in range(reader.count(order, 4, "rings")):
        _bump(reader, "parts", 1)
        points = reader.count(order, 8 * dims, "points")
        _bump(reader, "vertices", points)
        coords = np.frombuffer(reader.take(8 * dims * points), dtype=np.dtype(order + "f8"))
        if not np.all(np.isfinite(coords)):
            raise reader.fail("a coordinate is NaN or infinite")
        if coords.size and float(np.abs(coords).max()) > MAX_COORDINATE:
            raise reader.fail(f"a coordinate lies beyond ±{MAX_COORDINATE:,.0f} (level-0 pixels)")


def _bump(reader: _Reader, what: str, n: int) -> None:
    total = getattr(reader, what) + n
    setattr(reader, what, total)
    limit = MAX_WKB_VERTICES if what == "vertices" else MAX_WKB_PARTS
    if total > limit:
        raise reader.fail(f"more than {limit:,} {what} (this server's limit)")
