"""The one window loop (engine.tiling), the Predictor protocol, and cancellation as one callable."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from dannucnet.engine.colour import GLASS_LEVEL
from dannucnet.engine.tiling import (
    BlendAccumulator,
    GlassMap,
    TileFunctionRunner,
    WindowedImage,
    WindowStream,
    plan_windows,
    predict_windows,
)
from dannucnet.errors import CancelledError
from dannucnet.protocols import Predictor
from dannucnet.service.batched_predictor import BatchedPredictor
from dannucnet.service.batcher import MicroBatcher
from dannucnet.service.calls import Call
from dannucnet.service.status import ServiceError

TILE, OVERLAP = 64, 16


def haematoxylin(tiles: np.ndarray) -> np.ndarray:
    """A stand-in network: darker blue-less pixels → higher value, every pixel on its own."""
    return (255.0 - tiles[..., :2].astype(np.float32).mean(axis=-1)) / 255.0


def image_of(rgb: np.ndarray, tag: object = None, skip_glass: bool = True) -> WindowedImage:
    return WindowedImage(rgb, TILE, OVERLAP, lambda h, w: BlendAccumulator(h, w, TILE, OVERLAP), tag=tag,
                         skip_glass=skip_glass)


def reference_map(rgb: np.ndarray) -> np.ndarray:
    """The plain loop, window by window, written out without the helper."""
    h, w = rgb.shape[:2]
    acc = BlendAccumulator(h, w, TILE, OVERLAP)
    for wd in plan_windows(h, w, TILE, OVERLAP):
        acc.add(wd, haematoxylin(rgb[None, wd.y : wd.y + TILE, wd.x : wd.x + TILE])[0])
    return acc.result()


def images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((150, 200, 3), (64, 64, 3), (97, 301, 3))]


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
def test_stream_across_images_gives_each_image_its_own_map_whatever_the_batches(batch_size):
    """Batches that run across image borders (the pipelined runner) blend exactly as one image at a time."""
    rgbs = images()
    stream = WindowStream(TileFunctionRunner(haematoxylin, batch_size, TILE))
    finished = []
    for k, rgb in enumerate(rgbs):
        finished += stream.add(image_of(rgb, tag=k))
    finished += stream.flush()
    assert [image.tag for image in finished] == [0, 1, 2]  # each comes back once, in order
    for image, rgb in zip(finished, rgbs):
        assert np.array_equal(image.result(), reference_map(rgb))


class CountingRunner(TileFunctionRunner):
    """The stand-in network, counting the windows it is handed."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(haematoxylin, batch_size, TILE)
        self.windows = 0

    def run(self, n: int):
        self.windows += n
        return super().run(n)


def tissue_on_glass(seed: int = 0) -> np.ndarray:
    """Random tissue on the left third, white glass (where the stand-in network answers exactly 0) elsewhere."""
    rgb = np.full((150, 400, 3), 255, np.uint8)
    rgb[:, :130] = np.random.default_rng(seed).integers(0, 256, size=(150, 130, 3), dtype=np.uint8)
    return rgb


def test_windows_of_glass_are_blended_as_zeros_and_never_run():
    rgb = tissue_on_glass()
    windows = plan_windows(150, 400, TILE, OVERLAP)
    # by brute force: a window runs when any of its pixels is darker than glass in any channel
    expected = [bool((rgb[w.y : w.y + TILE, w.x : w.x + TILE] < GLASS_LEVEL).any()) for w in windows]
    assert 0 < sum(expected) < len(windows)
    assert GlassMap(rgb).blank(windows, TILE) == [not e for e in expected]
    runner = CountingRunner(batch_size=3)
    got = predict_windows(image_of(rgb), runner)
    assert runner.windows == sum(expected)
    np.testing.assert_allclose(got, reference_map(rgb), rtol=0, atol=1e-6)  # the weights are summed in another order
    everything = CountingRunner(batch_size=3)
    np.testing.assert_array_equal(predict_windows(image_of(rgb, skip_glass=False), everything), reference_map(rgb))
    assert everything.windows == len(windows)


