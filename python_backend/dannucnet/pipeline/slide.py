"""A whole slide (or parts of it) → nuclei, chunk by chunk, in bounded memory.

The slide is cut into large chunks (2048 model px + a 128 px margin by
default, plus twice the cell expansion when cells are asked for). Each chunk
owns the nuclei whose centroid lies in its core, so a nucleus on a seam is
reported exactly once and never cut. Chunks without tissue are skipped; the
next chunk is read while the current one is segmented, so decoding overlaps
with inference. Results are yielded per chunk and never accumulated here:
memory stays flat in slide size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from dannucnet.engine import scale_to_model
from dannucnet.errors import CancelledError, InputError
from dannucnet.geometry.ownership import Chunk, Rect, plan_chunks
from dannucnet.pipeline.options import SegmentOptions
from dannucnet.pipeline.region import segment_region
from dannucnet.pipeline.types import Nucleus
from dannucnet.predictor_protocol import Cancel, Predictor, TileFunction
from dannucnet.protocols import Progress
from dannucnet.slides import ImageSource

log = logging.getLogger(__name__)


@dataclass
class SlidePlan:
    chunks: list[Chunk]
    downsample: float  # level-0 px per model px
    mpp: float  # level-0 µm/px
    clip: BaseGeometry | None
    skipped_background: int


def plan_slide(
    source: ImageSource,
    model_mpp: float,
    region: Rect | None = None,
    rois: Sequence[BaseGeometry] | None = None,
    options: SegmentOptions = SegmentOptions(),
) -> SlidePlan:
    mpp = source.require_mpp()
    image = Rect(0, 0, source.width, source.height)
    downsample = 1.0 / scale_to_model(mpp, model_mpp)  # 1.0 when within 1 %
    clip = None
    if rois:
        clip = shapely.union_all([g for g in rois if g is not None and not g.is_empty])
        if clip.is_empty:
            raise InputError("the regions of interest are empty")
        bx0, by0, bx1, by1 = clip.bounds
        roi_box = Rect.from_bounds(bx0, by0, bx1, by1)
        region = roi_box if region is None else region.intersection(roi_box)
    target = image if region is None else region.to_int().intersection(image)
    if target.is_empty:
        raise InputError(
            f"the region {region} lies outside the image ({source.width} x {source.height} px)"
        )
    chunks = plan_chunks(target, options.chunk_size * downsample, options.chunk_margin(model_mpp) * downsample, image)
    if clip is not None:
        shapely.prepare(clip)
        chunks = [c for c in chunks if clip.intersects(c.core.to_polygon())]
    skipped = 0
    if options.skip_background and len(chunks) > 1:
        from dannucnet.slides.tissue import tissue_mask

        mask = tissue_mask(source)
        kept = [c for c in chunks if mask.has_tissue(c.core)]
        skipped = len(chunks) - len(kept)
        chunks = kept
    return SlidePlan(chunks=chunks, downsample=downsample, mpp=mpp, clip=clip, skipped_background=skipped)


#: ``auto_stains`` reads the whole image at most this many pixels wide (QuPath estimates on a region or a
#: downsampled image too); 2048 px keeps the read to ~12 MB and still holds ~10^6 stained pixels.
STAIN_ESTIMATE_SIDE = 2048


def resolve_stains(source: ImageSource, options: SegmentOptions) -> SegmentOptions:
    """``options`` with ``auto_stains`` replaced by the stains estimated from this image."""
    if not options.auto_stains:
        return options
    import dataclasses

    from dannucnet.geometry.qupath_stains import estimate_stains, stains_to_json

    downsample = max(1.0, max(source.width, source.height) / STAIN_ESTIMATE_SIDE)
    rgb = source.read_region(0, 0, source.width, source.height, downsample=downsample)
    stains = estimate_stains(rgb)
    log.info("estimated stain vectors: %s", stains_to_json(stains))
    return dataclasses.replace(options, stains=stains, auto_stains=False)


def _read(source: ImageSource, chunk: Chunk, downsample: float) -> tuple[np.ndarray, Rect]:
    read = chunk.read.to_int()
    rgb = source.read_region(int(read.x), int(read.y), int(read.width), int(read.height), downsample=downsample)
    return rgb, read


def segment_slide(
    predictor: Predictor,
    source: ImageSource,
    region: Rect | None = None,
    rois: Sequence[BaseGeometry] | None = None,
    options: SegmentOptions = SegmentOptions(),
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    tile_fn: TileFunction | None = None,
    plan: SlidePlan | None = None,
) -> Iterator[list[Nucleus]]:
    """Yield the nuclei of each chunk (owned by that chunk only), in chunk order."""
    plan = plan or plan_slide(source, predictor.card.mpp, region, rois, options)
    total, found = len(plan.chunks), 0
    if progress is not None:
        progress(0, total, 0)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-reader") as reader:
        pending: Future | None = reader.submit(_read, source, plan.chunks[0], plan.downsample) if total else None
        for index, chunk in enumerate(plan.chunks):
            if cancel is not None and cancel():
                raise CancelledError("cancelled")
            assert pending is not None
            rgb, read = pending.result()
            pending = (
                reader.submit(_read, source, plan.chunks[index + 1], plan.downsample) if index + 1 < total else None
            )
            # the array may be a pixel off the nominal size after rounding: use its exact spacing
            effective = read.width / rgb.shape[1]
            result = segment_region(
                predictor, rgb, origin=(read.x, read.y), downsample=effective, mpp=plan.mpp,
                core=chunk.core, clip=plan.clip, options=options, tile_fn=tile_fn, cancel=cancel,
            )
            found += len(result.nuclei)
            if progress is not None:
                progress(index + 1, total, found)
            yield result.nuclei
