"""One region of pixels → the nuclei it owns, in level-0 coordinates.

This is the single place where pixels become polygons; the CLI, the server,
the QuPath batch and the slide loop all come through here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from shapely.geometry.base import BaseGeometry

from dannucnet.engine import resample_rgb, scale_to_model
from dannucnet.errors import InputError
from dannucnet.geometry.ownership import Rect
from dannucnet.pipeline.chunk_nuclei import ChunkGeometry, chunk_nuclei, clip_reach
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.types import Nucleus
from dannucnet.protocols import Cancel, Predictor, TileFunction
from dannucnet.slides.mpp import MPP_MAX, MPP_MIN, is_plausible


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
    if not is_plausible(mpp):  # the rule of every door: 1e-9 shrank the image to 1 px (0 nuclei), 1e9 a cv2.error
        raise InputError(f"pixel size {mpp} µm/px is outside the plausible microscope range {MPP_MIN:g}-{MPP_MAX:g}")
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
    where = ChunkGeometry.place(origin, downsample / scale, mpp, core, card, options)
    # windows farther from the clip than a chunk margin cannot change a nucleus it keeps: not run
    within = clip_reach(clip, model_rgb.shape[:2], where, options.chunk_margin(card.mpp))
    t1 = time.perf_counter()
    prob = predictor.predict(model_rgb, tile_fn=tile_fn, cancel=cancel, within=within)
    t2 = time.perf_counter()
    nuclei, post = chunk_nuclei(prob, model_rgb, where, clip=clip, options=options)
    timings.update(resample=t1 - t0, model=t2 - t1, **post)
    return RegionResult(nuclei=nuclei, timings=timings, probability=prob if keep_probability else None)