def test_one_pixel_of_tissue_makes_its_windows_run():
    rgb = np.full((150, 400, 3), 255, np.uint8)
    rgb[75, 200] = (255, 255, GLASS_LEVEL - 1)  # darker than glass in one channel only
    windows = plan_windows(150, 400, TILE, OVERLAP)
    holding = [w.y <= 75 < w.y + TILE and w.x <= 200 < w.x + TILE for w in windows]
    assert GlassMap(rgb).blank(windows, TILE) == [not h for h in holding]
    rgb[75, 200] = (GLASS_LEVEL,) * 3  # at the level: glass
    assert all(GlassMap(rgb).blank(windows, TILE))


def test_an_image_of_glass_only_comes_back_in_its_turn_with_a_map_of_zeros():
    """The stream hands images back in the order they were added, even one with no window to run."""
    first, last = images()[0], images()[2]
    glass = np.full((100, 90, 3), 240, np.uint8)
    stream = WindowStream(CountingRunner(batch_size=64))  # one batch holds every window: nothing runs until flush
    assert stream.add(image_of(first, tag="first")) == []
    assert stream.add(image_of(glass, tag="glass")) == []  # finished already, but waits for "first"
    assert stream.add(image_of(last, tag="last")) == []
    done = stream.flush()
    assert [image.tag for image in done] == ["first", "glass", "last"]
    assert done[1].windows == [] and done[1].glass == len(plan_windows(100, 90, TILE, OVERLAP))
    np.testing.assert_array_equal(done[1].result(), np.zeros((100, 90), np.float32))
    np.testing.assert_allclose(done[0].result(), reference_map(first), rtol=0, atol=1e-6)
    alone = WindowStream(CountingRunner(batch_size=2))
    assert [image.tag for image in alone.add(image_of(glass, tag="alone"))] == ["alone"]


@pytest.mark.parametrize("channels", [1, 2])
def test_the_device_blend_sums_as_the_host_blend_glass_included(channels):
    """The GPU runner's ChunkBlend (here on the CPU device) gives BlendAccumulator's map, windows of glass too."""
    import torch

    from dannucnet.engine.tile_engine import ChunkBlend
    from dannucnet.engine.tiling import blend_weights

    rng = np.random.default_rng(3)
    host = BlendAccumulator(150, 400, TILE, OVERLAP, channels)
    device = ChunkBlend(150, 400, torch.from_numpy(blend_weights(TILE, OVERLAP)), torch.device("cpu"), channels)
    shape = (TILE, TILE) if channels == 1 else (TILE, TILE, channels)
    for k, window in enumerate(plan_windows(150, 400, TILE, OVERLAP)):
        if k % 3 == 0:
            host.add_glass(window)
            device.add_glass(window)
        else:
            values = rng.random(shape, dtype=np.float32)
            host.add(window, values)
            device.add(window, torch.from_numpy(values))
    np.testing.assert_allclose(device.result(), host.result(), rtol=0, atol=1e-6)


def test_small_images_are_padded_and_cut_back():
    rgb = images()[0][:40, :50]
    out = predict_windows(image_of(rgb), TileFunctionRunner(haematoxylin, 2, TILE))
    assert out.shape == (40, 50)
    np.testing.assert_allclose(out, haematoxylin(rgb[None])[0], atol=1e-6)


def test_cancel_is_asked_before_each_batch_and_progress_after():
    rgb = images()[0]  # 150 × 200 at 64/16: 3 × 4 = 12 windows, 4 batches of 3
    runs: list[int] = []
    seen: list[tuple[int, int]] = []

    def network(tiles: np.ndarray) -> np.ndarray:
        runs.append(len(tiles))
        return haematoxylin(tiles)

    runner = TileFunctionRunner(network, 3, TILE)
    out = predict_windows(image_of(rgb), runner, progress=lambda done, total: seen.append((done, total)))
    assert runs == [3, 3, 3, 3] and seen == [(3, 12), (6, 12), (9, 12), (12, 12)]
    assert np.array_equal(out, reference_map(rgb))

    runs.clear()
    with pytest.raises(CancelledError):
        predict_windows(image_of(rgb), TileFunctionRunner(network, 3, TILE), cancel=lambda: len(runs) >= 2)
    assert runs == [3, 3]  # stopped before the third batch was cut


