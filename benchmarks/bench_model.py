"""The bare network: milliseconds per 256² window, and what its pooling and batch size cost.

In one process, on the same random windows, this times the shipped network's
forward pass (channels-last, inference mode, as ``Predictor`` runs it):

* with the shipped ``max_pool_same`` (two elementwise maxima of shifted views)
  and, as the baseline, with PyTorch's max-pool kernel it replaced — the two
  give bit-identical outputs, which the script checks before timing;
* at batch sizes 1, 2 and 4 (``Predictor`` uses 2 on the CPU);
* with test-time augmentation (``--tta``: four flips) against without.

    python benchmarks/bench_model.py                    # default model, auto device
    python benchmarks/bench_model.py --quick            # fewer repeats: proves the script runs
    python benchmarks/bench_model.py --model untrained --device cpu --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dannucnet.engine.device import autocast, choose_device
from dannucnet.engine.predictor import forward_map
from dannucnet.model import network
from dannucnet.model.registry import load_model


def kernel_max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """The implementation before the shifted maxima: PyTorch's max-pool kernel on the padded tensor."""
    return F.max_pool2d(network._pad_br(x), kernel_size=2, stride=1)


def seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call; on a GPU, of the work it queued too (asynchronous kernels)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def ms_per_window(
    runs: dict[str, tuple[Callable[[], object], int]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median milliseconds per window of each ``name: (run, windows per call)``.

    The runs alternate call by call (after one warm-up call each), so that a slow
    spell of a shared machine falls on all of them alike rather than on one.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, (run, _) in runs.items():
            t = seconds(run, device)
            if i:
                times[name].append(t)
    return {name: 1000.0 * statistics.median(times[name]) / n for name, (_, n) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dannucnet-monuseg")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="two repeats, the pooling comparison only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    device = choose_device(args.device)
    loaded = load_model(args.model)
    net = loaded.network.eval().to(device).to(memory_format=torch.channels_last)
    tile = loaded.card.tile_size
    print(f"model {loaded.card.name} {loaded.card.version} on {device}, {torch.get_num_threads()} CPU threads, "
          f"{tile}² windows, median of {repeats}")

    def windows(n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(n)
        x = torch.rand(n, 3, tile, tile, generator=generator).to(device)
        return x.contiguous(memory_format=torch.channels_last)

    def forward(
        x: torch.Tensor, tta: bool = False, pool: Callable[[torch.Tensor], torch.Tensor] = network.max_pool_same
    ):
        @torch.inference_mode()
        def run() -> torch.Tensor:
            shipped_pool, network.max_pool_same = network.max_pool_same, pool
            try:
                with autocast(device):
                    return forward_map(net, x, tta)
            finally:
                network.max_pool_same = shipped_pool

        return run, x.shape[0]

    x2 = windows(2)
    same = torch.equal(forward(x2)[0](), forward(x2, pool=kernel_max_pool_same)[0]())
    print(f"outputs with shifted maxima and with the max-pool kernel identical: {same}")
    runs = {"kernel": forward(x2, pool=kernel_max_pool_same), "shipped": forward(x2)}
    if not args.quick:
        runs |= {"batch 1": forward(windows(1)), "batch 4": forward(windows(4)), "tta": forward(x2, tta=True)}
    ms = ms_per_window(runs, repeats, device)
    shipped = ms["shipped"]
    print(f"batch 2, max-pool kernel (baseline): {ms['kernel']:7.1f} ms/window")
    print(f"batch 2, shifted maxima (shipped):   {shipped:7.1f} ms/window   {ms['kernel'] / shipped:.2f}x faster")
    for n in (1, 4):
        if f"batch {n}" in ms:
            t = ms[f"batch {n}"]
            print(f"batch {n}:                            {t:7.1f} ms/window   {t / shipped:.2f}x batch 2's time")
    if "tta" in ms:
        print(f"batch 2 with --tta (four flips):     {ms['tta']:7.1f} ms/window   {ms['tta'] / shipped:.2f}x without")


if __name__ == "__main__":
    main()
