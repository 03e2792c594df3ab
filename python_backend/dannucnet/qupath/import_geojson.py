"""Checks before ``dannucnet segment`` output of a slide goes into its QuPath entry.

Plain logic: read the nuclei, make sure they belong to this image (file name in
the GeoJSON metadata, coordinates inside the image), and say which model made
them so they can be tagged. Writing them is the paquo adapter's job.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dannucnet.errors import InputError
from dannucnet.formats.geojson import features_to_nuclei, read_features
from dannucnet.qupath.entries import ImageEntryData, uri_to_path
from dannucnet.qupath.regions import fix_geometry

if TYPE_CHECKING:
    from dannucnet.pipeline.types import Nucleus

OUTSIDE_TOLERANCE = 0.01  # more nuclei than this outside the image means "wrong image"


@dataclass
class GeoJSONNuclei:
    nuclei: list[Nucleus]
    metadata: dict[str, Any] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def model(self) -> tuple[str, str]:
        """(name, version) of the model that wrote the file, as far as its metadata says."""
        model = self.metadata.get("model")
        if isinstance(model, dict):
            return str(model.get("name") or "geojson"), str(model.get("version") or "unknown")
        name = self.metadata.get("model_name") or model or "geojson"
        return str(name), str(self.metadata.get("model_version") or "unknown")


def read_nuclei(path: Path) -> GeoJSONNuclei:
    """Polygon features of a QuPath GeoJSON file as nuclei (level-0 px); others counted and skipped.

    The model and image names come from the features' ``properties.metadata``
    (``dannucnet segment`` writes the same map on every feature).
    """
    features = read_features(path)
    nuclei = features_to_nuclei(features)
    counts: Counter[str] = Counter()
    if len(nuclei) < len(features):
        counts["features that are not polygons skipped"] += len(features) - len(nuclei)
    kept = []
    for n in nuclei:
        fixed, was_fixed = fix_geometry(n.polygon)
        if fixed is None:
            counts["features without area skipped"] += 1
            continue
        if was_fixed:
            counts["invalid geometries fixed"] += 1
        n.polygon = max(getattr(fixed, "geoms", [fixed]), key=lambda p: p.area)  # one nucleus, one shape
        kept.append(n)
    metadata: dict[str, Any] = {}
    for f in features[:1]:
        props = f.get("properties")
        meta = props.get("metadata") if isinstance(props, dict) else None
        if isinstance(meta, dict):
            metadata = dict(meta)
    return GeoJSONNuclei(nuclei=kept, metadata=metadata, counts=counts)


def _named_files(metadata: dict[str, Any]) -> list[str]:
    names = []
    for key in ("image", "slide", "source", "path", "image_path", "file"):
        value = metadata.get(key)
        if isinstance(value, dict):
            value = value.get("path") or value.get("name")
        if isinstance(value, str) and value:
            names.append(Path(value.replace("\\", "/")).name)
    return names


def check_belongs(data: GeoJSONNuclei, entry: ImageEntryData, force: bool = False) -> list[Nucleus]:
    """The nuclei to write, after checking they were made on this image.

    Refused (unless ``force``): a file whose metadata names another image
    file, or with more than 1 % of nuclei centred outside the image (the wrong
    image, or coordinates with an offset). Nuclei centred outside the image
    are always dropped and counted.
    """
    image_file = uri_to_path(entry.uri).name
    named = _named_files(data.metadata)
    if named and image_file not in named and not force:
        raise InputError(
            f"the GeoJSON was made from {named[0]!r}, not from {entry.name!r} ({image_file}); "
            "pick the matching image or pass --force"
        )
    inside: list[Nucleus] = []
    outside: list[Nucleus] = []
    for n in data.nuclei:
        x, y = n.centroid
        (inside if 0 <= x < entry.width and 0 <= y < entry.height else outside).append(n)
    if data.nuclei and len(outside) > OUTSIDE_TOLERANCE * len(data.nuclei) and not force:
        raise InputError(
            f"{len(outside)} of {len(data.nuclei)} nuclei lie outside {entry.name} "
            f"({entry.width}x{entry.height} px): wrong image or shifted coordinates; pass --force to import anyway"
        )
    if outside:
        data.counts["nuclei outside the image dropped"] += len(outside)
    return inside
