"""Python client for ``dannucnet serve`` (gRPC): the wire only.

>>> from dannucnet.client import DanNucNetClient
>>> with DanNucNetClient("127.0.0.1:50051", token=None) as client:
...     info = client.model_info()
...     nuclei = client.segment_region(rgb, origin=(x, y), downsample=1.0, mpp=0.25)

The chunk loops through a server (``segment_large_region`` for an array too
big for one request, ``segment_image_via_server`` for a slide on this machine)
live in :mod:`dannucnet.pipeline.remote` with the other chunk loops; both
names stay importable from here.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from dannucnet.catalogue import CatalogueEntry
from dannucnet.errors import CancelledError, DanNucNetError, InputError
from dannucnet.geometry.ownership import Rect
from dannucnet.pipeline.types import Nucleus
from dannucnet.protocols import Progress
from dannucnet.service import API_VERSION
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service._generated.v1 import segmentation_pb2_grpc as pb_grpc
from dannucnet.service.convert import nuclei_from_proto, rect_to_proto

__all__ = [
    "DanNucNetClient",
    "ServerError",
    "SlideStream",
]

_RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)

# A deadline can end a call as CANCELLED: the server's copy of the deadline cancels the
# stream, and under load its reset reaches the client before the client's own timer
# fires (seen once in CI: 0.3 s timeout, status CANCELLED with no details). A CANCELLED
# call the caller did not cancel, arriving this close to its deadline or later, is a
# deadline. 50 ms is far above the header's rounding and loopback latency (< 1 ms).
_DEADLINE_SLACK_S = 0.05


def _deadline(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` at which a call given ``timeout`` seconds ends."""
    return None if timeout is None else time.monotonic() + timeout


