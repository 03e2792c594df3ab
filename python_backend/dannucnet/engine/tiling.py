"""Sliding windows over an array and their blending back into one map.

Windows overlap and are blended with weights that fall towards each window's
border, where a convolutional network sees the least context. Weights are
normalised by their sum, so an identity network reconstructs its input
exactly — the property the tests check — and no per-window normalisation of
the *input* ever happens (that is what makes visible seams).

This module is also the one window loop (:class:`WindowedImage`, :class:`WindowStream`):
``Predictor.predict``, ``TileEngine.predict`` and the pipelined runner's model thread all
cut, batch and blend through it; they differ only in what runs a batch
(:class:`BatchRunner`). Windows of nothing but glass never reach the network
(:class:`GlassMap`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dannucnet.engine.colour import GLASS_LEVEL
from dannucnet.errors import CancelledError
from dannucnet.protocols import Cancel


@dataclass(frozen=True)
class Window:
    y: int
    x: int


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts covering [0, length) with windows of ``tile``, spread evenly, none further apart than ``stride``.

    As few windows as a grid of ``stride`` needs, but their spare room shared out
    between all gaps instead of left in one wide overlap before the end-aligned
    last window: every overlap is at least ``tile - stride`` and most are wider,
    so less of the map comes from window borders, where the network sees least
    context. On the held-out rows of the Kumar training images (1.5's maps, as many
    windows as the grid) pixel F1 went 80.48 → 80.51, AJI 55.89 → 56.02, PQ 52.55 →
    53.10 and detection F1 70.77 → 71.53.
    """
    if length <= tile:
        return [0]
    gaps = -(-(length - tile) // stride)  # ceil: the fewest gaps no wider than stride
    return [(i * (length - tile)) // gaps for i in range(gaps + 1)]


@dataclass(frozen=True)
class WindowGrid:
    """A network's windows: ``tile`` px square, neighbours overlapping at least ``overlap`` px."""

    tile: int
    overlap: int

    @classmethod
    def of(cls, predictor: Any) -> WindowGrid:
        """The windows a predictor (``protocols.Predictor``: ``tile``, ``overlap``) cuts."""
        return cls(int(predictor.tile), int(predictor.overlap))

    def count(self, length: int) -> int:
        """Windows along an axis of ``length`` px (an axis shorter than a tile is padded to one)."""
        return len(window_starts(length, self.tile, self.tile - self.overlap))

    def over(self, height: int, width: int) -> int:
        """Windows over a height × width image (each axis as :meth:`count`)."""
        return self.count(height) * self.count(width)

    def span(self, n: int) -> int:
        """The longest axis ``n`` windows cover: ``count(span(n)) == n``."""
        return self.tile + (self.tile - self.overlap) * (n - 1)


def plan_windows(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, {tile}), got {overlap}")
    stride = tile - overlap
    return [Window(y, x) for y in window_starts(height, tile, stride) for x in window_starts(width, tile, stride)]


def cheapest_window(
    height: int, width: int, sides: Sequence[int], overlap: int, glass: GlassMap | None = None
) -> int:
    """The window side, of ``sides``, that runs the fewest network pixels over a height × width image.

    Large windows run fewer pixels twice (512² windows overlapping 32 px: (512/480)² = 1.14 network
    pixels per pixel; 256²: 1.31) but round an image up in coarser steps: a 1000² image takes 3 × 3
    windows of 512 (2.36 M network pixels) or 5 × 5 of 256 (1.64 M). With ``glass`` (the image's
    :class:`GlassMap`) windows of glass only are not counted, since they are not run: small windows
    follow the edge of tissue more closely (chunks of a 4096² 20× synthetic slide, 60 % tissue:
    1.03 network pixels per slide pixel with 512² windows, 1.02 with 256², 0.94 choosing per
    chunk). Ties go to the larger side, whose windows give each pixel more context. An image
    smaller than a window is padded to one.
    """
    def cost(side: int) -> int:
        if glass is None:
            return WindowGrid(side, overlap).over(height, width) * side**2
        windows = plan_windows(max(height, side), max(width, side), side, overlap)
        return (len(windows) - sum(glass.blank(windows, side))) * side**2

    return min(sorted(sides, reverse=True), key=cost)


def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """Separable ramp: 1 in the centre, falling linearly over ``overlap`` px to a small positive edge."""
    ramp = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        edge = (np.arange(overlap, dtype=np.float32) + 1.0) / (overlap + 1.0)
        ramp[:overlap] = edge
        ramp[tile - overlap :] = edge[::-1]
    return np.outer(ramp, ramp)


def pad_to_tile(rgb: np.ndarray, tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad an image smaller than one window (reflect where possible) to at least tile×tile."""
    h, w = rgb.shape[:2]
    ph, pw = max(0, tile - h), max(0, tile - w)
    if ph == 0 and pw == 0:
        return rgb, (h, w)
    mode = "reflect" if h > ph and w > pw else "symmetric"
    return np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode=mode), (h, w)


def map_shape(height: int, width: int, channels: int) -> tuple[int, ...]:
    """A model map's shape: H×W for one output (the paper's probability), H×W×C for more."""
    return (height, width) if channels == 1 else (height, width, channels)


def norm_shape(height: int, width: int, channels: int) -> tuple[int, ...]:
    """The blend weights' running sum: H×W, or H×W×1 so that it divides an H×W×C map."""
    return (height, width) if channels == 1 else (height, width, 1)


class BlendAccumulator:
    """Accumulates weighted window predictions (T×T, or T×T×C) into a full map."""

    def __init__(self, height: int, width: int, tile: int, overlap: int, channels: int = 1) -> None:
        self.tile = tile
        # with channels, weights and their sum keep a trailing axis of 1 so they broadcast over the channels
        self.total = np.zeros(map_shape(height, width, channels), dtype=np.float32)
        self.norm = np.zeros(norm_shape(height, width, channels), dtype=np.float32)
        weights = blend_weights(tile, overlap)
        self.weights = weights if channels == 1 else weights[..., None]

    def add(self, window: Window, values: np.ndarray) -> None:
        sl = (slice(window.y, window.y + self.tile), slice(window.x, window.x + self.tile))
        self.total[sl] += values * self.weights
        self.norm[sl] += self.weights

    def add_glass(self, window: Window) -> None:
        """Blend in a window of zeros (what the network answers on glass) without running it."""
        self.norm[window.y : window.y + self.tile, window.x : window.x + self.tile] += self.weights

    def result(self) -> np.ndarray:
        return self.total / np.maximum(self.norm, 1e-12)


class GlassMap:
    """Which windows of an image (what the network is fed) hold nothing but glass: pixels brighter
    than ``colour.GLASS_LEVEL`` in all three channels, the level below which colour
    normalisation calls a pixel tissue (and which it leaves as it is).

    Such a window is blended as zeros instead of being run. On white and on noisy glass
    (228–240 ± 4–6) both shipped models answer a nucleus probability below 1e-15, so the
    probability map is the same to 1e-15; the distance head, which says 0.12 there, is read only
    inside the mask. A window with a single tissue pixel still runs, so every nucleus is seen
    with all the context it had. On slides, the chunks at the edges of tissue are part glass: a
    4096² 20× synthetic slide, 35 % tissue, ran 1.27 network pixels per slide pixel and now 0.71
    (``benchmarks/bench_glass.py``).

    Windows may reach past the image (one padded to a window, :func:`pad_to_tile`): only their
    part inside it is looked at, and the padding, reflected from inside the window, is the same.

    ``within`` (H×W bool) counts every pixel outside it as glass: the pixels whose map nobody
    wants (``pipeline.chunk_nuclei.clip_reach``: farther from a QuPath annotation than a chunk
    margin).
    """

    def __init__(self, image: np.ndarray, within: np.ndarray | None = None) -> None:
        tissue = (image < GLASS_LEVEL).any(axis=2)
        if within is not None:
            tissue &= within
        # a summed-area table answers "any tissue in this window?" in four lookups per window
        self.table = np.zeros((tissue.shape[0] + 1, tissue.shape[1] + 1), np.int64)
        np.cumsum(np.cumsum(tissue, axis=0, dtype=np.int64), axis=1, out=self.table[1:, 1:])

    def blank(self, windows: Sequence[Window], tile: int) -> list[bool]:
        """For each window, whether it holds no tissue."""
        t, (h, w) = self.table, (self.table.shape[0] - 1, self.table.shape[1] - 1)
        out = []
        for win in windows:
            y1, x1 = min(win.y + tile, h), min(win.x + tile, w)
            out.append(int(t[y1, x1] - t[win.y, x1] - t[y1, win.x] + t[win.y, win.x]) == 0)
        return out


# ---- the one window loop: images → windows → batches → blended maps ----------------------------
class Blend(Protocol):
    """Where one image's window predictions are summed: :class:`BlendAccumulator`, or the tile
    engine's on-device ``ChunkBlend`` (the same arithmetic)."""

    def add(self, window: Window, values: Any) -> None: ...

    def add_glass(self, window: Window) -> None: ...

    def result(self) -> np.ndarray: ...


class BatchRunner(Protocol):
    """Runs windows in batches: the windows are copied into :meth:`host_buffer`, then :meth:`run`."""

    batch_size: int

    def host_buffer(self) -> np.ndarray:
        """A writable B×T×T×3 array for the next batch (B = ``batch_size``)."""
        ...

    def run(self, n: int) -> Sequence[Any]:
        """The maps of the first ``n`` windows of the buffer last handed out (T×T or T×T×C each)."""
        ...


class WindowedImage:
    """One image cut into the model's overlapping windows, and the map blended back from them.

    ``prepared`` is what the network sees (colour-normalised, at the model's pixel size); an
    image smaller than a window is padded (:func:`pad_to_tile`) and the padding is cut off
    again by :meth:`result`. ``tag`` is the caller's: it travels with the image through a
    :class:`WindowStream` and comes back with it when its last window has been blended.
    ``windows`` are those the network runs; with ``skip_glass`` the windows of nothing but glass
    (:class:`GlassMap`; pass ``glass`` if the caller has it) are blended as zeros here instead,
    and counted in ``glass``.
    """

    def __init__(
        self, prepared: np.ndarray, tile: int, overlap: int, new_blend: Callable[[int, int], Blend],
        tag: Any = None, skip_glass: bool = True, glass: GlassMap | None = None,
    ) -> None:
        self.padded, (self.height, self.width) = pad_to_tile(prepared, tile)
        self.tile = tile
        self.windows = plan_windows(self.padded.shape[0], self.padded.shape[1], tile, overlap)
        self.blend = new_blend(self.padded.shape[0], self.padded.shape[1])
        self.glass = 0
        if skip_glass:
            blank = (glass or GlassMap(prepared)).blank(self.windows, tile)
            for window in (w for w, b in zip(self.windows, blank) if b):
                self.blend.add_glass(window)
            self.windows = [w for w, b in zip(self.windows, blank) if not b]
            self.glass = sum(blank)
        self.done = 0  # windows blended so far
        self.tag = tag

    @property
    def finished(self) -> bool:
        """Every window blended (at once for an image of glass only, which has none to run)."""
        return self.done == len(self.windows)

    def cut(self, window: Window) -> np.ndarray:
        return self.padded[window.y : window.y + self.tile, window.x : window.x + self.tile]

    def add(self, window: Window, values: Any) -> None:
        """Blend one window's map in."""
        self.blend.add(window, values)
        self.done += 1

    def result(self) -> np.ndarray:
        return self.blend.result()[: self.height, : self.width]


class WindowStream:
    """Windows of one image or of many, in order, through fixed-size batches of ``runner``.

    Batches run across image borders (the pipelined runner keeps a GPU's batches full that
    way); :meth:`add` and :meth:`flush` return the images whose last window has just been
    blended, in the order they were added (an image of glass only, with no window to run,
    waits for those before it). ``cancel`` is asked before each batch is cut (a
    cancelled run stops within one batch) and ``on_batch`` is called after each batch is
    blended. Windows are cut, run and blended in the order of a plain loop over them; the
    batch boundaries decide only which windows share a forward pass (a per-window network
    gives identical maps for any batch size: ``tests/test_windows.py``).
    """

    def __init__(
        self, runner: BatchRunner, cancel: Cancel | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        self.runner = runner
        self.cancel = cancel
        self.on_batch = on_batch
        self._slots: list[tuple[WindowedImage, Window]] = []
        self._buffer: np.ndarray | None = None
        self._open: deque[WindowedImage] = deque()  # added and not yet handed back, in order

    def add(self, image: WindowedImage) -> list[WindowedImage]:
        self._open.append(image)
        finished: list[WindowedImage] = []
        for window in image.windows:
            if not self._slots:
                if self.cancel is not None and self.cancel():
                    raise CancelledError("cancelled")
                self._buffer = self.runner.host_buffer()
            assert self._buffer is not None
            self._buffer[len(self._slots)] = image.cut(window)
            self._slots.append((image, window))
            if len(self._slots) == self.runner.batch_size:
                finished += self.flush()
        return finished + self._release()

    def flush(self) -> list[WindowedImage]:
        """Run the windows waiting in a part-filled batch (none: nothing is run)."""
        if self._slots:
            slots, self._slots = self._slots, []
            maps = self.runner.run(len(slots))
            for k, (image, window) in enumerate(slots):
                image.add(window, maps[k])
            if self.on_batch is not None:
                self.on_batch()
        return self._release()

    def _release(self) -> list[WindowedImage]:
        """The finished images at the front of the added ones."""
        out = []
        while self._open and self._open[0].finished:
            out.append(self._open.popleft())
        return out


class TileFunctionRunner:
    """A :class:`BatchRunner` over a plain function ``N×T×T×3 uint8 → N maps`` (a predictor's
    ``predict_tiles``, the server's micro-batcher, or a test's stand-in network)."""

    def __init__(self, tile_fn: Callable[[np.ndarray], Sequence[Any]], batch_size: int, tile: int) -> None:
        self.tile_fn = tile_fn
        self.batch_size = batch_size
        self.tile = tile
        self._buffer: np.ndarray | None = None

    def host_buffer(self) -> np.ndarray:
        # a fresh array per batch: tile_fn may keep views of its input (the micro-batcher holds them until run)
        self._buffer = np.empty((self.batch_size, self.tile, self.tile, 3), dtype=np.uint8)
        return self._buffer

    def run(self, n: int) -> Sequence[Any]:
        assert self._buffer is not None
        return self.tile_fn(self._buffer[:n])


def predict_windows(
    image: WindowedImage, runner: BatchRunner, progress: Callable[[int, int], None] | None = None,
    cancel: Cancel | None = None,
) -> np.ndarray:
    """One image's blended map: its windows through ``runner``; ``progress(windows done, windows)`` per batch."""
    report = None if progress is None else (lambda: progress(image.done, len(image.windows)))
    stream = WindowStream(runner, cancel=cancel, on_batch=report)
    stream.add(image)
    stream.flush()
    return image.result()
