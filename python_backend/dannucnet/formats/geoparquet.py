"""Nuclei as GeoParquet: one row per nucleus, columns per measurement.

GeoJSON is what QuPath reads, but a slide with 10^6 nuclei makes a ~1 GB text
file that every analysis has to parse whole. GeoParquet (1.1) keeps the same
nuclei as WKB polygons next to typed measurement columns, compressed, readable
column by column by pandas/geopandas/DuckDB/QGIS. The writer streams row groups,
so memory stays flat however many nuclei a slide has, and like
:class:`~dannucnet.formats.geojson.GeoJSONWriter` it is atomic: the file appears
only when writing finished.

With cells (``Nucleus.cell``), as in QuPath's GeoJSON, ``geometry`` is the cell
and a second WKB column ``nucleus_geometry`` holds its nucleus; both are declared
in the ``geo`` metadata. The measurement columns are the GeoJSON's measurements;
one named like the writer's own columns (:data:`OWN_COLUMNS`) is refused, since a
second ``id`` column makes the file unreadable by name (pyarrow: ``Multiple matches
for FieldRef.Name(id)``).

Nuclei and cells may be Polygons or MultiPolygons, as in the GeoJSON; the ``geo``
metadata's ``geometry_types`` lists the types actually written, so it is added when
the file is closed (``store_schema=False``: pyarrow would otherwise read the schema
copy taken when the file was opened, before any type was known).

Coordinates are level-0 pixels (x right, y down) of the source image, the same
as the GeoJSON; there is no geographic CRS, so the ``crs`` is null, which
GeoParquet defines as "undefined".
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from dannucnet.atomic import AtomicFile
from dannucnet.errors import OutputError
from dannucnet.formats.geojson import PROBABILITY_KEY, ensure_writable
from dannucnet.pipeline.types import Nucleus

__all__ = ["GeoParquetWriter", "read_geoparquet", "require_pyarrow", "PARQUET_SUFFIXES", "OWN_COLUMNS"]

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".geoparquet")
#: Nuclei per row group: big enough for good compression, small enough to keep memory flat.
ROW_GROUP = 65_536
GEO_VERSION = "1.1.0"
NUCLEUS_COLUMN = "nucleus_geometry"
#: Columns the writer makes itself; a measurement may not take one of these names.
OWN_COLUMNS = ("id", "geometry", NUCLEUS_COLUMN, "centroid_x", "centroid_y")
#: shapely type ids of the area geometries written (the GeoJSON writer's Polygon and MultiPolygon).
_AREA_TYPES = {3: "Polygon", 6: "MultiPolygon"}


def require_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OutputError(
            "GeoParquet output needs pyarrow: pip install 'dannucnet[parquet]' (or write .geojson.gz instead)"
        ) from None
    return pa, pq


class GeoParquetWriter:
    """Stream nuclei into a GeoParquet file; same use as ``GeoJSONWriter``.

    Measurement columns are fixed by the first nuclei written (every nucleus of
    one run carries the same measurements); a nucleus lacking one gets a null.
    """

    def __init__(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> None:
        self._pa, self._pq = require_pyarrow()
        self.path = ensure_writable(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.count = 0
        self.skipped = 0  # empty or non-polygonal geometries, or non-finite vertices
        self.extra: dict[str, Any] = {}
        self._columns: list[str] | None = None
        self._cells = False  # fixed with the columns: geometry = cell, nucleus_geometry = nucleus
        self._pending: list[Nucleus] = []
        self._writer: Any = None
        self._file: AtomicFile | None = None
        self._unknown_warned: set[str] = set()
        self._types: dict[str, set[str]] = {"geometry": set(), NUCLEUS_COLUMN: set()}  # for the geo metadata

    def __enter__(self) -> GeoParquetWriter:
        self.open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        self._file = AtomicFile(self.path)  # pyarrow writes to its name

    def write(self, nuclei: Iterable[Nucleus]) -> int:
        """Queue nuclei, writing a row group whenever enough are queued; returns how many were queued.

        Degenerate geometries are dropped when their row group is written (counted in ``skipped``).
        """
        if self._file is None:
            raise OutputError("GeoParquetWriter is not open; use it as a context manager")
        n = 0
        for nucleus in nuclei:
            self._pending.append(nucleus)
            n += 1
            if len(self._pending) >= ROW_GROUP:
                self._flush(self._file)
        return n

    def _schema(self, columns: list[str]) -> Any:
        pa = self._pa
        fields = [pa.field("id", pa.string()), pa.field("geometry", pa.binary())]
        if self._cells:
            fields.append(pa.field(NUCLEUS_COLUMN, pa.binary()))
        fields += [pa.field("centroid_x", pa.float64()), pa.field("centroid_y", pa.float64())]
        fields += [pa.field(c, pa.float64()) for c in columns]
        return pa.schema(fields)

    def _open_writer(self, file: AtomicFile, columns: list[str]) -> list[str]:
        clash = [c for c in columns if c in OWN_COLUMNS]
        if clash:
            raise OutputError(
                f"cannot write {self.path.name}: measurement {clash[0]!r} has the name of one of the file's own "
                f"columns ({', '.join(OWN_COLUMNS)}); rename the measurement or write .geojson instead"
            )
        self._columns = columns
        try:  # no stored Arrow schema: the metadata added at close is what every reader sees
            self._writer = self._pq.ParquetWriter(str(file.tmp), self._schema(columns), compression="zstd",
                                                  store_schema=False)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None
        return columns

    def _metadata(self) -> dict[str, str]:
        """The ``geo`` and ``dannucnet`` file metadata, with the geometry types written so far."""
        def wkb(column: str) -> dict[str, Any]:
            return {"encoding": "WKB", "geometry_types": sorted(self._types[column]), "crs": None, "edges": "planar"}

        geo_columns = {"geometry": wkb("geometry"), **({NUCLEUS_COLUMN: wkb(NUCLEUS_COLUMN)} if self._cells else {})}
        geo = {"version": GEO_VERSION, "primary_column": "geometry", "columns": geo_columns}
        return {"geo": json.dumps(geo), "dannucnet": json.dumps(self.metadata)}

    def _flush(self, file: AtomicFile) -> int:
        batch, self._pending = self._pending, []
        if not batch:
            return 0
        polys = np.empty(len(batch), dtype=object)
        polys[:] = [b.polygon for b in batch]
        cells = np.empty(len(batch), dtype=object)
        cells[:] = [b.cell for b in batch]
        cell_ids = shapely.get_type_id(cells)  # -1 for no cell
        ok = np.isin(shapely.get_type_id(polys), list(_AREA_TYPES)) & ~shapely.is_empty(polys)
        ok &= (cell_ids == -1) | (np.isin(cell_ids, list(_AREA_TYPES)) & ~shapely.is_empty(cells))
        ok &= _finite(polys) & _finite(cells)
        self.skipped += int((~ok).sum())
        keep = [b for b, good in zip(batch, ok) if good]
        if not keep:
            return 0
        polys, cells, cell_ids = polys[ok], cells[ok], cell_ids[ok]
        columns = self._columns
        if columns is None:
            self._cells = any(b.cell is not None for b in keep)
            names = [PROBABILITY_KEY] if PROBABILITY_KEY not in keep[0].measurements else []
            columns = self._open_writer(file, names + list(keep[0].measurements))
        known = set(columns)
        for b in keep:
            for key in b.measurements.keys() - known - self._unknown_warned:
                self._unknown_warned.add(key)
                log.warning("measurement %r appeared after the columns were fixed; not written to %s", key,
                            self.path.name)
        values = {c: np.full(len(keep), np.nan) for c in columns}
        for i, b in enumerate(keep):
            for c, v in b.measurements.items():
                if c in values:
                    values[c][i] = _number(v)
            if PROBABILITY_KEY not in b.measurements and PROBABILITY_KEY in values:
                values[PROBABILITY_KEY][i] = _number(b.probability)
        centroids = shapely.get_coordinates(shapely.centroid(polys))  # the nucleus centroid, as ownership uses
        pa = self._pa
        arrays = [pa.array([str(b.id) for b in keep], pa.string())]
        poly_types = {_AREA_TYPES[t] for t in shapely.get_type_id(polys).tolist()}
        if self._cells:
            cell_wkb = [None if c is None else w for c, w in zip(cells, shapely.to_wkb(cells))]
            arrays += [pa.array(cell_wkb, pa.binary()), pa.array(shapely.to_wkb(polys), pa.binary())]
            self._types["geometry"] |= {_AREA_TYPES[t] for t in cell_ids.tolist() if t != -1}
            self._types[NUCLEUS_COLUMN] |= poly_types
        else:
            arrays.append(pa.array(shapely.to_wkb(polys), pa.binary()))
            self._types["geometry"] |= poly_types
        arrays += [pa.array(centroids[:, 0]), pa.array(centroids[:, 1])]
        arrays += [pa.array(values[c], mask=np.isnan(values[c])) for c in columns]
        table = pa.Table.from_arrays(arrays, schema=self._writer.schema)
        try:
            self._writer.write_table(table)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None
        self.count += len(keep)
        return len(keep)

    def close(self) -> Path:
        """Write the last row group and the footer, then move the file into place."""
        if self._file is None:
            raise OutputError("GeoParquetWriter is not open")
        try:
            self._flush(self._file)
            if self._writer is None:  # no nucleus at all: still a valid, empty file
                self._open_writer(self._file, [PROBABILITY_KEY])
            if self.extra:
                log.debug("GeoParquet has no place for %s; summary stays in the GeoJSON/record", list(self.extra))
            self._writer.add_key_value_metadata(self._metadata())
            self._writer.close()
            self._writer = None
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None
        except BaseException:
            self.abort()
            raise
        file, self._file = self._file, None
        file.commit()  # fsync, rename; removes the temporary file if that fails
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the output path is left untouched."""
        try:
            if self._writer is not None:
                try:
                    self._writer.close()
                except Exception:  # noqa: BLE001 - closing after a failure: the first error is reported
                    pass
        finally:
            self._writer = None
            self._pending = []
            if self._file is not None:
                self._file.abort()
                self._file = None


