"""QuPath GeoJSON: nuclei as detections, written exactly as QuPath reads them.

Checked against qupath/qupath ``qupath-core/src/main/java/qupath/lib/io/QuPathTypeAdapters.java``
(``PathObjectTypeAdapter.parseObject`` and ``MeasurementListTypeAdapter.read``, commit
1489180708c354ff8d67c821c98c65fce97f1081, the 0.5/0.6 line):

* ``id`` is parsed with ``UUID.fromString`` — a random UUID string per object.
* ``properties.objectType`` selects the class: ``"detection"`` → ``createDetectionObject``;
  missing or unknown types silently become annotations, hence always written.
* ``properties.classification`` is a PathClass JSON ``{"name": ..., "color": [r, g, b]}``.
* ``properties.measurements`` is read as an object ``{name: number}`` (or the
  pre-0.4 array of ``{name, value}``); we write the object form. Gson is lenient
  but ``NaN`` is not JSON, so non-finite values are dropped.
* ``properties.metadata`` is a string map; only primitive values are kept.
* ``properties.name`` is the object's name: ours carry ``dannucnet:<model>@<version>``
  (:func:`object_name`) so that a rerun replaces only what we made, never a person's objects.
* Cells (a nucleus with ``Nucleus.cell``): ``objectType: "cell"``, the cell as ``geometry``
  and the nucleus as ``nucleusGeometry`` at the Feature's top level — how
  ``PathObjectTypeAdapter`` writes and reads ``PathCellObject`` at both 0.5.1 and 0.6.0.
* Anything else under ``properties`` is ignored, so nothing else is written there.

The writer streams feature by feature into a temporary file in the output
folder and renames it into place only when everything succeeded: a crash or
error never leaves a truncated GeoJSON that QuPath would choke on.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from dannucnet.atomic import AtomicFile
from dannucnet.errors import InputError, OutputError

if TYPE_CHECKING:  # imported lazily: formats must not pull in the whole pipeline package
    from dannucnet.pipeline.types import Nucleus

NUCLEUS_CLASS = "Nucleus"
NUCLEUS_COLOR = (160, 60, 200)
PROBABILITY_KEY = "Detection probability"
#: Name prefix of every object we write (the same as ``dannucnet.qupath.regions.OWN_TAG_PREFIX``).
OBJECT_NAME_PREFIX = "dannucnet:"


def object_name(metadata: Mapping[str, Any] | None) -> str | None:
    """``dannucnet:<model>@<version>`` from output metadata holding ``model`` and ``model_version``."""
    if not metadata or not metadata.get("model"):
        return None
    version = metadata.get("model_version")
    return f"{OBJECT_NAME_PREFIX}{metadata['model']}" + (f"@{version}" if version else "")

_json_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode

try:  # orjson is ~20x faster on float-heavy features; stdlib json is the fallback
    import orjson as _orjson

    _HAVE_ORJSON = True
except ImportError:  # pragma: no cover - orjson is a declared dependency
    _HAVE_ORJSON = False

_loads: Callable[[bytes], Any]
if _HAVE_ORJSON:

    def _dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj, option=_orjson.OPT_SERIALIZE_NUMPY)

    _loads = _orjson.loads
else:  # pragma: no cover

    def _dumps(obj: Any) -> bytes:
        return _json_encode(obj).encode("utf-8")

    _loads = json.loads


def _ring(ring: Any, ccw: bool) -> list[list[float]]:
    """A closed ring rounded to 0.01 px, oriented, without repeated consecutive points."""
    a = np.round(shapely.get_coordinates(ring), 2)
    if a.shape[0] == 0:
        return []
    if bool(shapely.is_ccw(ring)) != ccw:
        a = a[::-1]
    d = a[1:] != a[:-1]
    if not d.all():
        keep = np.ones(a.shape[0], dtype=bool)
        keep[1:] = d[:, 0] | d[:, 1]
        a = a[keep]
    if a.shape[0] and (a[0, 0] != a[-1, 0] or a[0, 1] != a[-1, 1]):
        a = np.vstack([a, a[:1]])
    return a.tolist()


def _polygon_coords(poly: Polygon) -> list[list[list[float]]]:
    # One orientation for every ring set: exterior counter-clockwise, holes clockwise, in the
    # coordinates as written (RFC 7946 right-hand rule; in QuPath's y-down view that reads clockwise).
    rings = [_ring(poly.exterior, True)]
    rings.extend(_ring(r, False) for r in poly.interiors)
    return [r for r in rings if len(r) >= 4]


def geometry_json(geom: Polygon | MultiPolygon) -> dict[str, Any]:
    """GeoJSON geometry dict of a (Multi)Polygon, QuPath-ready."""
    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": _polygon_coords(geom)}
    if isinstance(geom, MultiPolygon):
        parts = [_polygon_coords(p) for p in geom.geoms if not p.is_empty]
        return {"type": "MultiPolygon", "coordinates": [p for p in parts if p]}
    raise InputError(f"a nucleus must be a Polygon or MultiPolygon, got {geom.geom_type}")


def _clean_measurements(values: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    return out


def nucleus_feature(nucleus: Nucleus, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One nucleus as a QuPath detection Feature.

    The detection probability goes in as the measurement ``Detection probability``
    (the name StarDist uses in QuPath) unless the measurements already have it.
    """
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    feature: dict[str, Any] = {"type": "Feature", "id": _uuid_str(nucleus.id)}
    cell = getattr(nucleus, "cell", None)
    if cell is not None:
        feature["geometry"] = geometry_json(cell)
        feature["nucleusGeometry"] = geometry_json(nucleus.polygon)
    else:
        feature["geometry"] = geometry_json(nucleus.polygon)
    feature["properties"] = _properties(nucleus, meta, object_name(meta))
    return feature


