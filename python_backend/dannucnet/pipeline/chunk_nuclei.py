"""A chunk's probability map → the nuclei it owns: the post-processing half of a region.

Kept free of the network so that it can run in a worker pool while the model
works on the next chunks. It does exactly what :func:`segment_region` does
after its model call (same threshold, minimum area, ownership by centroid in
the core, clip, measurements), so the pipelined slide runner gives the same
nuclei as :func:`segment_slide`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry.base import BaseGeometry

from dannucnet.errors import InputError
from dannucnet.geometry.cells import expand_labels
from dannucnet.geometry.grey_objects import GreyRule, drop_grey
from dannucnet.geometry.instances import label_nuclei, split_map
from dannucnet.geometry.ownership import Rect, centroids_of, owned_mask
from dannucnet.geometry.polygons import labels_to_polygons
from dannucnet.geometry.qupath_measurements import PROBABILITY, measure_cells
from dannucnet.geometry.rasterize import rasterize_mask
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.types import Nucleus

if TYPE_CHECKING:
    from dannucnet.model.card import ModelCard


@dataclass(frozen=True)
class ChunkGeometry:
    """Where a chunk's model-resolution arrays sit in level-0 coordinates (plain, picklable)."""

    origin: tuple[float, float]
    to_level0: float  # level-0 px per model px
    mpp: float  # level-0 µm/px
    core: Rect | None
    threshold: float
    min_area_px: int
    grey: GreyRule | None = None  # the card's rule for objects too grey to be nuclei

    @classmethod
    def place(
        cls, origin: tuple[float, float], to_level0: float, mpp: float, core: Rect | None, card: ModelCard,
        options: SegmentOptions,
    ) -> ChunkGeometry:
        """A chunk's geometry with the mask rule every runner applies: the options' threshold, else the
        card's; the options' minimum area in µm² as model pixels (at least 1); the card's grey rule."""
        threshold = options.threshold if options.threshold is not None else card.threshold
        return cls(origin=(float(origin[0]), float(origin[1])), to_level0=to_level0, mpp=mpp, core=core,
                   threshold=threshold, min_area_px=max(1, round(options.min_area_um2 / card.mpp**2)),
                   grey=GreyRule.from_card(card.grey_objects))


def clip_reach(clip: BaseGeometry | None, shape: tuple[int, int], where: ChunkGeometry, margin_px: float
               ) -> np.ndarray | None:
    """The model pixels of a ``shape`` chunk within ``margin_px`` (model px; the chunk's margin) of
    ``clip``: where the map can change a nucleus, or a cell, that the clip keeps (centroid inside).
    Nuclei are far smaller than the 32 µm margin, so a window beyond it is not needed, for the
    same reason that a chunk's read stops there. None when there is no clip or it reaches every pixel,
    and for a clip GEOS cannot cut (every window then runs, as without a clip).
    """
    if clip is None:
        return None
    reach = margin_px * where.to_level0
    h, w = shape
    x0, y0 = where.origin
    x1, y1 = x0 + w * where.to_level0, y0 + h * where.to_level0
    try:
        area = clip if clip.is_valid else shapely.make_valid(clip)  # a drawn bow tie: its two triangles
        near = area.intersection(shapely.box(x0 - reach, y0 - reach, x1 + reach, y1 + reach)).buffer(reach)
    except shapely.errors.GEOSException:
        return None
    mask = rasterize_mask(near, shape, origin=where.origin, scale=where.to_level0)
    return None if mask.all() else mask


def chunk_nuclei(
    prob: np.ndarray,
    model_rgb: np.ndarray,
    where: ChunkGeometry,
    clip: BaseGeometry | None = None,
    options: SegmentOptions = SegmentOptions(),
) -> tuple[list[Nucleus], dict[str, float]]:
    """Instances, polygons, ownership and measurements of one chunk; returns (nuclei, seconds per stage)."""
    t0 = time.perf_counter()
    labels = drop_grey(label_nuclei(prob, threshold=where.threshold, min_area_px=where.min_area_px), model_rgb,
                       where.grey)
    t1 = time.perf_counter()
    # with cells, nuclei keep their exact pixel edges (no simplification) so that nucleus, cell and the
    # neighbouring cells share edges exactly: a simplified nucleus corner would cut into a neighbour's cell
    cells_wanted = options.cell_expansion_um > 0
    polygons = labels_to_polygons(labels, origin=where.origin, scale=where.to_level0,
                                  **({"simplify_px": 0} if cells_wanted else {}))
    ids = np.array(sorted(polygons), dtype=np.int64)
    geoms = [polygons[i] for i in ids]
    keep = np.ones(len(ids), dtype=bool)
    if len(ids):
        centroids = centroids_of(geoms)
        if where.core is not None:
            keep &= owned_mask(centroids, where.core)
        if clip is not None:
            shapely.prepare(clip)
            keep &= shapely.contains_xy(clip, centroids[:, 0], centroids[:, 1])
    kept = {int(i): g for i, g, k in zip(ids, geoms, keep) if k}
    if options.max_nuclei is not None and len(kept) > options.max_nuclei:
        raise InputError(
            f"the region holds {len(kept)} nuclei, more than the limit of {options.max_nuclei}: send smaller regions"
        )
    t2 = time.perf_counter()
    cells, cell_labels = (None, None)
    if cells_wanted and kept:
        kept, cells, cell_labels = chunk_cells(labels, kept, where, clip, options.cell_expansion_um)
    t3 = time.perf_counter()
    measurements = measure_cells(
        kept, labels, model_rgb, where.mpp, cells=cells, cell_labels=cell_labels,
        stains=options.stain_vectors, prob=split_map(prob)[0],
    )
    nuclei = [
        Nucleus(polygon=poly, probability=float(measurements[i].get(PROBABILITY, 0.0)),
                measurements=measurements[i], cell=None if cells is None else cells[i])
        for i, poly in kept.items()
    ]
    t4 = time.perf_counter()
    return nuclei, {"instances": t1 - t0, "polygons": t2 - t1, "cells": t3 - t2, "measurements": t4 - t3}