def _finite(geoms: np.ndarray) -> np.ndarray:
    """True for each geometry (or None) whose vertices are all finite.

    A NaN or infinite vertex has no centroid (shapely gives an empty point, one row short of
    the batch) and the GeoJSON writer skips it, as it cannot be written as JSON; so do we.
    """
    coords, idx = shapely.get_coordinates(geoms, return_index=True)
    ok = np.ones(len(geoms), dtype=bool)
    ok[idx[~np.isfinite(coords).all(axis=1)]] = False
    return ok


def _number(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def read_geoparquet(path: str | os.PathLike[str]) -> tuple[list[Nucleus], dict[str, Any]]:
    """Nuclei and the file's ``geo``/``dannucnet`` metadata (for tests and small files; use pyarrow for big ones)."""
    _, pq = require_pyarrow()
    table = pq.read_table(str(path))
    meta = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items() if k in (b"geo", b"dannucnet")}
    cols = table.to_pydict()
    skip = set(OWN_COLUMNS)
    names = [c for c in table.column_names if c not in skip]
    geoms = shapely.from_wkb(np.array(cols["geometry"], dtype=object))
    nuclei = shapely.from_wkb(np.array(cols[NUCLEUS_COLUMN], dtype=object)) if NUCLEUS_COLUMN in cols else None
    out = []
    for i, geom in enumerate(geoms):
        m = {c: cols[c][i] for c in names if cols[c][i] is not None}
        poly, cell = (geom, None) if nuclei is None else (nuclei[i], geom)
        out.append(Nucleus(polygon=poly, probability=float(m.get(PROBABILITY_KEY, math.nan)), measurements=m,
                           id=cols["id"][i], cell=cell))
    return out, meta