# ---- the protocol and the batched predictor --------------------------------------------
def test_the_protocol_module_does_not_load_torch():
    backend = Path(__file__).resolve().parents[1] / "python_backend"
    env = {**os.environ, "PYTHONPATH": str(backend)}
    code = "import sys, dannucnet.protocols; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_batched_predictor_composes_and_leaves_the_wrapped_predictor_alone(untrained_predictor):
    before = untrained_predictor.batch_size
    batched = BatchedPredictor(untrained_predictor, max_batch=before + 3)
    try:
        assert untrained_predictor.batch_size == before  # not resized for the batcher
        assert isinstance(batched, Predictor) and isinstance(untrained_predictor, Predictor)
        assert (batched.card, batched.tile, batched.overlap, batched.description) == (
            untrained_predictor.card, untrained_predictor.tile, untrained_predictor.overlap,
            untrained_predictor.description)
        with pytest.raises(AttributeError):
            batched.network  # noqa: B018 - only what the protocol offers is shown, nothing is forwarded
        rgb = np.random.default_rng(3).integers(0, 256, size=(300, 280, 3), dtype=np.uint8)
        assert np.array_equal(batched.predict(rgb), untrained_predictor.predict(rgb, batch_size=before + 3))
        assert batched.batcher.stats.largest_batch <= before + 3
    finally:
        batched.close()


def test_a_batch_of_mixed_window_sides_runs_each_side_apart(untrained_predictor):
    """Two requests may get different window sides (Predictor.window_for); when the batcher gathers their
    windows into one batch, each side is one forward pass and every window gets its own map back."""
    batched = BatchedPredictor(untrained_predictor, max_batch=4)
    try:
        rng = np.random.default_rng(4)
        tiles = [rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8) for side in (64, 32, 64, 32)]
        maps = batched._run_batch(tiles)  # what the worker calls with whatever it gathered
        for tile, got in zip(tiles, maps):
            np.testing.assert_allclose(got, untrained_predictor.predict_tiles(tile[None])[0], atol=1e-5)
    finally:
        batched.close()


def _blocked_batcher() -> tuple[MicroBatcher, threading.Event, list[int], threading.Thread]:
    """A batcher whose worker is held by a first item, so later items queue."""
    gate, running = threading.Event(), threading.Event()
    ran: list[int] = []

    def run(arrays):
        running.set()
        gate.wait(5)
        ran.extend(int(a[0]) for a in arrays)
        return arrays

    batcher = MicroBatcher(run, max_batch=1, max_queue=16)
    first = threading.Thread(target=batcher.submit, args=(np.array([0]),))
    first.start()
    assert running.wait(5)  # the worker holds the first item: what comes next waits in the queue
    return batcher, gate, ran, first


@pytest.mark.parametrize("how", ["callable", "deadline"])
def test_batcher_drops_the_work_of_any_cancel_callable(how):
    """A plain callable cancels as a Call does (CANCELLED); a Call past its deadline says DEADLINE_EXCEEDED."""
    batcher, gate, ran, first = _blocked_batcher()
    stop = threading.Event()
    cancel = stop.is_set if how == "callable" else Call(deadline=time.monotonic() + 0.2)
    errors = []

    def request():
        try:
            batcher.submit_many([np.array([i]) for i in range(1, 4)], cancel)
        except ServiceError as exc:
            errors.append(exc.code)

    t = threading.Thread(target=request)
    t.start()
    stop.set()  # queued behind the held item, the request's windows are dropped whenever it stops
    t.join(3)
    gate.set()
    first.join(2)
    batcher.close()
    want = grpc.StatusCode.CANCELLED if how == "callable" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert errors == [want]
    assert ran == [0]  # none of the cancelled request's items ran
