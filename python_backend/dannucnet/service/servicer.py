"""The RPC logic, once, for both transports.

:class:`SegmentationService` takes request messages and a transport-neutral
:class:`~dannucnet.service.calls.Call`, validates every field (naming it in the
error), admits the request against the pending limit, and runs the shared
pipeline. The gRPC servicer (``grpc_server``) and the HTTP gateway
(``gateway``) are thin adapters around it, so the two transports cannot
disagree about what a request means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import struct_pb2

from dannucnet import __version__
from dannucnet.errors import DanNucNetError
from dannucnet.geometry.ownership import Rect
from dannucnet.pipeline.options import MAX_MIN_AREA_UM2
from dannucnet.pipeline.types import Nucleus
from dannucnet.protocols import Predictor
from dannucnet.service import API_VERSION
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service.calls import Call
from dannucnet.service.convert import geometry_from_wkb, nuclei_to_proto, rect_from_proto
from dannucnet.service.limits import (
    DOWNSAMPLE_RANGE,
    MAX_ROIS,
    Limits,
    check_mpp,
    check_work,
    coordinate,
    decode_image,
    finite,
    in_range,
    too_many_polygons,
)
from dannucnet.service.slide_roots import resolve_slide
from dannucnet.service.status import ServiceError, from_exception, invalid

if TYPE_CHECKING:
    from dannucnet.engine.pool import PredictorPool

log = logging.getLogger(__name__)


@dataclass
class RegionOutcome:
    """What SegmentRegion found, before it is rendered as proto or GeoJSON."""

    nuclei: list[Nucleus]
    timings_ms: dict[str, float] = field(default_factory=dict)
    model: str = ""  # card name and version of the model that ran (the request's choice or the server's)
    model_version: str = ""

    def to_proto(self) -> pb.SegmentRegionResponse:
        return pb.SegmentRegionResponse(
            nuclei=nuclei_to_proto(self.nuclei), nucleus_count=len(self.nuclei), timings_ms=self.timings_ms,
            model=self.model, model_version=self.model_version,
        )


class SegmentationService:
    """Validates requests and runs the pipeline with a (batched) predictor."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        limits: Limits | None = None,
        slide_roots: Sequence[Path] = (),
        model_source: str = "",
        models: PredictorPool[Any] | None = None,
        default_model: str = "",
    ) -> None:
        self.predictor = predictor
        # Per-request models (the requests' `model` field): an engine.pool.PredictorPool holding
        # `predictor` and loading others on first use; None serves `predictor` only.
        self.models = models
        self.default_model = default_model  # what an empty `model` means: a name, "auto", or "" (predictor)
        self._announced: set[int] = set()
        self.limits = limits or Limits()
        self.slide_roots = list(slide_roots)
        self.model_source = model_source
        self._pending = threading.BoundedSemaphore(self.limits.max_pending)
        self._lock = threading.Lock()
        self.active = 0  # requests being served now (for the drain on shutdown)
        self.served = 0

    # ---- admission ----------------------------------------------------
    @contextlib.contextmanager
    def admit(self, call: Call) -> Iterator[None]:
        """Bounded admission: over ``max_pending`` requests answers RESOURCE_EXHAUSTED at once.

        Re-entrant per call: the HTTP gateway admits before it reads the body, the RPC again inside.
        """
        if call.admitted:
            yield
            return
        if not self._pending.acquire(blocking=False):
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is busy ({self.limits.max_pending} requests pending); retry in a moment",
            )
        with self._lock:
            self.active += 1
        call.admitted = True
        try:
            yield
        finally:
            call.admitted = False
            with self._lock:
                self.active -= 1
                self.served += 1
            self._pending.release()

    # ---- GetModelInfo -------------------------------------------------
    def model_info(self, request: pb.GetModelInfoRequest | None = None, call: Call | None = None) -> pb.ModelInfo:
        card = self.predictor.card
        config = struct_pb2.Struct()
        with contextlib.suppress(Exception):  # a card with exotic values still answers
            config.update(dict(card.architecture or {}))
        return pb.ModelInfo(
            name=card.name,
            version=str(card.version),
            architecture="DAN-NucNet",
            pixel_size_microns=float(card.mpp),
            tile_size=int(self.predictor.tile),
            window_overlap=int(self.predictor.overlap),
            threshold=float(card.threshold),
            device=self.predictor.description,
            server_version=__version__,
            api_version=API_VERSION,
            trained=bool(card.trained),
            architecture_config=config,
            max_pixels=self.limits.max_pixels,
            max_message_bytes=self.limits.max_message_bytes,
            max_polygons=self.limits.max_polygons,
            slide_segmentation_enabled=bool(self.slide_roots),
        )

    # ---- ListModels ---------------------------------------------------
    def list_models(
        self, request: pb.ListModelsRequest | None = None, call: Call | None = None
    ) -> pb.ListModelsResponse:
        from dannucnet.model.registry import list_models

        loaded = {p.card.name for p in self.models.loaded()} if self.models is not None else {self.predictor.card.name}
        default = self.default_model or self.predictor.card.name
        entries = [e for e in list_models() if self.models is not None or e.card_name == self.predictor.card.name]
        return pb.ListModelsResponse(
            default_model=default,
            models=[
                pb.ModelEntry(
                    name=e.name, version=e.version, pixel_size_microns=e.mpp, trained=e.trained, licence=e.licence,
                    metrics={k: v for k, v in e.metrics.items() if k != "split"},
                    metrics_split=str(e.metrics.get("split", "")),
                    is_default=e.name == default or (not self.default_model and e.card_name == default),
                    loaded=e.card_name in loaded, base_filters=e.base_filters, depth=e.depth,
                    has_weights=e.has_weights,
                )
                for e in entries
            ],
        )

    def _predictor_for(self, requested: str, mpp: float | None) -> Predictor:
        """The predictor a request's ``model`` field asks for (see :meth:`list_models`)."""
        from pathlib import Path

        from dannucnet.catalogue import AUTO_NAMES
        from dannucnet.model.registry import list_models

        if not requested and (self.models is None or self.default_model not in AUTO_NAMES):
            return self.predictor
        name = requested or self.default_model
        if self.models is None:  # a server of one model: "auto" can only mean it
            own = (self.predictor.card.name, Path(self.model_source).name if self.model_source else "")
            if name in AUTO_NAMES or name in own:  # by card name or by the folder name ListModels gives
                return self.predictor
            raise invalid(f"model {name!r}: this server runs only {self.predictor.card.name!r}")

        if name not in AUTO_NAMES:  # names only: a client never points the server at a folder
            names = [e.name for e in list_models() if e.has_weights]  # (auto reads the list in for_image)
            if name not in names:
                raise invalid(f"unknown model {name!r}: installed models are {', '.join(names) or 'none'} "
                              f"(or {' or '.join(AUTO_NAMES)})")
        predictor, reason = self.models.for_image(mpp, name)
        with self._lock:  # INFO the first time a model serves a request, DEBUG after (a slide sends thousands)
            first = id(predictor) not in self._announced
            self._announced.add(id(predictor))
        log.log(logging.INFO if first else logging.DEBUG, "%s", reason)
        return predictor

    # ---- SegmentRegion ------------------------------------------------
    def segment_region(self, request: pb.SegmentRegionRequest, call: Call) -> RegionOutcome:
        with self.admit(call):
            try:
                return self._segment_region(request, call)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                raise self._status(exc, "SegmentRegion") from None

    def _segment_region(self, request: pb.SegmentRegionRequest, call: Call) -> RegionOutcome:
        from dannucnet.pipeline import segment_region

        t0 = time.perf_counter()
        origin_x = finite(request.origin_x, "originX", non_negative=True)
        origin_y = finite(request.origin_y, "originY", non_negative=True)
        coordinate(origin_x, "originX")
        coordinate(origin_y, "originY")
        downsample = 1.0
        if request.HasField("downsample"):
            downsample = finite(request.downsample, "downsample", positive=True)
            in_range(downsample, "downsample", *DOWNSAMPLE_RANGE, what=" (level-0 pixels per image pixel)")
        if not request.HasField("pixel_size_microns"):
            raise invalid(
                "pixelSizeMicrons is missing: send the level-0 pixel size of the slide in µm/px "
                "(QuPath: server.getPixelCalibration().getAveragedPixelSizeMicrons())"
            )
        mpp = check_mpp(request.pixel_size_microns, "pixelSizeMicrons")
        options = self._options(request.options if request.HasField("options") else None)
        clip = geometry_from_wkb(request.clip_wkb, "clipWkb") if request.clip_wkb else None
        core_msg = request.core if request.HasField("core") else None
        core = rect_from_proto(core_msg, "core") if core_msg is not None else None
        rgb = decode_image(request.image if request.HasField("image") else None, self.limits)
        t_decode = time.perf_counter()
        height, width = rgb.shape[:2]
        predictor = self._predictor_for(request.model, downsample * mpp)
        self._check_resampled(width, height, downsample * mpp, predictor)
        region = Rect(origin_x, origin_y, width * downsample, height * downsample)
        for end, name in ((region.x + region.width, "originX + width × downsample"),
                          (region.y + region.height, "originY + height × downsample")):
            coordinate(end, name)
        if core is not None and core.intersection(region).is_empty:
            raise invalid(
                f"core {core.bounds()} does not overlap the region {region.bounds()} "
                "(level-0 coordinates: origin + downsample × image size)"
            )
        if clip is not None and not clip.intersects(region.to_polygon()):
            raise invalid(
                f"clipWkb (bounds {tuple(round(v, 1) for v in clip.bounds)}) does not overlap the region "
                f"{region.bounds()}: send the region's own annotation, in level-0 coordinates"
            )
        call.check()
        result = segment_region(
            predictor,
            rgb,
            origin=(origin_x, origin_y),
            downsample=downsample,
            mpp=mpp,
            core=core,
            clip=clip,
            options=options,
            cancel=call,
        )
        call.check()
        nuclei = list(result.nuclei)
        if len(nuclei) > self.limits.max_polygons:
            raise too_many_polygons(len(nuclei), self.limits)
        timings = {"decode": (t_decode - t0) * 1000.0}
        for key, value in (getattr(result, "timings", None) or {}).items():
            timings[key] = float(value) * 1000.0 if not key.endswith("_ms") else float(value)
        timings["total"] = (time.perf_counter() - t0) * 1000.0
        return RegionOutcome(nuclei=nuclei, timings_ms=timings, model=str(predictor.card.name),
                             model_version=str(predictor.card.version))

    # ---- SegmentSlide -------------------------------------------------
    def segment_slide(self, request: pb.SegmentSlideRequest, call: Call) -> Iterator[pb.SegmentSlideResponse]:
        """Stream slide results; validation errors are raised before the first message."""
        with self.admit(call):
            try:
                yield from self._segment_slide(request, call)
            except Exception as exc:  # noqa: BLE001
                raise self._status(exc, "SegmentSlide") from None

    def _segment_slide(self, request: pb.SegmentSlideRequest, call: Call) -> Iterator[pb.SegmentSlideResponse]:
        from dannucnet.pipeline import segment_slide
        from dannucnet.slides import open_image

        t0 = time.perf_counter()
        path = resolve_slide(request.path, self.slide_roots)
        mpp = check_mpp(request.pixel_size_microns) if request.HasField("pixel_size_microns") else None
        options = self._options(request.options if request.HasField("options") else None)
        region = rect_from_proto(request.region, "region") if request.HasField("region") else None
        if len(request.roi_wkb) > MAX_ROIS:
            raise invalid(f"roiWkb holds {len(request.roi_wkb):,} geometries, more than {MAX_ROIS:,}: merge them")
        rois = [geometry_from_wkb(w, f"roiWkb[{i}]") for i, w in enumerate(request.roi_wkb)] or None
        try:
            source = open_image(path, mpp=mpp)
        except DanNucNetError as exc:  # name the file as the client did, not by its server path
            raise type(exc)(str(exc).replace(str(path), request.path)) from None
        try:
            mpp = source.require_mpp()
            predictor = self._predictor_for(request.model, mpp)
            if region is not None and region.intersection(Rect(0, 0, source.width, source.height)).is_empty:
                raise invalid(f"region {region.bounds()} lies outside the slide ({source.width}×{source.height})")
            yield pb.SegmentSlideResponse(
                slide=pb.SlideInfo(
                    width=source.width,
                    height=source.height,
                    pixel_size_microns=mpp,
                    pixel_size_source=str(source.mpp_source),
                )
            )
            progress = _ProgressBox()
            found = 0
            batches = segment_slide(
                predictor,
                source,
                region=region,
                rois=rois,
                options=options,
                progress=progress,
                cancel=call,
            )
            try:
                for batch in batches:
                    call.check()
                    batch = list(batch)
                    found += len(batch)
                    for start in range(0, len(batch), 1000):  # keep each message well under 4 MB
                        yield pb.SegmentSlideResponse(
                            nuclei=pb.NucleusBatch(nuclei=nuclei_to_proto(batch[start : start + 1000]))
                        )
                    yield pb.SegmentSlideResponse(progress=progress.message(found))
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # stops the pipeline's generator (and its reader threads) now
            call.check()
            yield pb.SegmentSlideResponse(
                summary=pb.SlideSummary(nucleus_count=found, seconds=time.perf_counter() - t0)
            )
        finally:
            source.close()

    # ---- PlanRegion ---------------------------------------------------
    def plan_region(self, request: pb.PlanRegionRequest, call: Call | None = None) -> pb.PlanRegionResponse:
        """Chunk plan and pixel-size verdict for a client that reads pixels itself (``service.plan``)."""
        from dannucnet.engine.tiling import WindowGrid
        from dannucnet.service.plan import plan_region

        try:
            options = self._options(request.options if request.HasField("options") else None)
            name, predictor = self._planned_model(request)
            answer = plan_region(request, float(predictor.card.mpp), options, WindowGrid.of(predictor))
            answer.model, answer.model_version = name, str(predictor.card.version)
            return answer
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            raise self._status(exc, "PlanRegion") from None

    def _planned_model(self, request: pb.PlanRegionRequest) -> tuple[str, Predictor]:
        """(the name a SegmentRegion request sends, the predictor) of the model a plan is made for.

        ``auto`` / ``auto-fast`` choose by the image's level-0 pixel size, as ``segment`` does for a slide:
        a 20× image is planned for the 20× model, read at its own pixels. (Planned for the server's startup
        model, a 20× image was read at 2× upsampling and its chunks, whose sent pixels were then 0.25 µm/px,
        went to the 40× model at 4× the work.) The name is returned so the client pins every chunk to it.
        """
        from dannucnet.catalogue import AUTO_FAST, AUTO_NAMES, choose_model
        from dannucnet.service.plan import pixel_size_verdict

        name = request.model or (self.default_model if self.default_model in AUTO_NAMES else "")
        mpp, _ = pixel_size_verdict(request)
        if name in AUTO_NAMES and mpp is not None and self.models is not None:
            entry, _ = choose_model(mpp, fast=name == AUTO_FAST)
            name = entry.name if entry is not None else ""
        if not name:
            return "", self.predictor
        return ("" if name in AUTO_NAMES else name), self._predictor_for(name, mpp)

    # ---- helpers --------------------------------------------------------
    def _check_resampled(
        self, width: int, height: int, region_mpp: float, predictor: Predictor | None = None
    ) -> None:
        """The engine rescales to the model's pixel size: coarse pixels grow, so check that size too,
        and the windows (model work) that size needs."""
        predictor = predictor or self.predictor
        card = predictor.card
        scale = region_mpp / float(card.mpp)
        pixels = width * height * scale * scale
        if pixels > self.limits.max_pixels:
            raise invalid(
                f"the region's pixels are {region_mpp:g} µm/px; resampled to the model's "
                f"{card.mpp} µm/px they become {pixels:,.0f} px, more than this server's limit "
                f"of {self.limits.max_pixels:,}: send a smaller region or a smaller downsample"
            )
        check_work(width, height, (width * scale, height * scale), predictor.tile, predictor.overlap, self.limits)

    def _options(self, msg: pb.SegmentOptions | None):
        from dannucnet.pipeline import SegmentOptions
        from dannucnet.pipeline.options import MAX_CELL_EXPANSION_UM
        from dannucnet.service.convert import stains_from_proto

        options = SegmentOptions()
        if msg is None:
            return options
        changes: dict[str, Any] = {}
        if msg.HasField("threshold"):
            t = finite(msg.threshold, "options.threshold")
            if not 0.0 < t < 1.0:
                raise invalid(f"options.threshold is {t}: it must lie strictly between 0 and 1")
            changes["threshold"] = t
        if msg.HasField("min_area_microns2"):
            changes["min_area_um2"] = in_range(
                msg.min_area_microns2, "options.minAreaMicrons2", 0.0, MAX_MIN_AREA_UM2,
                what=" µm² (a nucleus is 20-200)",
            )
        if msg.HasField("cell_expansion_microns"):
            changes["cell_expansion_um"] = in_range(
                msg.cell_expansion_microns, "options.cellExpansionMicrons", 0.0, MAX_CELL_EXPANSION_UM, what=" µm"
            )
        if msg.HasField("stains"):
            changes["stains"] = stains_from_proto(msg.stains)
        return dataclasses.replace(options, **changes) if changes else options

    def _status(self, exc: BaseException, rpc: str) -> ServiceError:
        status = from_exception(exc)
        if status.code == grpc.StatusCode.INTERNAL and not isinstance(exc, ServiceError):
            log.exception("%s failed with an unexpected error", rpc, exc_info=exc)
        return status


class _ProgressBox:
    """Receives the pipeline's progress callbacks; the stream reports them per chunk."""

    def __init__(self) -> None:
        self.done = 0
        self.total = 0

    def __call__(self, done: int, total: int, found: int = 0) -> None:
        self.done, self.total = int(done), int(total)

    def message(self, found: int) -> pb.Progress:
        fraction = self.done / self.total if self.total else 0.0
        return pb.Progress(chunks_done=self.done, chunks_total=self.total, nuclei_found=found, fraction=fraction)
