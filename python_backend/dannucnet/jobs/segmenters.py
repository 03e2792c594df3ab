"""Where the model runs: in this process, or on a ``dannucnet serve`` server.

Every door that segments whole images (``segment``, ``demo``, ``batch``,
``batch-slides``) takes a segmenter, so running against a remote GPU is one
flag and gives the same nuclei: the server path plans chunks exactly as the
local one (``pipeline.plan_slide``) and sends each chunk with its core.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shapely.geometry.base import BaseGeometry

from dannucnet.errors import DanNucNetError, InputError
from dannucnet.geometry.ownership import Rect
from dannucnet.pipeline.types import Nucleus
from dannucnet.protocols import Progress, Segmenter

if TYPE_CHECKING:
    from dannucnet.catalogue import CatalogueEntry
    from dannucnet.engine.pool import PredictorPool
    from dannucnet.protocols import Cancel, Predictor
    from dannucnet.slides import ImageSource

log = logging.getLogger(__name__)


class _CollectMixin:
    def segment(
        self: Segmenter, path: Path, rois: list[BaseGeometry] | None, mpp: float | None, progress: Progress | None
    ) -> list[Nucleus]:
        """All nuclei of an image at once (the QuPath batch writes an image in one go)."""
        from dannucnet.slides import open_image

        with open_image(path, mpp=mpp) as source:
            return [n for batch in self.stream(source, rois=rois, progress=progress) for n in batch]


class LocalSegmenter(_CollectMixin):
    """In-process: ``pipeline.segment_slide`` on a loaded ``Predictor``, or with ``pipelined`` the
    staged runner that keeps a GPU fed while slides decode and nuclei are traced (same nuclei).

    Given a :class:`~dannucnet.engine.pool.PredictorPool` instead of a predictor, the model is
    chosen per image (``--model auto``) by :meth:`choose_for`; the ``model_*`` attributes then
    name the model of the image being segmented.
    """

    def __init__(
        self, predictor: Predictor | PredictorPool[Any], options: Any = None, pipelined: bool = False
    ) -> None:
        from dannucnet.engine.pool import PredictorPool

        self.pool = predictor if isinstance(predictor, PredictorPool) else None
        self.pipelined = pipelined
        self.options = options
        self.predictor: Any = None  # the engine's Predictor in use
        self._chosen_for: float | None = None
        if not isinstance(predictor, PredictorPool):
            self._use(predictor)
        else:  # named once the first image's pixel size is known (choose_for)
            self.model_name, self.model_version, self.model_trained, self.device = "auto", "", True, "auto"

    def _use(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.model_name = str(predictor.card.name)
        self.model_version = str(predictor.card.version)
        self.model_trained = bool(predictor.card.trained)
        self.device = predictor.description

    def choose_for(self, mpp: float | None) -> str:
        """Pick the model for an image of ``mpp`` µm/px (a no-op with one fixed predictor); returns why."""
        if self.pool is None:
            return f"model {self.model_name}"
        if self.predictor is not None and mpp == self._chosen_for:
            return f"model {self.model_name}"
        predictor, reason = self.pool.for_image(mpp)
        log.info("%s", reason)
        self._use(predictor)
        self._chosen_for = mpp
        return reason

    def stream(
        self, source: ImageSource, region: Rect | None = None, rois: list[BaseGeometry] | None = None,
        progress: Progress | None = None, cancel: Cancel | None = None,
    ) -> Iterator[list[Nucleus]]:
        from dannucnet.pipeline import SegmentOptions, segment_slide
        from dannucnet.pipeline.pipelined import segment_slide_pipelined
        from dannucnet.pipeline.slide import resolve_stains

        options = self.options if self.options is not None else SegmentOptions()
        run = segment_slide_pipelined if self.pipelined else segment_slide
        self.choose_for(source.mpp)
        options = resolve_stains(source, options)  # --stains auto: this image's own
        yield from run(self.predictor, source, region=region, rois=rois, options=options,
                       progress=progress, cancel=cancel)


class ServerSegmenter(_CollectMixin):
    """Through ``dannucnet serve`` with :class:`dannucnet.client.DanNucNetClient`.

    By path (SegmentSlide) when the server has slide roots and accepts this
    file's path (it shares the file system); otherwise this machine reads the
    slide and sends pixels in chunks with cores, which gives the same nuclei.
    """

    def __init__(
        self, address: str, token: str | None = None, options: Any = None, model: str | None = None,
        one_model: bool = False,
    ) -> None:
        """``model``: a name the server lists, ``auto`` / ``auto-fast`` (chosen here per image from the
        server's list, by the server's own rule, and then named in every request, so the output names the
        model that ran), or ``None`` for the server's default. ``one_model``: settle ``auto`` once, for an
        image of unknown pixel size (the QuPath batch tags every image's detections with one model)."""
        from dannucnet.catalogue import AUTO_NAMES
        from dannucnet.client import DanNucNetClient

        self.client = DanNucNetClient(address, token=token)
        self.address = address
        self.info = self.client.model_info()
        self.model_name = str(self.info.name)
        self.model_version = str(self.info.version)
        self.model_trained = bool(getattr(self.info, "trained", True))
        listing = self.client.list_models()
        self.catalogue = self.client.catalogue(listing)
        wanted = model or (listing.default_model if listing.default_model in AUTO_NAMES else "")
        self.auto = wanted if wanted in AUTO_NAMES else ""
        self._chosen = False  # a model chosen for self._chosen_mpp (None: an image of unknown pixel size)
        self._chosen_mpp: float | None = None
        self.model_mpp: float | None = None  # the named model's pixel size: chunks are read at it (None: the server's)
        if self.auto:
            self.choose_for(None)
            if one_model:
                self.auto = ""
        elif wanted:  # a model by name: refused here, before any image, when the server does not list it
            entry = next((m for m in self.catalogue if m.name == wanted), None)
            if entry is None:
                raise InputError(f"the server at {address} has no model {wanted!r}")
            self._pin(entry)
        self.device = f"{self.info.device} on {address}"
        self.options = options
        self.by_path = bool(self.info.slide_segmentation_enabled)

    def choose_for(self, mpp: float | None) -> str:
        """With ``auto`` / ``auto-fast``: the server's model for an image of ``mpp`` µm/px, named in the
        requests from now on; returns why."""
        from dannucnet.catalogue import AUTO_FAST, choose_model

        if not self.auto or (self._chosen and self._chosen_mpp == mpp):
            return f"model {self.model_name}"
        entry, reason = choose_model(mpp, self.catalogue, fast=self.auto == AUTO_FAST)
        if entry is None:  # nothing trained listed: let the server answer for itself
            self.client.model = self.auto
            return reason
        self._pin(entry)
        self._chosen, self._chosen_mpp = True, mpp
        if mpp is not None:
            log.info("--model %s on %s: %s", self.auto, self.address, reason)
        return reason

    def _pin(self, entry: CatalogueEntry) -> None:
        """Name ``entry`` in every request from now on, and describe the output by it."""
        self.client.model = entry.name
        self.model_name, self.model_version, self.model_trained = entry.name, entry.version, entry.trained
        self.model_mpp = entry.mpp

    def stream(
        self, source: ImageSource, region: Rect | None = None, rois: list[BaseGeometry] | None = None,
        progress: Progress | None = None, cancel: Cancel | None = None,
    ) -> Iterator[list[Nucleus]]:
        options = self.options
        self.choose_for(source.mpp)
        if getattr(options, "auto_stains", False):  # --stains auto: estimated here, sent as vectors
            from dannucnet.pipeline.slide import resolve_stains

            options = resolve_stains(source, options)
        path = source.path
        if self.by_path and region is None:
            sent = False
            try:
                for batch in self.client.segment_slide(
                    str(Path(path).resolve()), rois=rois, options=options, mpp=source.given_mpp, progress=progress
                ):
                    sent = True
                    yield batch
                return
            except DanNucNetError as exc:
                # the server cannot open this path (outside its slide roots, or not on its file system)
                code = getattr(getattr(exc, "code", None), "name", "")
                if sent or not (isinstance(exc, InputError) or code in ("PERMISSION_DENIED", "NOT_FOUND")):
                    raise
                log.info("server cannot read %s itself (%s): sending pixels instead", path, exc)
                self.by_path = False
        from dannucnet.pipeline.remote import segment_image_via_server

        yield from segment_image_via_server(self.client, source, region=region, options=options, rois=rois,
                                            progress=progress, cancel=cancel, model_mpp=self.model_mpp)
