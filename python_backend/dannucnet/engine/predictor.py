"""The inference engine: RGB at the model's pixel size → nucleus probability map.

One object per device holds the network (eval mode, channels_last, autocast
on GPU) and the runtime that executes it (``engine.runtime``: PyTorch, or its ONNX
export on OpenVINO or ONNX Runtime; ``runtime="auto"`` picks OpenVINO on a CPU).
``predict`` cuts overlapping windows, runs them in batches and blends them back
(the one window loop, ``engine.tiling.WindowStream``); ``predict_tiles`` is the bare
batched call, exposed so that a server can batch windows from many requests into one
forward pass. What callers may rely on is the torch-free ``dannucnet.protocols.Predictor``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch

from dannucnet.engine.colour import ColourReference, normalise_colour
from dannucnet.engine.device import autocast, choose_device
from dannucnet.engine.runtime import build_forward, resolve_runtime
from dannucnet.engine.tiling import (
    BlendAccumulator,
    GlassMap,
    TileFunctionRunner,
    WindowedImage,
    cheapest_window,
    predict_windows,
)
from dannucnet.errors import InputError, ModelError
from dannucnet.model import LoadedModel, ModelCard
from dannucnet.protocols import Cancel, TileFunction, WindowProgress

log = logging.getLogger(__name__)

__all__ = ["FLIPS", "Predictor", "forward_map", "model_map"]


def model_map(prob: torch.Tensor) -> torch.Tensor:
    """N×C×T×T sigmoid outputs → the map layout every consumer reads: N×T×T for one channel, N×T×T×C for more."""
    return prob[:, 0] if prob.shape[1] == 1 else prob.permute(0, 2, 3, 1)


#: The four flips test-time augmentation averages over (tensor dims of N×C×H×W).
FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


def forward_map(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """N×3×T×T input → sigmoid outputs in :func:`model_map` layout.

    ``tta`` averages the outputs over the four flips of each window (each flipped back
    first): about 0.5 pixel-F1 and 1 AJI point on held-out Kumar rows, at four times
    the model time.
    """
    if not tta:
        return model_map(torch.sigmoid(forward(x).float()))
    total = None
    for dims in FLIPS:
        out = torch.sigmoid(forward(x.flip(dims) if dims else x).float())
        out = out.flip(dims) if dims else out
        total = out if total is None else total + out
    return model_map(total / len(FLIPS))

class Predictor:
    """Runs a loaded DAN-NucNet on one device.

    ``overlap`` is the least overlap between neighbouring windows, 32 px by default
    (MODEL_SPEC §4 planning); windows are spread evenly, so most overlap more
    (``tiling.window_starts``). ``tile`` is the windows' side: ``tile_size`` if given, else
    the card's ``window``, else its training patch (``tile_size``). The shipped cards say 512:
    with the 32 px overlap, 256² windows run (256/224)² = 1.31 network pixels per image pixel
    and 512² windows (512/480)² = 1.14, at about the same cost per pixel (OpenVINO fp32, 2-core
    AVX2 EPYC: 3.9 against 4.1 µs). A 4096² 20× slide ran 1.17× faster end to end
    (``benchmarks/bench_window.py``) with the same nuclei, and held-out F1, AJI and PQ moved
    by less than 0.2 points (``docs/performance.md``). Slide chunks are cut to fill ``tile``
    windows; any other image runs on whichever of the card's window and training patch puts
    fewer pixels through the network (``tiling.cheapest_window``: a 1000² image takes 25
    windows of 256², 1.64 M pixels, not 9 of 512², 2.36 M). ``sides`` holds the choices.
    ``runtime`` is ``torch`` for library callers (exactly the network they pass); the
    command-line doors default to ``auto`` (``engine.runtime``). Batch size defaults to 2
    windows on the CPU, where larger batches fall out of cache and get slower per window,
    and on a GPU to as many as make 32 windows of 256² (8 of 512²). ``skip_glass`` (default on):
    windows of nothing but glass are not run (``tiling.GlassMap``).
    """

    def __init__(
        self,
        model: LoadedModel,
        device: str = "auto",
        batch_size: int | None = None,
        overlap: int = 32,
        tile_size: int | None = None,
        tta: bool = False,
        runtime: str = "torch",
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.tta = tta  # test-time augmentation: average over four flips (see forward_map)
        self.skip_glass = True  # windows of glass only are blended as zeros, not run (tiling.GlassMap)
        self.device = choose_device(device)
        self.tile = tile_size or model.card.window or model.card.tile_size
        patch = model.card.tile_size
        self.sides = (self.tile,) if tile_size or patch >= self.tile else (self.tile, patch)
        stride = model.network.config.stride
        if self.tile % stride:
            raise InputError(f"tile size must be a multiple of {stride}, got {self.tile}")
        self.overlap = overlap
        self.batch_size = batch_size or (2 if self.device.type == "cpu" else max(1, 32 * 256**2 // self.tile**2))
        self.network = model.network.eval().to(self.device).to(memory_format=torch.channels_last)
        # forward: N×3×T×T float → N×C×T×T logits, by whichever runtime runs here (threads: the
        # runtime's own default, all cores, unless given; torch's are set by the caller)
        self.forward, self.runtime, self.precision = build_forward(
            resolve_runtime(runtime, self.device), self.network, model.source, self.tile, threads)
        self._lock = threading.Lock()  # one forward pass at a time per device
        try:
            self.colour = ColourReference.from_dict(model.card.colour_reference)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card {model.card.name!r}: invalid colour_reference: {exc}") from exc

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """What the network is fed for a whole chunk: its colours normalised as in training (if the card says so).

        Done per chunk, never per window, so overlapping windows agree and blend without seams.
        """
        return normalise_colour(rgb, self.colour)

    @property
    def channels(self) -> int:
        """Channels of the maps this predictor returns (1: H×W probability; 2: H×W×2 with distance)."""
        return self.network.config.outputs

    @property
    def description(self) -> str:
        """Device, runtime and precision in one phrase, e.g. ``cpu (openvino bf16)``: what logs and ModelInfo say."""
        precision = self.precision if self.runtime != "torch" or self.device.type == "cpu" else "autocast"
        return f"{self.device} ({self.runtime} {precision})"

    @property
    def card(self) -> ModelCard:
        return self.model.card

    @torch.inference_mode()
    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """N×T×T×3 uint8 → N×T×T float32 probabilities (N×T×T×2 with the distance head; no tiling, no blending)."""
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with self._lock, autocast(self.device):
            prob = forward_map(self.forward, x, self.tta)
        return prob.cpu().numpy()

    def predict(
        self,
        rgb: np.ndarray,
        tile_fn: TileFunction | None = None,
        progress: WindowProgress | None = None,
        cancel: Cancel | None = None,
        batch_size: int | None = None,
        within: np.ndarray | None = None,
    ) -> np.ndarray:
        """H×W×3 uint8 (already at the model's pixel size) → H×W float32 probabilities.

        With a distance head the map is H×W×2: probability, then normalised distance.
        ``tile_fn`` replaces :meth:`predict_tiles` (the server's micro-batcher, a test's
        stand-in network), handed ``batch_size`` windows at a time (default: this
        predictor's ``batch_size``). ``within`` (H×W bool) marks the pixels whose map is
        wanted: with ``skip_glass``, windows holding none of them are not run, like windows of
        glass, and the map reads 0 where only such windows reach.
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"expected an H×W×3 uint8 RGB array, got {rgb.shape} {rgb.dtype}")
        if rgb.shape[0] < 1 or rgb.shape[1] < 1:
            raise InputError("empty image")
        if within is not None and within.shape != rgb.shape[:2]:
            raise InputError(f"the mask of wanted pixels is {within.shape}, the image {rgb.shape[:2]}")
        prepared = self.prepare(rgb)
        glass = GlassMap(prepared, within) if self.skip_glass else None
        side = cheapest_window(rgb.shape[0], rgb.shape[1], self.sides, self.overlap, glass)
        image = WindowedImage(prepared, side, self.overlap, lambda h, w: self.new_blend(h, w, side),
                              skip_glass=self.skip_glass, glass=glass)
        runner = TileFunctionRunner(tile_fn or self.predict_tiles, batch_size or self.batch_size, side)
        return predict_windows(image, runner, progress=progress, cancel=cancel)

    def window_for(self, height: int, width: int) -> int:
        """The window side :meth:`predict` cuts a height × width image into (of ``sides``), glass aside."""
        return cheapest_window(height, width, self.sides, self.overlap)

    def new_blend(self, height: int, width: int, tile: int | None = None) -> BlendAccumulator:
        """The accumulator one image's windows (``tile`` px, default ``self.tile``) blend into (host memory)."""
        return BlendAccumulator(height, width, tile or self.tile, self.overlap, self.channels)