def chunk_cells(
    labels: np.ndarray, kept: dict[int, BaseGeometry], where: ChunkGeometry, clip: BaseGeometry | None,
    expansion_um: float,
) -> tuple[dict[int, BaseGeometry], dict[int, BaseGeometry], np.ndarray]:
    """(nuclei, cells, cell labels) of the kept nuclei: every nucleus of the chunk competes for pixels (so a
    seam changes nothing), cells stop at ``clip`` (pixel centres) and always contain their nucleus polygon.

    Outlines are not simplified, so nucleus, cell and neighbouring cells share their pixel edges exactly;
    an outline enclosing pixels not its own (a nucleus ringing another) gets holes instead of swallowing them.
    """
    array_mpp = where.mpp * where.to_level0
    allowed = None
    if clip is not None:
        allowed = rasterize_mask(clip, labels.shape, origin=where.origin, scale=where.to_level0)
    cell_labels = expand_labels(labels, expansion_um / array_mpp, allowed)
    ids = list(kept)
    nuc_arr = np.empty(len(ids), dtype=object)
    nuc_arr[:] = [kept[i] for i in ids]
    nuc_arr = exact_outlines(labels, ids, nuc_arr, where)
    traced = labels_to_polygons(cell_labels, origin=where.origin, scale=where.to_level0, simplify_px=0, ids=ids)
    cells_arr = np.empty(len(ids), dtype=object)
    cells_arr[:] = [traced.get(i, nuc_arr[k]) for k, i in enumerate(ids)]
    cells_arr = exact_outlines(cell_labels, ids, cells_arr, where)
    inside = shapely.covers(cells_arr, nuc_arr)
    for j in np.flatnonzero(~inside):  # a piece of the cell was dropped (rare): take the nucleus in
        cells_arr[j] = _largest_piece(shapely.union(cells_arr[j], nuc_arr[j])) or nuc_arr[j]
    return dict(zip(ids, nuc_arr.tolist())), dict(zip(ids, cells_arr.tolist())), cell_labels


def exact_outlines(labels: np.ndarray, ids: list[int], geoms: np.ndarray, where: ChunkGeometry) -> np.ndarray:
    """Outlines traced along outer pixel edges, redone with holes where they enclose pixels not their own.

    Such an outline (a ring around another object or around unclaimed pixels) covers more area than its
    pixels; redone, the enclosed pixels become holes, so no two outlines of one label image overlap.
    """
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=int(max(ids)) + 1)
    pixel_area = counts[np.asarray(ids)] * where.to_level0**2
    redo = np.flatnonzero(np.abs(shapely.area(geoms) - pixel_area) > 1e-6 * np.maximum(pixel_area, 1.0))
    if redo.size:
        geoms = geoms.copy()
        slices = ndi.find_objects(labels)
        for j in redo:
            exact = _with_holes(labels, ids[j], slices[ids[j] - 1], where)
            if exact is not None:
                geoms[j] = exact
    return geoms


def _largest_piece(geom: BaseGeometry) -> BaseGeometry | None:
    parts = [p for p in shapely.get_parts(geom) if p.geom_type == "Polygon" and not p.is_empty]
    return max(parts, key=lambda p: p.area) if parts else None


def _with_holes(cell_labels: np.ndarray, cell_id: int, box: tuple[slice, slice] | None,
                where: ChunkGeometry) -> BaseGeometry | None:
    """The largest piece of one label's pixels as a polygon whose holes are the pixels it encloses but does not own."""
    if box is None:
        return None
    sy, sx = box
    mask = np.zeros((sy.stop - sy.start + 2, sx.stop - sx.start + 2), bool)
    mask[1:-1, 1:-1] = cell_labels[sy, sx] == cell_id
    x0, y0 = sx.start - 1, sy.start - 1
    origin = (where.origin[0] + x0 * where.to_level0, where.origin[1] + y0 * where.to_level0)
    outer = labels_to_polygons(mask.astype(np.int32), origin=origin, scale=where.to_level0, simplify_px=0).get(1)
    if outer is None:
        return None
    gaps, _ = ndi.label(~mask)
    gaps[gaps == gaps[0, 0]] = 0  # the padding frame and everything connected to it is outside, not a hole
    holes = labels_to_polygons(gaps, origin=origin, scale=where.to_level0, simplify_px=0)
    if not holes:
        return outer
    return _largest_piece(outer.difference(shapely.union_all(list(holes.values()))))