def _properties(nucleus: Nucleus, metadata: dict[str, str] | None, name: str | None = None) -> dict[str, Any]:
    measurements = _clean_measurements(nucleus.measurements)
    try:
        p = float(nucleus.probability)
    except (TypeError, ValueError):
        p = float("nan")
    if PROBABILITY_KEY not in measurements and math.isfinite(p):
        measurements[PROBABILITY_KEY] = p
    props: dict[str, Any] = {"objectType": "cell" if getattr(nucleus, "cell", None) is not None else "detection"}
    if name:
        props["name"] = name
    props.update({
        "classification": {"name": NUCLEUS_CLASS, "color": list(NUCLEUS_COLOR)},
        "measurements": measurements,
    })
    if metadata:
        props["metadata"] = metadata
    return props


def _fast_rings(geoms: list[Any]) -> dict[int, Any]:
    """Exterior rings (rounded to 0.01 px, counter-clockwise, no repeated points) of the simple polygons.

    A ring with a NaN or infinite vertex comes back empty, so it is skipped as degenerate: orjson
    would write the vertex as ``null``, which is not GeoJSON (RFC 7946 positions are numbers).
    Checked here on the coordinates already extracted, as a separate pass costs ~10% of the write.
    """
    polys = np.empty(len(geoms), dtype=object)
    polys[:] = geoms
    simple = (shapely.get_type_id(polys) == 3) & (shapely.get_num_interior_rings(polys) == 0)
    simple &= ~shapely.is_empty(polys)
    rings_of: dict[int, Any] = {}
    if not simple.any():
        return rings_of
    which = np.nonzero(simple)[0]
    ext = shapely.get_exterior_ring(polys[which])
    coords, idx = shapely.get_coordinates(ext, return_index=True)
    coords = np.round(coords, 2)
    with np.errstate(invalid="ignore"):  # a NaN ring: its orientation does not matter, it is dropped
        ccw = shapely.is_ccw(ext)
    bad = ~np.isfinite(coords).all(axis=1)
    non_finite = np.bincount(idx[bad], minlength=which.size) > 0 if bad.any() else np.zeros(which.size, bool)
    ends = np.cumsum(np.bincount(idx, minlength=which.size))
    starts = ends - np.bincount(idx, minlength=which.size)
    dup = np.zeros(coords.shape[0], dtype=bool)
    dup[1:] = (coords[1:, 0] == coords[:-1, 0]) & (coords[1:, 1] == coords[:-1, 1]) & (idx[1:] == idx[:-1])
    has_dup = np.bincount(idx[dup], minlength=which.size) > 0 if dup.any() else np.zeros(which.size, bool)
    for k, i in enumerate(which.tolist()):
        if non_finite[k]:
            rings_of[i] = coords[:0]
            continue
        a = coords[starts[k] : ends[k]]
        if has_dup[k]:
            a = a[~dup[starts[k] : ends[k]]]
        if not ccw[k]:
            a = a[::-1]
        rings_of[i] = np.ascontiguousarray(a) if _HAVE_ORJSON else a.tolist()
    return rings_of


