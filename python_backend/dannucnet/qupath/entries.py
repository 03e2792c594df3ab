"""Plain data a QuPath project entry boils down to, and the facts read from its files.

Why plain types: QuPath (and so paquo) cannot run in CI, so every decision the
paquo utilities make is taken on these dataclasses. The paquo adapter
(:mod:`dannucnet.qupath.project`) only copies values into them; tests build them
directly from synthetic slides.

Also here: ``file:`` URI → local path (with the "image moved" message), pixel
size from QuPath's stored server metadata, and the bounds offset between QuPath
coordinates and the pixels tiffslide reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlsplit

from shapely.geometry.base import BaseGeometry

from dannucnet.errors import InputError
from dannucnet.slides.mpp import is_plausible

ANNOTATION = "annotation"
DETECTION = "detection"

_MICRON_UNITS = {"µm", "um", "\u03bcm", "micron", "microns", "micrometer", "micrometre"}


@dataclass(frozen=True)
class ObjectData:
    """One QuPath path object: its kind, geometry (level-0 px, QuPath coordinates) and labels."""

    kind: str
    geometry: BaseGeometry
    class_name: str | None = None
    name: str | None = None
    id: str | None = None


@dataclass
class ImageEntryData:
    """What the paquo utilities need to know about one project image."""

    entry_id: str
    name: str
    uri: str
    width: int
    height: int
    mpp: float | None = None
    entry_path: Path | None = None
    annotations: list[ObjectData] = field(default_factory=list)
    detections: list[ObjectData] = field(default_factory=list)
    server_provider: str | None = None

    @property
    def stem(self) -> str:
        """A file-name-safe form of the image name, unique together with the entry id."""
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.name).stem).strip("._") or "image"
        return f"{base}-{self.entry_id}"


def uri_to_path(uri: str) -> Path:
    """Local path of a ``file:`` URI as QuPath stores it (``file:/a/b``, ``file:///a/b``, UNC, drive letters)."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        raise InputError(
            f"image URI {uri!r} is not a local file (scheme {parts.scheme or 'none'!r}); "
            "only file: URIs can be read (paquo supports file: URIs only)"
        )
    path = unquote(parts.path)
    if parts.netloc and parts.netloc.lower() != "localhost":
        return Path(str(PureWindowsPath(f"//{parts.netloc}{path}")))
    if re.match(r"^/[A-Za-z]:/", path):
        return Path(str(PureWindowsPath(path[1:])))
    return Path(str(PurePosixPath(path)))


def resolve_image_path(entry: ImageEntryData) -> Path:
    """The entry's image file on this machine, or an error saying how to re-point a moved image."""
    path = uri_to_path(entry.uri)
    if not path.is_file():
        raise InputError(
            f"image {entry.name!r}: its file {path} is not there (moved, renamed or on an unmounted drive). "
            "Re-point the project: in QuPath open the project and accept 'Update URIs', or with paquo run "
            "QuPathProject(PROJECT, mode='r+').update_image_paths(try_relative=True) when project and images "
            "moved together, else update_image_paths(uri2uri={old_uri: new_uri})"
        )
    return path


def _length_um(entry: Any) -> float | None:
    if not isinstance(entry, Mapping):
        return None
    unit = str(entry.get("unit", "")).strip().lower()
    try:
        value = float(entry["value"])
    except (KeyError, TypeError, ValueError):
        return None
    if unit not in _MICRON_UNITS:
        return None
    return value


def mpp_from_server_metadata(metadata: Mapping[str, Any]) -> float | None:
    """µm/px from QuPath's ``ImageServerMetadata`` JSON (``pixelCalibration.pixelWidth/Height``).

    QuPath stores the calibration the user sees (and may have typed in the
    Image tab), so it wins over the file's own tags. Uncalibrated images carry
    unit ``px``: that, and implausible values, give ``None``.
    """
    calibration = metadata.get("pixelCalibration")
    if not isinstance(calibration, Mapping):
        return None
    w = _length_um(calibration.get("pixelWidth"))
    h = _length_um(calibration.get("pixelHeight"))
    values = [v for v in (w, h) if v is not None and is_plausible(v)]
    if not values:
        return None
    return sum(values) / len(values)


def read_server_json(entry_path: Path | None) -> dict[str, Any]:
    """``server.json`` of an entry data folder (QuPath ≥ 0.2 writes it), or ``{}``."""
    if entry_path is None:
        return {}
    try:
        data = json.loads((Path(entry_path) / "server.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def server_provider(server: Mapping[str, Any]) -> str | None:
    """The server builder's provider class (e.g. ``...OpenslideServerBuilder``), if recorded."""
    builder = server.get("builder")
    if isinstance(builder, Mapping):
        name = builder.get("providerClassName")
        return str(name) if name else None
    return None


def bounds_offset(provider: str | None, properties: Mapping[str, Any]) -> tuple[int, int]:
    """Offset to add to QuPath coordinates to get the file's pixel coordinates.

    QuPath's OpenSlide server crops slides to their non-empty bounds
    (``openslide.bounds-x/-y``, e.g. MRXS), so its (0, 0) is the bounds corner;
    Bio-Formats and plain TIFF readers do not crop. We apply the offset only
    when both the entry was opened through OpenSlide and the file reports bounds.
    """
    if not provider or "openslide" not in provider.lower():
        return (0, 0)
    offsets = []
    for axis in ("x", "y"):
        value = properties.get(f"openslide.bounds-{axis}", properties.get(f"tiffslide.bounds-{axis}"))
        try:
            offsets.append(int(value) if value is not None else 0)
        except (TypeError, ValueError):
            offsets.append(0)
    return (offsets[0], offsets[1])