class ServerError(DanNucNetError):
    """The server refused or failed a request; ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class DanNucNetClient:
    """A connection to one server. Thread-safe: share one client between threads."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 600.0,
        retries: int = 4,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.SegmentationStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._info: pb.ModelInfo | None = None
        self.model = ""  # sent as every request's `model` ("": the server's default; "auto"; a name from list_models)

    # ---- lifecycle ------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DanNucNetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ----------------------------------------------------------
    def _unary(self, method: Callable, request: Any, timeout: float | None) -> Any:
        delay = 0.2
        timeout = timeout or self.timeout
        for attempt in range(self.retries + 1):
            deadline = _deadline(timeout)
            try:
                return method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() in _RETRYABLE and attempt < self.retries:
                    time.sleep(delay)  # back-pressure: the server asked us to wait
                    delay *= 2
                    continue
                raise self._error(exc, deadline) from None
        raise AssertionError("unreachable")

    def _error(self, exc: grpc.RpcError, deadline: float | None = None) -> DanNucNetError:
        """A readable error for a failed call; ``deadline`` (monotonic) tells a timeout from a cancel."""
        code, details = exc.code(), exc.details() or ""
        near_deadline = deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S
        if code == grpc.StatusCode.CANCELLED and near_deadline:
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, details or "Deadline Exceeded"
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerError(
                code, f"cannot reach the DAN-NucNet server at {self.address} ({details}); is `dannucnet serve` running?"
            )
        if code == grpc.StatusCode.CANCELLED:
            return CancelledError(details or "cancelled")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InputError(f"the server refused the request: {details}")
        return ServerError(code, f"server {self.address}: {code.name}: {details}")

    def model_info(self, timeout: float | None = 30.0) -> pb.ModelInfo:
        """What the server runs; raises if it speaks another API version."""
        info = self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        if info.api_version != API_VERSION:
            raise ServerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"server {self.address} speaks API {info.api_version!r}; this client needs {API_VERSION!r}",
            )
        self._info = info
        return info

    def list_models(self, timeout: float | None = 30.0) -> pb.ListModelsResponse:
        """The models installed on the server; a request may name any of them."""
        return self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)

    def catalogue(self, listing: pb.ListModelsResponse | None = None) -> list[CatalogueEntry]:
        """The server's models as :class:`~dannucnet.catalogue.CatalogueEntry`: what the server's own
        ``auto`` / ``auto-fast`` choose from, so :func:`~dannucnet.catalogue.choose_model` makes the
        same choice here."""
        listing = self.list_models() if listing is None else listing
        return [
            CatalogueEntry(
                name=m.name, version=m.version, mpp=m.pixel_size_microns, trained=m.trained, licence=m.licence,
                path="", has_weights=m.has_weights, card_name=m.name,
                metrics={**dict(m.metrics), **({"split": m.metrics_split} if m.metrics_split else {})},
                base_filters=m.base_filters or 32, depth=m.depth or 4,
            )
            for m in listing.models
        ]

    def segment_region_response(
        self,
        image: np.ndarray | bytes,
        origin: tuple[float, float] = (0.0, 0.0),
        downsample: float = 1.0,
        mpp: float | None = None,
        core: Rect | None = None,
        clip: BaseGeometry | None = None,
        options: Any = None,
        timeout: float | None = None,
    ) -> pb.SegmentRegionResponse:
        """The raw response (nuclei as WKB, timings) of one SegmentRegion call."""
        request = build_region_request(image, origin, downsample, mpp, core, clip, options)
        request.model = self.model
        return self._unary(self._stub.SegmentRegion, request, timeout)

    def segment_region(
        self,
        image: np.ndarray | bytes,
        origin: tuple[float, float] = (0.0, 0.0),
        downsample: float = 1.0,
        mpp: float | None = None,
        core: Rect | None = None,
        clip: BaseGeometry | None = None,
        options: Any = None,
        timeout: float | None = None,
    ) -> list[Nucleus]:
        """Segment one region: ``image`` is H×W×3 uint8 RGB or the bytes of a PNG/JPEG/TIFF file.

        ``origin``/``downsample`` place the pixels in level-0 coordinates,
        ``mpp`` is the level-0 pixel size (µm/px), ``core`` keeps only nuclei
        whose centroid it contains, ``clip`` only those inside the polygon;
        ``options`` is a ``pipeline.SegmentOptions`` or a mapping with
        ``threshold`` / ``min_area_um2``.
        """
        response = self.segment_region_response(image, origin, downsample, mpp, core, clip, options, timeout)
        return nuclei_from_proto(response.nuclei)

    def segment_slide(
        self,
        path: str,
        region: Rect | None = None,
        rois: Sequence[BaseGeometry] | None = None,
        options: Any = None,
        mpp: float | None = None,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> SlideStream:
        """Stream the nuclei of a slide the *server* reads (path under its --slide-root).

        Returns an iterator of one list of nuclei per chunk; ``progress(done,
        total, found)`` is called as chunks finish. ``stream.cancel()`` (from any
        thread), ``close()`` or leaving a ``with`` block cancels the call, and
        the server stops working on it.
        """
        request = pb.SegmentSlideRequest(path=str(path), options=options_to_proto(options), model=self.model)
        if region is not None:
            request.region.CopyFrom(rect_to_proto(region))
        for roi in rois or ():
            request.roi_wkb.append(shapely.to_wkb(roi))
        if mpp is not None:
            request.pixel_size_microns = mpp
        deadline = _deadline(timeout)
        call = self._stub.SegmentSlide(request, timeout=timeout, metadata=self._metadata)
        return SlideStream(call, progress, self._error, deadline)


class SlideStream:
    """Iterator over a SegmentSlide call: lists of nuclei, one per chunk; cancellable."""

    def __init__(self, call: Any, progress: Progress | None, error: Callable, deadline: float | None = None) -> None:
        self._call = call
        self._progress = progress
        self._error = error
        self._deadline = deadline  # monotonic; None once the caller cancels (then CANCELLED is theirs)
        self.slide: pb.SlideInfo | None = None
        self.summary: pb.SlideSummary | None = None

    def __iter__(self) -> SlideStream:
        return self

    def __next__(self) -> list[Nucleus]:
        try:
            for message in self._call:
                kind = message.WhichOneof("event")
                if kind == "nuclei":
                    return nuclei_from_proto(message.nuclei.nuclei)
                if kind == "progress" and self._progress is not None:
                    p = message.progress
                    self._progress(p.chunks_done, p.chunks_total, p.nuclei_found)
                elif kind == "slide":
                    self.slide = message.slide
                elif kind == "summary":
                    self.summary = message.summary
        except grpc.RpcError as exc:
            raise self._error(exc, self._deadline) from None
        raise StopIteration

    def cancel(self) -> None:
        """Stop the server's work on this slide (safe from any thread, and when finished)."""
        self._deadline = None
        self._call.cancel()

    close = cancel

    def __enter__(self) -> SlideStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


# ---- request building ---------------------------------------------------
#: What a mapping of options may name: the fields the proto carries, by either name.
SENT_OPTIONS = frozenset({"threshold", "min_area_um2", "min_area_microns2", "cell_expansion_um",
                          "cell_expansion_microns", "stains"})


def options_to_proto(options: Any) -> pb.SegmentOptions:
    """``pipeline.SegmentOptions``, a mapping, or None → the proto options."""
    if options is None:
        return pb.SegmentOptions()
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        # field by field, not asdict(): that would turn the Stains inside into a plain dict
        values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    elif isinstance(options, Mapping):
        values = dict(options)
        unknown = sorted(str(k) for k in set(values) - SENT_OPTIONS)
        if unknown:  # {"min_area": 150} was dropped without a word (HTTP/JSON reports a typo; so does this)
            raise InputError(f"unknown segmentation options {unknown}: a server takes {sorted(SENT_OPTIONS)}")
    else:
        raise TypeError(f"options must be SegmentOptions or a mapping, not {type(options).__name__}")
    if values.get("auto_stains"):
        raise InputError("auto_stains is estimated on the client's side, from the image: estimate the stains "
                         "(dannucnet.geometry.qupath_stains.estimate_stains) and send them as stains")
    msg = pb.SegmentOptions()
    if values.get("threshold") is not None:
        msg.threshold = float(values["threshold"])
    area = values.get("min_area_um2", values.get("min_area_microns2"))
    if area is not None:
        msg.min_area_microns2 = float(area)
    expansion = values.get("cell_expansion_um", values.get("cell_expansion_microns"))
    if expansion:
        msg.cell_expansion_microns = float(expansion)
    stains = values.get("stains")
    if stains is not None:
        from dannucnet.geometry.qupath_stains import Stains, parse_stains
        from dannucnet.service.convert import stains_to_proto

        msg.stains.CopyFrom(stains_to_proto(stains if isinstance(stains, Stains) else parse_stains(stains)))
    return msg


def build_region_request(
    image: np.ndarray | bytes,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    mpp: float | None = None,
    core: Rect | None = None,
    clip: BaseGeometry | None = None,
    options: Any = None,
) -> pb.SegmentRegionRequest:
    request = pb.SegmentRegionRequest(
        origin_x=float(origin[0]),
        origin_y=float(origin[1]),
        downsample=float(downsample),
        options=options_to_proto(options),
    )
    if mpp is not None:
        request.pixel_size_microns = float(mpp)
    if isinstance(image, (bytes, bytearray, memoryview)):
        request.image.encoded = bytes(image)
    else:
        rgb = np.ascontiguousarray(image)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"expected an H×W×3 uint8 RGB array, got {rgb.shape} {rgb.dtype}")
        request.image.raw.data = rgb.tobytes()
        request.image.raw.width = rgb.shape[1]
        request.image.raw.height = rgb.shape[0]
    if core is not None:
        request.core.CopyFrom(rect_to_proto(core))
    if clip is not None:
        request.clip_wkb = shapely.to_wkb(clip)
    return request


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---- chunk loops through a server: they live with the other chunk loops ----------
_MOVED = {"segment_image_via_server", "segment_large_region"}


def __getattr__(name: str) -> Any:
    """``segment_image_via_server`` and ``segment_large_region`` moved to ``pipeline.remote``; still importable here."""
    if name in _MOVED:
        from dannucnet.pipeline import remote

        return getattr(remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
