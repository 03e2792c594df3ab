"""What the distance head costs: forward time of DAN-NucNet with and without it, and of the
instance split with the guide against the mask-only split, measured in one process.

    .venv/bin/python benchmarks/bench_distance_head.py [--device auto] [--batch 2] [--repeats 10]

Prints seconds per tile for both networks and their ratio, then the instance split's
milliseconds per 1000² map both ways and their ratio (weights are untrained: speed only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dannucnet.engine.device import choose_device
from dannucnet.geometry.instances import label_nuclei
from dannucnet.model import DANNucNet, ModelConfig
from dannucnet.slides.synthetic import make_synthetic_he
from dannucnet.train.patches import normalised_distance


def seconds_per_tile(network: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        network(x)  # warm-up
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            network(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (repeats * x.shape[0])


def split_ms(nucleus_map: np.ndarray, repeats: int) -> float:
    label_nuclei(nucleus_map)
    t0 = time.perf_counter()
    for _ in range(repeats):
        label_nuclei(nucleus_map)
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = choose_device(args.device)
    x = torch.rand(args.batch, 3, 256, 256, device=device).contiguous(memory_format=torch.channels_last)
    nets = {name: DANNucNet(ModelConfig(bn_momentum=0.1, distance_head=head)).eval().to(device)
            .to(memory_format=torch.channels_last) for name, head in (("paper", False), ("distance head", True))}
    times = {name: seconds_per_tile(net, x, args.repeats) for name, net in nets.items()}
    for name, s in times.items():
        print(f"{name:>14}: {s * 1000:8.1f} ms/tile  ({device.type}, batch {args.batch})")
    print(f"  ratio distance head / paper: {times['distance head'] / times['paper']:.3f}")

    # A realistic map: the synthetic slide's true nuclei, soft-edged, with a distance-like second channel.
    labels = make_synthetic_he(1000, 1000, seed=1, density=12000).labels
    prob = (labels > 0).astype(np.float32)
    both = np.dstack([prob, normalised_distance(labels)])
    plain_ms, guided_ms = split_ms(prob, args.repeats), split_ms(both, args.repeats)
    print(f"instance split, 1000² map: mask only {plain_ms:.1f} ms, guided {guided_ms:.1f} ms, "
          f"ratio {guided_ms / plain_ms:.3f}")


if __name__ == "__main__":
    main()