def _geometry_from(ring: Any, geom: Any) -> dict[str, Any] | None:
    """GeoJSON geometry from a fast ring, else from the shapely geometry; None when degenerate or non-finite."""
    if ring is not None:
        return {"type": "Polygon", "coordinates": [ring]} if len(ring) >= 4 else None
    if not np.isfinite(shapely.get_coordinates(geom)).all():  # holes, MultiPolygons: as in _fast_rings
        return None
    out = geometry_json(geom)
    return out if out["coordinates"] else None


def _uuid_str(value: Any) -> str:
    if isinstance(value, str) and len(value) == 36 and value[8] == value[13] == value[18] == value[23] == "-":
        return value.lower()  # already canonical (uuid4 from Nucleus); skip the slow parse
    try:
        return str(uuid.UUID(str(value)))
    except (ValueError, TypeError):
        return str(uuid.uuid4())


def ensure_writable(path: str | os.PathLike[str]) -> Path:
    """Check up front that ``path`` can be created, so no work is wasted on an unwritable output."""
    p = Path(path)
    parent = p.resolve().parent
    if p.is_dir():
        raise OutputError(f"cannot write {p}: it is a folder; give a file name ending in .geojson or .geojson.gz")
    if not parent.is_dir():
        raise OutputError(f"cannot write {p}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {p}: folder {parent} is not writable; choose another output folder")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"cannot write {p}: the existing file is read-only")
    return p


