"""Batched windows → probabilities on the device, built for throughput rather than one call.

What :meth:`Predictor.predict_tiles` does, rearranged so the GPU never waits:
windows are copied into a ring of pinned host buffers (the copy to the GPU is
asynchronous and the next batch is filled while this one runs), the network runs
in bf16 with channels_last (optionally through ``torch.compile``, falling back to
eager if compilation fails), and the blending of overlapping windows happens on
the device, so only a finished chunk's probability map comes back to the host.
On the CPU every step is the same arithmetic as ``Predictor.predict`` (fp32, the
same blend weights, the same order), so results agree with the reference path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from dannucnet.engine.predictor import Predictor, forward_map
from dannucnet.engine.tiling import (
    Blend,
    BlendAccumulator,
    Window,
    WindowedImage,
    blend_weights,
    map_shape,
    norm_shape,
    predict_windows,
)

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    batches: int = 0
    tiles: int = 0
    model_seconds: float = 0.0  # device time of the forward passes (CUDA events on a GPU)
    compiled: bool = False
    precision: str = "fp32"


class ChunkBlend:
    """Accumulator of one chunk's weighted windows on the GPU, with BlendAccumulator's arithmetic.

    It lives on the device; only the finished map is copied back. On the CPU the engine
    blends with :class:`~dannucnet.engine.tiling.BlendAccumulator` itself (plain numpy):
    small torch ops would each wake the OpenMP team, whose spinning threads then starve
    the reader and post-processing threads.
    """

    def __init__(
        self, height: int, width: int, weights: torch.Tensor, device: torch.device, channels: int = 1
    ) -> None:
        self.tile = weights.shape[0]
        self.total = torch.zeros(map_shape(height, width, channels), dtype=torch.float32, device=device)
        self.norm = torch.zeros(norm_shape(height, width, channels), dtype=torch.float32, device=device)
        self.weights = weights[..., None] if channels > 1 else weights  # broadcasts over the channels

    def add(self, window: Window, values: torch.Tensor) -> None:
        t = self.tile
        sl = (slice(window.y, window.y + t), slice(window.x, window.x + t))
        self.total[sl] += values * self.weights
        self.norm[sl] += self.weights

    def add_glass(self, window: Window) -> None:
        t = self.tile
        self.norm[window.y : window.y + t, window.x : window.x + t] += self.weights

    def result(self) -> np.ndarray:
        return (self.total / torch.clamp_min(self.norm, 1e-12)).cpu().numpy()


class TileEngine:
    """The predictor's network, fed in fixed-size batches from pinned host buffers.

    A :class:`~dannucnet.engine.tiling.BatchRunner`: the window loop
    (``tiling.WindowStream``) copies windows into :meth:`host_buffer` and calls :meth:`run`.
    """

    def __init__(
        self,
        predictor: Predictor,
        batch_size: int | None = None,
        precision: str = "auto",
        compile: bool = False,  # noqa: A002 - the torch.compile switch, named after it
        buffers: int = 3,
    ) -> None:
        self.predictor = predictor
        self.device = predictor.device
        self.tile = predictor.tile
        self.batch_size = int(batch_size or predictor.batch_size)
        self.network = predictor.network
        self.stats = EngineStats()
        cuda = self.device.type == "cuda"
        if precision == "auto":
            precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if cuda else "fp32")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16; got {precision!r}")
        self.stats.precision = precision
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
        t, b = self.tile, self.batch_size
        self._host = [torch.empty((b, t, t, 3), dtype=torch.uint8, pin_memory=cuda) for _ in range(max(1, buffers))]
        self._host_np = [h.numpy() for h in self._host]  # filled with numpy: no OpenMP wake-ups per window
        self._ready = [None] * len(self._host)  # CUDA event: the buffer's copy to the device has finished
        self._next = 0
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.weights = torch.from_numpy(blend_weights(t, predictor.overlap)).to(self.device)
        self._forward = predictor.forward  # PyTorch, or the exported network's runtime
        self._pad_batches = False
        if compile and predictor.runtime == "torch":
            self._try_compile()

    # -- set-up -------------------------------------------------------------
    def _try_compile(self) -> None:
        """torch.compile with a fixed batch shape; any failure falls back to eager, with a log line."""
        try:
            compiled = torch.compile(self.network, dynamic=False)
            x = torch.zeros((self.batch_size, 3, self.tile, self.tile), device=self.device)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), self._autocast():
                compiled(x)
            self._forward = compiled
            self._pad_batches = True  # one shape only: no recompilation for a short last batch
            self.stats.compiled = True
        except Exception as exc:  # noqa: BLE001 - compilation is an optimisation, never a requirement
            log.warning("torch.compile failed (%s: %s); running the network eagerly", type(exc).__name__, exc)
            self._forward = self.predictor.forward
            self._pad_batches = False

    def _autocast(self):
        if self._dtype is None:
            import contextlib

            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    # -- batches ------------------------------------------------------------
    def host_buffer(self) -> np.ndarray:
        """The next free (pinned) buffer as a B×T×T×3 uint8 array; waits only if the GPU has not yet copied it."""
        i = self._next
        event = self._ready[i]
        if event is not None:
            event.synchronize()
        return self._host_np[i]

    @torch.inference_mode()
    def run(self, n: int) -> torch.Tensor | np.ndarray:
        """Run the first ``n`` tiles of the current host buffer → n×T×T float32 probabilities
        (a device tensor on a GPU, a numpy array on the CPU)."""
        i = self._next
        self._next = (i + 1) % len(self._host)
        host = self._host[i]
        count = self.batch_size if self._pad_batches else n
        if self._pad_batches and n < count:
            host[n:count].zero_()
        cuda = self.device.type == "cuda"
        x = host[:count].to(self.device, non_blocking=True)
        if cuda:
            event = torch.cuda.Event()
            event.record()
            self._ready[i] = event
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        x = x.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with self.predictor._lock, self._autocast():  # the predictor may be shared (server)
            prob = forward_map(self._forward, x, self.predictor.tta)[:n]
        if cuda:
            end.record()
            self._timing.append((start, end))
        else:
            self.stats.model_seconds += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.tiles += n
        return prob if cuda or self.device.type != "cpu" else prob.numpy()

    def finish_stats(self) -> EngineStats:
        """Collect device timings (one synchronisation, at the end)."""
        if self.device.type == "cuda" and self._timing:
            torch.cuda.synchronize(self.device)
            self.stats.model_seconds += sum(s.elapsed_time(e) for s, e in self._timing) / 1000.0
            self._timing = []
        return self.stats

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """One H×W×3 uint8 image → H×W probabilities (what ``Predictor.predict`` returns), via this engine."""
        image = WindowedImage(self.predictor.prepare(rgb), self.tile, self.predictor.overlap, self.new_blend,
                              skip_glass=self.predictor.skip_glass)
        return predict_windows(image, self)

    def new_blend(self, height: int, width: int) -> Blend:
        """The accumulator of one image's windows: on the device on a GPU, numpy on the CPU."""
        if self.device.type == "cpu":
            return BlendAccumulator(height, width, self.tile, self.predictor.overlap, self.predictor.channels)
        return ChunkBlend(height, width, self.weights, self.device, self.predictor.channels)
