"""Which QuPath objects are training regions and which are nuclei, and their masks.

The rules (also in ``docs/qupath-loop.md``; every case is counted and reported):

1. **Nucleus** – an annotation or detection whose class is one of the nucleus
   classes (default ``Nucleus``, case-insensitive); also an *unclassified*
   annotation or detection that is a closed area no larger than
   ``max_nucleus_um2`` (default 400 µm², a large nucleus is ~200 µm²).
   Cells contribute their nucleus outline. Detections written by
   ``dannucnet batch`` (named ``dannucnet:...``) are model output, not ground
   truth, and are left out unless ``include_own_detections``.
2. **Region** – with ``region_classes`` given: annotations of those classes.
   Without: every area annotation that is not a nucleus by rule 1. Points and
   lines are never regions. Overlapping regions are merged; each connected
   piece becomes one sample. Regions are clipped to the image.
3. **Invalid geometry** – made valid (``shapely.make_valid``), keeping only its
   area parts; a shape with no area left is dropped.
4. **Border** – a nucleus that crosses a region's border is kept whole, and the
   region grows to cover it: it is neither cut nor partly taught as background.
   Nuclei outside every region are not exported.
5. **Overlap** – where nuclei overlap, the smaller one keeps the pixels; a
   nucleus left with no pixel (fully covered, or smaller than a pixel at the
   target size) is counted as lost.
6. **Empty region** – a region with no nucleus is skipped (a person may not
   have annotated it yet), unless ``keep_empty_regions``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from dannucnet.geometry.rasterize import polygon_runs, rasterize_mask, rasterize_polygons
from dannucnet.qupath.entries import DETECTION, ImageEntryData, ObjectData

OWN_TAG_PREFIX = "dannucnet:"
DEFAULT_NUCLEUS_CLASSES = ("Nucleus",)
DEFAULT_MAX_NUCLEUS_UM2 = 400.0


@dataclass(frozen=True)
class RegionRules:
    """The knobs of the region/nucleus rules above."""

    nucleus_classes: tuple[str, ...] = DEFAULT_NUCLEUS_CLASSES
    region_classes: tuple[str, ...] | None = None
    max_nucleus_um2: float = DEFAULT_MAX_NUCLEUS_UM2
    include_own_detections: bool = False
    keep_empty_regions: bool = False

    def is_nucleus_class(self, name: str | None) -> bool:
        return name is not None and name.strip().lower() in {c.strip().lower() for c in self.nucleus_classes}

    def is_region_class(self, name: str | None) -> bool:
        if self.region_classes is None:
            return False
        wanted = {c.strip().lower() for c in self.region_classes}
        return (name or "").strip().lower() in wanted


@dataclass
class TrainingRegion:
    """One sample-to-be: a connected region (level-0 px) and the nuclei it holds."""

    geometry: Polygon
    nuclei: list[Polygon]
    annotation_ids: list[str] = field(default_factory=list)
    nucleus_ids: list[str] = field(default_factory=list)


def is_own_detection(name: str | None) -> bool:
    """True for objects written by ``dannucnet batch``/``import-geojson`` (tagged by name)."""
    return bool(name) and str(name).startswith(OWN_TAG_PREFIX)


def fix_geometry(geometry: BaseGeometry) -> tuple[Polygon | MultiPolygon | None, bool]:
    """Area part of ``geometry`` made valid; ``(None, fixed)`` when nothing with area is left."""
    fixed = False
    geom = geometry
    if geom is None or geom.is_empty:
        return None, False
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
        fixed = True
    polys = [g for g in _polygons(geom) if g.area > 0]
    if not polys:
        return None, fixed
    if len(polys) == 1:
        return polys[0], fixed
    return MultiPolygon(polys), fixed


def _polygons(geom: BaseGeometry) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return list(geom.geoms)
    if hasattr(geom, "geoms"):
        out: list[Polygon] = []
        for part in geom.geoms:
            out.extend(_polygons(part))
        return out
    return []


def _is_area(geom: BaseGeometry) -> bool:
    return geom.geom_type in ("Polygon", "MultiPolygon") or (
        geom.geom_type == "GeometryCollection" and any(g.area > 0 for g in _polygons(geom))
    )


def classify_objects(
    entry: ImageEntryData, rules: RegionRules, mpp: float, counts: Counter[str]
) -> tuple[list[tuple[ObjectData, BaseGeometry]], list[tuple[ObjectData, BaseGeometry]]]:
    """Split an entry's objects into (regions, nuclei) by the rules; geometry fixed, events counted."""
    max_area_px = rules.max_nucleus_um2 / (mpp * mpp)
    regions: list[tuple[ObjectData, BaseGeometry]] = []
    nuclei: list[tuple[ObjectData, BaseGeometry]] = []
    for obj in [*entry.annotations, *entry.detections]:
        if obj.kind == DETECTION and is_own_detection(obj.name) and not rules.include_own_detections:
            counts["model detections left out"] += 1
            continue
        if obj.geometry is None or obj.geometry.is_empty or not _is_area(obj.geometry):
            counts["points/lines ignored"] += 1
            continue
        geom, fixed = fix_geometry(obj.geometry)
        if fixed:
            counts["invalid geometries fixed"] += 1
        if geom is None:
            counts["invalid geometries dropped"] += 1
            continue
        small = geom.area <= max_area_px
        if rules.is_nucleus_class(obj.class_name) or (obj.class_name is None and small):
            nuclei.append((obj, geom))
        elif obj.kind == DETECTION:
            counts["detections of other classes ignored"] += 1
        elif rules.region_classes is None or rules.is_region_class(obj.class_name):
            regions.append((obj, geom))
        else:
            counts["annotations of other classes ignored"] += 1
    return regions, nuclei


