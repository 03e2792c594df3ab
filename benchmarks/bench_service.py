"""Server overhead: throughput and p50/p99 latency, in-process vs gRPC vs HTTP.

Segments the same 1024² synthetic H&E region (by default) at concurrency 1, 4
and 16 three ways — calling ``pipeline.segment_region`` in this process, through
``dannucnet.client`` over gRPC (raw RGB), and over the HTTP gateway (PNG body,
GeoJSON answer, as the QuPath script sends it) — against a ``dannucnet serve``
started as a separate process on loopback, and prints each as a ratio to
in-process. The issue's target: ≤ 10 % added latency at concurrency 1.

    python benchmarks/bench_service.py                      # default model, auto device
    python benchmarks/bench_service.py --tiny --requests 8  # quick CPU smoke run

``--tiny`` uses a small random DAN-NucNet (base 16, depth 2): the network is then
so cheap that the ratios overstate what transport costs next to the real model.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dannucnet.client import DanNucNetClient
from dannucnet.engine import Predictor
from dannucnet.model import DANNucNet, ModelCard, ModelConfig, load_model, save_model
from dannucnet.pipeline import segment_region
from dannucnet.slides.synthetic import make_synthetic_he

TOKEN = "benchmark-token-0123456789"


def start_server(model: str, device: str, threads: int) -> tuple[subprocess.Popen, str, int]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dannucnet", "serve", "--model", model, "--device", device, "--port", "0",
         "--http-port", "0", "--token", TOKEN, "--max-pending", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    grpc_address = http_port = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("gRPC"):
            grpc_address = line.split()[1]
        if line.startswith("HTTP"):
            http_port = int(line.split()[1].rsplit(":", 1)[1])
        if line.startswith("limits"):
            break
    if grpc_address is None or http_port is None:
        proc.kill()
        raise SystemExit("server did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining its output
    return proc, grpc_address, http_port


def run_level(fn, concurrency: int, requests: int) -> tuple[float, list[float]]:
    """Run ``requests`` calls of ``fn`` with ``concurrency`` in flight; (wall seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_worker = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]

    def worker(n: int) -> None:
        state: dict = {}
        for _ in range(n):
            t = time.perf_counter()
            fn(state)
            with lock:
                latencies.append(time.perf_counter() - t)
        if "conn" in state:
            state["conn"].close()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, per_worker))
    return time.perf_counter() - start, latencies


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    ap.add_argument("--tiny", action="store_true", help="small random network for a quick CPU run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=1024, help="region side in pixels (default 1024)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16,
                    help="requests per transport, level and round (at least the concurrency)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate the transports this many times per level, so load drift hits all alike")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (both sides)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.tiny:
            torch.manual_seed(0)
            model = str(Path(tmp) / "tiny")
            save_model(model, DANNucNet(ModelConfig(base_filters=16, depth=2)),
                       ModelCard(name="tiny-random", version="bench"))
        loaded = load_model(model)
        predictor = Predictor(loaded, device=args.device)
        server_model = (model or loaded.source) if loaded.source != "built-in" else "untrained"
        rgb = make_synthetic_he(args.size, args.size, seed=1).rgb
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
        png = buf.getvalue()
        mpp = loaded.card.mpp
        card = loaded.card
        print(f"model {card.name} ({'trained' if card.trained else 'untrained'}), device {predictor.device}, "
              f"torch threads {args.threads}, region {args.size}², "
              f"{args.rounds} rounds × max({args.requests}, concurrency) requests per transport and level")
        segment_region(predictor, rgb, mpp=mpp)  # warm-up

        proc, grpc_address, http_port = start_server(server_model, args.device, args.threads)
        client = DanNucNetClient(grpc_address, token=TOKEN, retries=0)
        client.model_info()

        # Transport overhead per request = client latency - the pipeline's own stage times
        # (as the server reports them): far less sensitive to a busy machine than the ratios.
        overhead: dict[str, list[float]] = {"in-process": [], "gRPC": [], "HTTP": []}
        lock = threading.Lock()

        def note(name: str, started: float, stages_s: float) -> None:
            with lock:
                overhead[name].append(time.perf_counter() - started - stages_s)

        def in_process(state: dict) -> None:
            t = time.perf_counter()
            result = segment_region(predictor, rgb, mpp=mpp)
            note("in-process", t, sum(result.timings.values()))

        def over_grpc(state: dict) -> None:
            t = time.perf_counter()
            response = client.segment_region_response(rgb, mpp=mpp)
            note("gRPC", t, sum(v for k, v in response.timings_ms.items() if k not in ("decode", "total")) / 1000)

        def over_http(state: dict) -> None:
            t = time.perf_counter()
            conn = state.get("conn") or state.setdefault("conn", http.client.HTTPConnection("127.0.0.1", http_port))
            conn.request("POST", f"/v1/segment?pixelSizeMicrons={mpp}", body=png,
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
            timings = json.loads(body)["summary"]["timingsMs"]
            note("HTTP", t, sum(v for k, v in timings.items() if k not in ("decode", "total")) / 1000)

        try:
            over_grpc({})
            over_http({})  # warm-up both
            for values in overhead.values():
                values.clear()
            rows = []
            transports = (("in-process", in_process), ("gRPC", over_grpc), ("HTTP", over_http))
            for c in args.concurrency:
                n = max(args.requests, c)
                walls = {name: 0.0 for name, _ in transports}
                lats: dict[str, list[float]] = {name: [] for name, _ in transports}
                for values in overhead.values():
                    values.clear()
                for _ in range(args.rounds):
                    for name, fn in transports:
                        wall, lat = run_level(fn, c, n)
                        walls[name] += wall
                        lats[name] += lat
                base = None
                for name, _ in transports:
                    lat = lats[name]
                    row = {"transport": name, "concurrency": c, "throughput": len(lat) / walls[name],
                           "p50": pct(lat, 50), "p99": pct(lat, 99)}
                    base = base or row
                    row.update(r_tp=row["throughput"] / base["throughput"], r_p50=row["p50"] / base["p50"],
                               r_p99=row["p99"] / base["p99"])
                    rows.append(row)
                    print(f"  c={c:<3} {name:<10} {row['throughput']:7.2f} req/s  p50 {row['p50'] * 1000:8.1f} ms  "
                          f"p99 {row['p99'] * 1000:8.1f} ms   × in-process: throughput {row['r_tp']:.2f}, "
                          f"p50 {row['r_p50']:.2f}, p99 {row['r_p99']:.2f};  transport+decode overhead p50 "
                          f"{pct(overhead[name], 50) * 1000:6.1f} ms", flush=True)
        finally:
            client.close()
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
