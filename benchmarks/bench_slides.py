"""Whole slides through the pipelined runner: per-stage throughput, scaling with slide size, memory.

For synthetic pyramidal slides of growing size (CPU default 2048², 4096², 8192²;
on a GPU pass ``--sizes`` up to 100000) each size runs in a fresh process:
tissue mask → reader threads → pinned batches → model (bf16 + channels_last on
a GPU, optionally ``torch.compile``) → post-processing pool → GeoJSON.gz. It prints

* per stage: decode MP/s (per reader thread), model tiles/s (device busy time),
  post-processing nuclei/s (per worker), and how long the model waited for pixels;
* end-to-end seconds, tiles/s and peak RSS per size, GPU utilisation when there is a GPU;
* the scaling exponents: slope of log(time) and of log(peak RSS) against
  log(tissue area) — targets ≈ 1.0 (linear time) and ≈ 0 (flat memory);
* the bare model alone (``TileEngine``, fixed batches of real tiles), eager and
  — on a GPU, or with ``--compile`` — compiled, against MODEL_SPEC §4's floor.

    python benchmarks/bench_slides.py --quick                       # CPU smoke run, tiny sizes
    python benchmarks/bench_slides.py                               # CPU: 2048² 4096² 8192²
    python benchmarks/bench_slides.py --gpu                         # GPU box: see benchmarks/README.md
    python benchmarks/bench_slides.py --stand-in --sizes 4096 8192 16384  # memory scaling on a CPU

Slides above 16384² are a mosaic of one rendered 4096² block (rendering every
pixel of a 100k² slide would take an hour); the pipeline still decodes, infers
and post-processes every tile of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_segment import fit_exponent, peak_rss_mb, run_child

MOSAIC_ABOVE = 16384
MOSAIC_BLOCK = 4096
GPU_SIZES = [8192, 16384, 32768, 65536, 100000]


# ---------------------------------------------------------------------------
# slides
# ---------------------------------------------------------------------------


class _MosaicStrips:
    """Full-width strips of a large slide tiled from one rendered synthetic block."""

    strip_height = 512

    def __init__(self, size: int, tissue_fraction: float, seed: int) -> None:
        from dannucnet.slides.synthetic import make_synthetic_he

        self.width = self.height = size
        self.block = make_synthetic_he(MOSAIC_BLOCK, MOSAIC_BLOCK, seed=seed, tissue_fraction=tissue_fraction).rgb

    def strip_rgb(self, y0: int, y1: int):
        import numpy as np

        b = self.block.shape[0]
        rows = self.block[np.arange(y0, y1) % b]
        reps = -(-self.width // b)
        return np.ascontiguousarray(np.tile(rows, (1, reps, 1))[:, : self.width])


def make_slide(folder: Path, size: int, tissue_fraction: float, seed: int = 0) -> Path:
    from dannucnet.slides.synthetic import write_pyramidal_tiff, write_synthetic_slide

    path = folder / f"slide_{size}_t{int(round(tissue_fraction * 100))}_s{seed}.tif"
    if path.exists():
        return path
    t0 = time.perf_counter()
    if size > MOSAIC_ABOVE:
        write_pyramidal_tiff(path, _MosaicStrips(size, tissue_fraction, seed), mpp=0.25)
    else:
        write_synthetic_slide(path, size, seed=seed, tissue_fraction=tissue_fraction)
    print(f"  wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return path


# ---------------------------------------------------------------------------
# GPU utilisation
# ---------------------------------------------------------------------------


class GpuSampler:
    """Samples GPU utilisation (%) every ``period`` s: nvidia-smi if present, else torch.cuda.utilization."""

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        smi = shutil.which("nvidia-smi")
        if smi:
            index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            self._proc = subprocess.Popen(
                [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", index,
                 f"-lms={int(self.period * 1000)}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
        self._thread.start()
        return self

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def _poll_torch(self) -> None:
        import torch

        while not self._stop.wait(self.period):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001 - pynvml missing: no samples, reported as such
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=2)

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_samples": 0}
        s = sorted(self.samples)
        return {"gpu_util_mean": sum(s) / len(s), "gpu_util_p50": s[len(s) // 2], "gpu_util_samples": len(s)}


# ---------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------


def _stand_in_model():
    """A 1×1 convolution ('dark pixels are nuclei') in place of DAN-NucNet, for ``--stand-in``.

    It finds the synthetic nuclei, so decoding, blending, instance splitting,
    polygons and output all run on every chunk, while the network costs next to
    nothing: a CPU can then push 16k²–32k² slides through the pipeline and show
    how memory scales. Its timings are pipeline timings, never model timings.
    """
    from types import SimpleNamespace

    import torch
    from torch import nn

    from dannucnet.model.card import ModelCard
    from dannucnet.model.weights import LoadedModel

    class StandIn(nn.Module):
        config = SimpleNamespace(stride=16, outputs=1)

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 1)
            with torch.no_grad():
                self.conv.weight[:] = torch.tensor([-30.0, -30.0, 0.0]).view(1, 3, 1, 1)
                self.conv.bias[:] = 24.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    return LoadedModel(StandIn(), ModelCard(name="stand-in 1x1 conv (pipeline only)", version="0"), "benchmark")


def _predictor(args):
    from dannucnet.engine import Predictor
    from dannucnet.model import load_model

    model = _stand_in_model() if args.stand_in else load_model(args.model)
    return Predictor(model, device=args.device, batch_size=args.batch_size)


def measure_slide(args) -> dict:
    import torch

    from dannucnet.engine.tile_engine import TileEngine
    from dannucnet.formats.geojson import GeoJSONWriter
    from dannucnet.pipeline import SegmentOptions, plan_slide
    from dannucnet.pipeline.pipelined import PipelineConfig, PipelineStats, segment_slide_pipelined
    from dannucnet.slides import open_image
    from dannucnet.slides.tissue import tissue_mask

    predictor = _predictor(args)
    cuda = predictor.device.type == "cuda"
    config = PipelineConfig(readers=args.readers, post_workers=args.post_workers, batch_size=args.batch_size,
                            precision=args.precision, compile=args.compile)
    engine = TileEngine(predictor, batch_size=config.batch_size, precision=config.precision, compile=config.compile)
    engine.predict(_tiles_image(engine.tile))  # warm-up (kernel choice, compilation) outside the timing
    rss_model = peak_rss_mb()
    out = Path(tempfile.mkdtemp(prefix="bench_slides_")) / "nuclei.geojson.gz"
    options = SegmentOptions()
    stats = PipelineStats()
    with GpuSampler() if cuda else _Null() as sampler:
        t0 = time.perf_counter()
        with open_image(args.child) as src:
            plan = plan_slide(src, predictor.card.mpp, options=options)
            t_plan = time.perf_counter() - t0
            with GeoJSONWriter(out, metadata={"model": predictor.card.name}) as writer:
                for nuclei in segment_slide_pipelined(predictor, src, options=options, config=config, plan=plan,
                                                      stats=stats, engine=engine):
                    writer.write(nuclei)
            e2e = time.perf_counter() - t0
            tissue = tissue_mask(src).fraction * src.width * src.height
            width, height = src.width, src.height
    result = {
        "size": width, "height": height, "tissue_mp": tissue / 1e6,
        "processed_mp": sum(c.core.area for c in plan.chunks) / 1e6, "chunks": len(plan.chunks),
        "e2e_seconds": e2e, "plan_seconds": t_plan, "rss_model_mb": rss_model, "rss_mb": peak_rss_mb(),
        "output_mb": out.stat().st_size / 1e6, "model": predictor.card.name, "trained": predictor.card.trained,
        "device": str(predictor.device), "batch_size": engine.batch_size, "torch_threads": torch.get_num_threads(),
        **{k: v for k, v in vars(stats).items()},
    }
    if cuda:
        result.update(sampler.summary())
        result["gpu_name"] = torch.cuda.get_device_name()
        result["gpu_peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    shutil.rmtree(out.parent, ignore_errors=True)
    return result


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _tiles_image(tile: int):
    from dannucnet.slides.synthetic import make_synthetic_he

    return make_synthetic_he(tile * 2, tile * 2, seed=7).rgb


def measure_bare(args) -> dict:
    """Bare network throughput through TileEngine: fixed batches of real tiles, eager then compiled."""
    import numpy as np
    import torch

    from dannucnet.engine.tile_engine import TileEngine
    from dannucnet.slides.synthetic import make_synthetic_he

    predictor = _predictor(args)
    cuda = predictor.device.type == "cuda"
    results = {"device": str(predictor.device), "model": predictor.card.name}
    modes = [("eager", False)] + ([("compiled", True)] if (cuda or args.compile) else [])
    for name, compile_ in modes:
        engine = TileEngine(predictor, batch_size=args.batch_size, precision=args.precision, compile=compile_)
        t, b = engine.tile, engine.batch_size
        rgb = make_synthetic_he(t * 4, t * 4, seed=5).rgb
        tiles = np.stack([rgb[(i // 4) * t:(i // 4 + 1) * t, (i % 4) * t:(i % 4 + 1) * t] for i in range(16)])
        batch = np.resize(tiles, (b, t, t, 3))

        def one(engine=engine, batch=batch, b=b) -> None:  # bound now: B023
            host = engine.host_buffer()
            host[:] = batch
            engine.run(b)

        for _ in range(3):
            one()
        if cuda:
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while n < args.bare_batches or (cuda and time.perf_counter() - t0 < 5.0):
            one()
            n += 1
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        results[name] = {"tiles_per_s": n * b / seconds, "batch": b, "precision": engine.stats.precision,
                         "compiled": engine.stats.compiled}
    return results


# ---------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------


def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def print_report(rows: list[dict], bare: dict | None) -> None:
    r0 = rows[0]
    if r0["model"].startswith("stand-in"):
        print("PIPELINE ONLY: a 1x1 conv stands in for DAN-NucNet; times below are not model times")
    state = ("trained" if r0["trained"] else "fixed weights" if r0["model"].startswith("stand-in")
             else "UNTRAINED: few nuclei, post-processing understated")
    print(f"model {r0['model']} ({state})"
          f" on {r0['device']}{' ' + r0.get('gpu_name', '') if 'gpu_name' in r0 else ''}, batch {r0['batch_size']}, "
          f"precision {r0['precision']}{', compiled' if r0['compiled'] else ''}, {r0['readers']} readers, "
          f"{r0['post_workers']} post workers, {r0['torch_threads']} torch threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    from dannucnet.tables import format_table

    header = ["size", "tissue MP", "chunks", "tiles", "e2e s", "tiles/s", "decode MP/s", "model t/s", "post nuc/s",
              "model wait s", "nuclei", "RSS MB", "GPU %"]
    cells = [[f"{r['size']}²", f"{r['tissue_mp']:.1f}", r["chunks"], r["tiles"], f"{r['e2e_seconds']:.1f}",
              f"{r['tiles'] / r['e2e_seconds']:.2f}",
              f"{r['decode_megapixels'] / max(r['decode_seconds'], 1e-9):.1f}",
              f"{r['tiles'] / max(r['model_seconds'], 1e-9):.2f}",
              f"{r['nuclei'] / max(r['post_seconds'], 1e-9):.1f}", f"{r['model_idle_seconds']:.1f}",
              r["nuclei"], f"{r['rss_mb']:.0f}", _fmt(r.get("gpu_util_mean"), ".0f")] for r in rows]
    print(format_table(header, cells, align=">" * len(header)))
    print("(decode MP/s per reader thread, post nuc/s per worker; model t/s = tiles / device busy time; "
          "model wait = model thread waiting for decoded chunks)")
    for r in rows:
        print(f"{r['size']}²: end-to-end / model busy = {r['e2e_seconds'] / max(r['model_seconds'], 1e-9):.2f}; "
              f"plan + tissue mask {r['plan_seconds']:.1f} s; peak RSS {r['rss_mb']:.0f} MB "
              f"({r['rss_model_mb']:.0f} MB after loading the model)")
    areas = [r["tissue_mp"] for r in rows]
    et = fit_exponent(areas, [r["e2e_seconds"] for r in rows])
    em = fit_exponent(areas, [r["rss_mb"] for r in rows])
    print(f"scaling exponent, time vs tissue area: {_fmt(et, '.2f')} (target ~1.0)")
    print(f"scaling exponent, peak RSS vs tissue area: {_fmt(em, '.2f')} (target ~0)")
    if len(rows) >= 3:  # small slides cannot fill the queues; the largest two show where memory settles
        tail = fit_exponent(areas[-2:], [r["rss_mb"] for r in rows[-2:]])
        print(f"  between the two largest sizes: {_fmt(tail, '.3f')} (the queues are full from ~16 chunks on)")
    last = rows[-1]
    stand_in = r0["model"].startswith("stand-in")
    if et is not None and len(rows) >= 3 and 4096 <= last["size"] < 100000 and not stand_in:
        big = 100000**2 * 0.5 / 1e6  # a 100k² slide with 50 % tissue, in tissue MP
        est = last["e2e_seconds"] * (big / last["tissue_mp"]) ** et
        print(f"extrapolated 100k² (50 % tissue) slide: ~{est:.0f} s end to end (target <= 60 s on one GPU)")
    if bare:
        for name in ("eager", "compiled"):
            if name in bare:
                b = bare[name]
                print(f"bare model {name}: {b['tiles_per_s']:.1f} tiles/s ({b['precision']}, batch {b['batch']}"
                      f"{', compiled' if b['compiled'] else ''}) — MODEL_SPEC §4: H100 compute floor 32,160 tiles/s, "
                      f"eager plan 3–6 k, compiled plan 8–13 k; target >= 8 k; CPU 2.5–4")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="slide sides in px (CPU default 2048 4096 8192)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (512 768 1024) to prove the script works")
    p.add_argument("--gpu", action="store_true", help=f"GPU preset: sizes {GPU_SIZES}, compile, bare model")
    p.add_argument("--model", help="model name or folder (default: the shipped default model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default 2 on CPU, 32 on GPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the network (falls back to eager)")
    p.add_argument("--readers", type=int, default=2, help="decoding threads (default 2)")
    p.add_argument("--post-workers", type=int, help="post-processing workers (default: 1 on CPU, cores-3 on GPU)")
    p.add_argument("--tissue-fraction", type=float, default=0.5)
    p.add_argument("--bare", action="store_true", help="also measure the bare model (default on with --gpu)")
    p.add_argument("--bare-batches", type=int, default=4)
    p.add_argument("--stand-in", action="store_true",
                   help="replace the network by a 1x1 conv: pipeline-only memory/throughput scaling at large sizes")
    p.add_argument("--workdir", type=Path, help="where slides are written and kept (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-bare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        print(json.dumps(measure_slide(args)))
        return 0
    if args.child_bare:
        print(json.dumps(measure_bare(args)))
        return 0

    if args.gpu:
        args.compile = True
        args.bare = True
        if args.batch_size is None:
            args.batch_size = 128
    sizes = args.sizes or ([512, 768, 1024] if args.quick else GPU_SIZES if args.gpu else [2048, 4096, 8192])
    common = ["--device", args.device, "--precision", args.precision, "--readers", str(args.readers)]
    for flag, value in (("--model", args.model), ("--batch-size", args.batch_size),
                        ("--post-workers", args.post_workers)):
        if value is not None:
            common += [flag, str(value)]
    if args.compile:
        common.append("--compile")
    if args.stand_in:
        common.append("--stand-in")
    script = Path(__file__).resolve()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_slides_")
    folder = args.workdir or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    rows, bare = [], None
    try:
        if args.bare:
            print("measuring the bare model ...", file=sys.stderr)
            bare = run_child(script, ["--child-bare", "--bare-batches", str(args.bare_batches), *common])
        for size in sizes:
            slide = make_slide(folder, size, args.tissue_fraction)
            print(f"measuring {size}² ...", file=sys.stderr)
            rows.append(run_child(script, ["--child", str(slide), *common]))
            if args.json:  # keep partial results should a later size run out of time
                args.json.write_text(json.dumps({"slides": rows, "bare": bare}, indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_report(rows, bare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