def build_training_regions(
    regions: Sequence[tuple[ObjectData, BaseGeometry]],
    nuclei: Sequence[tuple[ObjectData, BaseGeometry]],
    width: int,
    height: int,
    rules: RegionRules,
    counts: Counter[str],
) -> list[TrainingRegion]:
    """Merge regions into connected pieces, attach nuclei, grow over border nuclei, drop empties."""
    if not regions:
        return []
    image = box(0, 0, width, height)
    pieces = []
    for obj, geom in regions:
        clipped = geom.intersection(image)
        if clipped.area < geom.area - 1e-6:
            counts["regions clipped to the image"] += 1
        if clipped.area > 0:
            pieces.append((obj, clipped))
        else:
            counts["regions outside the image"] += 1
    merged = unary_union([g for _, g in pieces])
    components = [p for p in _polygons(merged) if p.area > 0]
    if len(components) < len(pieces):
        counts["overlapping regions merged"] += len(pieces) - len(components)
    nucleus_geoms = [g for _, g in nuclei]
    tree = shapely.STRtree(nucleus_geoms) if nucleus_geoms else None
    used: set[int] = set()
    out: list[TrainingRegion] = []
    for comp in components:
        ids = [str(o.id) for o, g in pieces if o.id and g.intersects(comp)]
        idx = sorted(int(i) for i in tree.query(comp, predicate="intersects")) if tree is not None else []
        idx = [i for i in idx if nucleus_geoms[i].intersection(comp).area > 0]
        inside = [nucleus_geoms[i] for i in idx]
        crossing = [g for g in inside if not comp.contains(g)]
        geometry: BaseGeometry = comp
        if crossing:
            counts["nuclei crossing a region border (kept whole, region grown)"] += len(crossing)
            geometry = unary_union([comp, *crossing]).intersection(image)
            geometry = max(_polygons(geometry), key=lambda p: p.area)
        used.update(idx)
        if not inside and not rules.keep_empty_regions:
            counts["empty regions skipped"] += 1
            continue
        if not inside:
            counts["empty regions kept as background"] += 1
        out.append(
            TrainingRegion(
                geometry=geometry,
                nuclei=[_clip_nucleus(g, image) for g in inside],
                annotation_ids=ids,
                nucleus_ids=[str(nuclei[i][0].id) for i in idx if nuclei[i][0].id],
            )
        )
    outside = len(nucleus_geoms) - len(used)
    if outside:
        counts["nuclei outside every region (not exported)"] += outside
    return out


def _clip_nucleus(geom: BaseGeometry, image: Polygon) -> Polygon:
    clipped = geom if image.contains(geom) else geom.intersection(image)
    parts = _polygons(clipped)  # a nucleus is one shape: keep the largest part
    return max(parts, key=lambda p: p.area) if parts else Polygon()


@dataclass
class RasterizedRegion:
    labels: np.ndarray  # uint32 instance ids, 0 = background
    mask: np.ndarray  # bool, True = annotated (loss counts here)
    nuclei: int
    lost: int
    overlap_pixels: int


def rasterize_region(
    region: TrainingRegion, origin: tuple[int, int], shape: tuple[int, int], downsample: float
) -> RasterizedRegion:
    """Instance labels and region mask of ``region`` on an array grid (rules 4 and 5).

    Array pixel (c, r) covers level-0 [x + c·d, x + (c+1)·d) × …; a pixel is
    inside a shape when its centre is (the shared pixel-centre rasteriser).
    """
    mask = rasterize_mask(region.geometry, shape, origin, downsample)
    # smallest first + first_wins: where nuclei overlap, the smaller one keeps the pixels
    order = sorted(range(len(region.nuclei)), key=lambda i: region.nuclei[i].area)
    polys = [region.nuclei[i] for i in order]
    labels = rasterize_polygons(polys, shape, origin, downsample, first_wins=True).astype(np.uint32)
    g, _, c0, c1 = polygon_runs(polys, shape, origin, downsample)
    claimed = int((c1 - c0).sum()) if len(g) else 0
    painted = int(np.count_nonzero(labels))
    kept = int(np.count_nonzero(np.unique(labels)))
    mask |= labels > 0
    return RasterizedRegion(
        labels=labels, mask=mask, nuclei=kept, lost=len(polys) - kept, overlap_pixels=claimed - painted
    )


def patch_windows(height: int, width: int, patch: int | None) -> list[tuple[int, int, int, int]]:
    """(row, col, h, w) windows tiling an array; the last row/column aligned to the far edge.

    ``None`` means the whole array. A dimension smaller than ``patch`` gives one
    window of that dimension (training pads or crops as it needs).
    """
    if patch is None or (height <= patch and width <= patch):
        return [(0, 0, height, width)]

    def starts(n: int) -> list[int]:
        if n <= patch:
            return [0]
        s = list(range(0, n - patch + 1, patch))
        if s[-1] + patch < n:
            s.append(n - patch)
        return s

    return [
        (r, c, min(patch, height), min(patch, width)) for r in starts(height) for c in starts(width)
    ]