class GeoJSONWriter:
    """Stream nuclei into a QuPath GeoJSON FeatureCollection, atomically.

    ``with GeoJSONWriter(path, metadata) as w: w.write(nuclei)`` — the file
    appears only when the block exits without an exception. Paths ending in
    ``.gz`` are gzip-compressed. ``extra`` members (e.g. a summary) are written
    at the top level after the features.
    """

    def __init__(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None,
                 compresslevel: int = 3) -> None:
        self.path = ensure_writable(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.count = 0
        # degenerate polygons (fewer than 3 distinct points after rounding) or non-finite vertices
        self.skipped = 0
        self.extra: dict[str, Any] = {}
        self._gzip = self.path.name.lower().endswith(".gz")  # as the Parquet check: x.GEOJSON.GZ was plain text
        self._compresslevel = compresslevel
        self._file: AtomicFile | None = None
        self._fh: IO[bytes] | gzip.GzipFile | None = None
        self._raw: IO[bytes] | None = None

    def __enter__(self) -> GeoJSONWriter:
        self.open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        self._file = AtomicFile(self.path)
        try:
            raw = self._file.open("wb", buffering=1 << 20)
            self._raw = raw
            fh = (gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=self._compresslevel, mtime=0)
                  if self._gzip else raw)
            self._fh = fh
            fh.write(b'{"type":"FeatureCollection","features":[')
        except BaseException:  # ``with`` calls __exit__ only once __enter__ has returned
            self.abort()
            raise

    def write(self, nuclei: Iterable[Nucleus]) -> int:
        """Append nuclei; returns how many were written.

        Works in batches so the polygon work (rounding, orientation) is done by
        vectorised shapely/numpy calls rather than per nucleus.
        """
        n = 0
        batch: list[Nucleus] = []
        for nucleus in nuclei:
            batch.append(nucleus)
            if len(batch) >= 4096:
                n += self.write_features(self._batch_features(batch))
                batch = []
        if batch:
            n += self.write_features(self._batch_features(batch))
        return n

    def _batch_features(self, batch: list[Nucleus]) -> Iterator[dict[str, Any]]:
        rings_of = _fast_rings([b.polygon for b in batch])
        cells = [getattr(b, "cell", None) for b in batch]
        has_cell = [i for i, c in enumerate(cells) if c is not None]
        cell_rings = _fast_rings([cells[i] for i in has_cell]) if has_cell else {}
        cell_ring_of = {i: cell_rings.get(k) for k, i in enumerate(has_cell)}
        meta = self.metadata or None
        name = object_name(meta)
        for i, nucleus in enumerate(batch):
            geom = _geometry_from(rings_of.get(i), nucleus.polygon)
            if geom is None:
                self.skipped += 1
                continue
            feature: dict[str, Any] = {"type": "Feature", "id": _uuid_str(nucleus.id)}
            if cells[i] is not None:
                cell_geom = _geometry_from(cell_ring_of.get(i), cells[i])
                if cell_geom is None:
                    self.skipped += 1
                    continue
                feature["geometry"] = cell_geom
                feature["nucleusGeometry"] = geom
            else:
                feature["geometry"] = geom
            feature["properties"] = _properties(nucleus, meta, name)
            yield feature

    def write_features(self, features: Iterable[Mapping[str, Any]]) -> int:
        """Append already-built Feature dicts."""
        if self._fh is None:
            raise OutputError("GeoJSONWriter is not open; use it as a context manager")
        fh = self._fh
        n = 0
        for f in features:
            fh.write(b"\n" if self.count == 0 else b",\n")
            fh.write(_dumps(f))
            self.count += 1
            n += 1
        return n

    def close(self) -> Path:
        """Finish the collection and move it into place."""
        if self._fh is None or self._file is None:
            raise OutputError("GeoJSONWriter is not open")
        try:
            fh = self._fh
            fh.write(b"\n]")
            for k, v in self.extra.items():
                fh.write(b"," + _dumps(str(k)) + b":" + _dumps(v))
            fh.write(b"}\n")
            if fh is not self._raw:
                fh.close()  # writes the gzip trailer; leaves the underlying file open
            self._fh = None
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None
        except BaseException:
            self.abort()
            raise
        file, self._file, self._raw = self._file, None, None
        file.commit()  # flush, fsync, rename; removes the temporary file if that fails
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the output path is left untouched."""
        try:
            if self._fh is not None and self._fh is not self._raw:
                try:
                    self._fh.close()
                except Exception:  # noqa: BLE001 - closing after a failure: the first error is reported
                    pass
        finally:
            self._fh = None
            self._raw = None
            if self._file is not None:
                self._file.abort()
                self._file = None


def read_features(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Features of a GeoJSON file (.geojson or .geojson.gz): FeatureCollection, Feature or array."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"GeoJSON file not found: {p}")
    try:
        with open(p, "rb") as fh:
            head = fh.read(2)
        with (gzip.open(p, "rb") if head == b"\x1f\x8b" else open(p, "rb")) as fh:
            data = _loads(fh.read())
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{p.name} is not valid GeoJSON (corrupt or truncated): {e}") from None
    if isinstance(data, list):
        return [f for f in data if isinstance(f, dict)]
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection":
            features = data.get("features", [])
            if not isinstance(features, list):
                raise InputError(f"{p.name} holds no GeoJSON features list (its \"features\" is "
                                 f"{type(features).__name__}); give a file written by 'dannucnet segment' or QuPath")
            return [f for f in features if isinstance(f, dict)]
        if data.get("type") == "Feature":
            return [data]
    raise InputError(f"{p.name} holds no GeoJSON features (expected a FeatureCollection, Feature or array)")


def features_to_nuclei(features: Iterable[Mapping[str, Any]]) -> list[Nucleus]:
    """Polygon features back to :class:`Nucleus` objects (other geometry types are skipped).

    Cells (a ``nucleusGeometry`` beside the ``geometry``) come back with ``polygon`` the
    nucleus and ``cell`` the cell, so a written file reads back as it was written.
    """
    from shapely.geometry import shape

    from dannucnet.pipeline.types import Nucleus

    def area_shape(geom: Any, f: Mapping[str, Any]) -> Any:
        if not isinstance(geom, Mapping) or geom.get("type") not in ("Polygon", "MultiPolygon"):
            return None
        try:
            return shape(geom)
        except (ValueError, TypeError, AttributeError, IndexError) as e:
            raise InputError(f"feature {f.get('id', '?')} has an unreadable geometry: {e}") from None

    out: list[Nucleus] = []
    for f in features:
        poly = area_shape(f.get("geometry"), f)
        if poly is None:
            continue
        cell = None
        nucleus = area_shape(f.get("nucleusGeometry"), f)
        if nucleus is not None:  # a QuPath cell: geometry is the cell, nucleusGeometry its nucleus
            poly, cell = nucleus, poly
        props = f.get("properties")
        if not isinstance(props, Mapping):  # malformed like other parts: ignored, as non-map measurements are
            props = {}
        raw_meas = props.get("measurements")
        meas = _clean_measurements(raw_meas or {}) if isinstance(raw_meas, dict) else {}
        prob = meas.get(PROBABILITY_KEY, float("nan"))
        kwargs: dict[str, Any] = {}
        if f.get("id"):
            kwargs["id"] = str(f["id"])
        out.append(Nucleus(polygon=poly, probability=prob, measurements=meas, cell=cell, **kwargs))
    return out
