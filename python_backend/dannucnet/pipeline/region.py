"""One region of pixels → the nuclei it owns, in level-0 coordinates.

This is the single place where pixels become polygons; the CLI, the server,
the QuPath batch and the slide loop all come through here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from dannucnet.engine import Predictor, resample_rgb, scale_to_model
from dannucnet.engine.predictor import Cancel, TileFunction
from dannucnet.errors import InputError
from dannucnet.geometry.instances import label_nuclei
from dannucnet.geometry.measurements import measure_nuclei
from dannucnet.geometry.ownership import Rect, centroids_of, owned_mask
from dannucnet.geometry.polygons import labels_to_polygons
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.types import Nucleus


@dataclass
class RegionResult:
    nuclei: list[Nucleus]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    probability: np.ndarray | None = None  # model-resolution map, kept only when asked for


def _check_placement(origin: tuple[float, float], downsample: float, mpp: float | None) -> float:
    if not all(math.isfinite(v) for v in origin):
        raise InputError(f"region origin must be finite, got {origin}")
    if not (math.isfinite(downsample) and downsample > 0):
        raise InputError(f"downsample must be a positive number, got {downsample}")
    if mpp is None:
        raise InputError("the image has no pixel size: pass --mpp (µm/px; about 0.25 for a 40x scan)")
    if not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"pixel size must be a positive number of µm/px, got {mpp}")
    return mpp


def segment_region(
    predictor: Predictor,
    rgb: np.ndarray,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    mpp: float | None = None,
    core: Rect | None = None,
    clip: BaseGeometry | None = None,
    options: SegmentOptions = SegmentOptions(),
    tile_fn: TileFunction | None = None,
    cancel: Cancel | None = None,
    keep_probability: bool = False,
) -> RegionResult:
    """Segment ``rgb`` whose pixel (c, r) covers level-0 [x + c·d, x + (c+1)·d) × … .

    ``mpp`` is the level-0 pixel size. Nuclei are kept when their centroid lies
    in ``core`` (ownership between chunks) and inside ``clip`` (an annotation);
    they are never cut by either, so no nucleus comes back truncated.
    """
    mpp = _check_placement(origin, downsample, mpp)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    card = predictor.card
    scale = scale_to_model(mpp * downsample, card.mpp)
    model_rgb = resample_rgb(rgb, scale)
    t1 = time.perf_counter()
    prob = predictor.predict(model_rgb, tile_fn=tile_fn, cancel=cancel)
    t2 = time.perf_counter()
    threshold = options.threshold if options.threshold is not None else card.threshold
    min_area_px = max(1, round(options.min_area_um2 / card.mpp**2))
    labels = label_nuclei(prob, threshold=threshold, min_area_px=min_area_px)
    t3 = time.perf_counter()
    to_level0 = downsample / scale
    polygons = labels_to_polygons(labels, origin=origin, scale=to_level0)
    ids = np.array(sorted(polygons), dtype=np.int64)
    geoms = [polygons[i] for i in ids]
    keep = np.ones(len(ids), dtype=bool)
    if len(ids):
        centroids = centroids_of(geoms)
        if core is not None:
            keep &= owned_mask(centroids, core)
        if clip is not None:
            shapely.prepare(clip)
            keep &= shapely.contains_xy(clip, centroids[:, 0], centroids[:, 1])
    kept = {int(i): g for i, g, k in zip(ids, geoms, keep) if k}
    if options.max_nuclei is not None and len(kept) > options.max_nuclei:
        raise InputError(
            f"the region holds {len(kept)} nuclei, more than the limit of {options.max_nuclei}: send smaller regions"
        )
    t4 = time.perf_counter()
    measurements = measure_nuclei(kept, labels, prob, model_rgb, mpp)
    nuclei = [
        Nucleus(polygon=poly, probability=float(measurements[i].get("Detection probability", 0.0)),
                measurements=measurements[i])
        for i, poly in kept.items()
    ]
    t5 = time.perf_counter()
    timings.update(resample=t1 - t0, model=t2 - t1, instances=t3 - t2, polygons=t4 - t3, measurements=t5 - t4)
    return RegionResult(nuclei=nuclei, timings=timings, probability=prob if keep_probability else None)
