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

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from dannucnet.errors import InputError
from dannucnet.geometry.instances import label_nuclei, split_map
from dannucnet.geometry.measurements import measure_nuclei
from dannucnet.geometry.ownership import Rect, centroids_of, owned_mask
from dannucnet.geometry.polygons import labels_to_polygons
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.types import Nucleus


@dataclass(frozen=True)
class ChunkGeometry:
    """Where a chunk's model-resolution arrays sit in level-0 coordinates (plain, picklable)."""

    origin: tuple[float, float]
    to_level0: float  # level-0 px per model px
    mpp: float  # level-0 µm/px
    core: Rect | None
    threshold: float
    min_area_px: int


def chunk_nuclei(
    prob: np.ndarray,
    model_rgb: np.ndarray,
    where: ChunkGeometry,
    clip: BaseGeometry | None = None,
    options: SegmentOptions = SegmentOptions(),
) -> tuple[list[Nucleus], dict[str, float]]:
    """Instances, polygons, ownership and measurements of one chunk; returns (nuclei, seconds per stage)."""
    t0 = time.perf_counter()
    labels = label_nuclei(prob, threshold=where.threshold, min_area_px=where.min_area_px)
    t1 = time.perf_counter()
    polygons = labels_to_polygons(labels, origin=where.origin, scale=where.to_level0)
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
    measurements = measure_nuclei(kept, labels, split_map(prob)[0], model_rgb, where.mpp)
    nuclei = [
        Nucleus(polygon=poly, probability=float(measurements[i].get("Detection probability", 0.0)),
                measurements=measurements[i])
        for i, poly in kept.items()
    ]
    t3 = time.perf_counter()
    return nuclei, {"instances": t1 - t0, "polygons": t2 - t1, "measurements": t3 - t2}
