"""End-to-end megapixels/s per network runtime on a 40× and a 20× synthetic slide (issue 18).

One process, one model, one predictor per runtime (``engine.runtime``: torch, openvino,
onnxruntime); every slide goes through the standalone door ``segment_to_geojson`` (what
``dannucnet segment`` runs: read → resample to the model's 0.25 µm/px → colour → windows →
network → blend → instances → polygons → GeoJSON.gz), with the runtimes taken in turn on the
same slide. Ratios are against PyTorch fp32 in this process. Beside them: QuPath's built-in
*Cell detection*, about 0.7 MP/s on the same 2-core machine (issue 18's measurement), the
reference a user has today.

The ``load`` column is the machine's 1-minute load average after the row (2 cores: above 2,
others were running and absolute MP/s are low; the ratios within a row's slide still hold
roughly, as every runtime met the same contention in turn). Each row also splits the time:
``model s`` is the time inside the network's forward calls; the rest is reading/decoding, resampling,
blending and post-processing (instances,
polygons, writing). ``--profile`` adds a cProfile of one run (the default runtime, 40×)
to name the largest remaining costs. ``--threads`` measures the bare forward pass per
runtime at 1 and 2 threads.

    python benchmarks/bench_runtime.py --quick               # 40× 1024², 20× 512²
    python benchmarks/bench_runtime.py                       # 40× 2048², 20× 1024²
    python benchmarks/bench_runtime.py --profile --threads --json out.json
    python benchmarks/bench_runtime.py --runtimes torch openvino --also-model dannucnet-monuseg-20x
    python benchmarks/bench_runtime.py --runtimes torch openvino --also-model auto-fast --side20 2048
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

QUPATH_MP_S = 0.7  # QuPath 0.5 built-in cell detection on this 2-core machine (issue 18)
RUNTIMES = ("torch", "openvino", "onnxruntime")


class TimedForward:
    """Wraps a predictor's forward callable and sums the seconds spent inside it (and the windows and
    network pixels it ran: windows may differ in side, see ``Predictor.window_for``)."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.seconds = 0.0
        self.calls = 0
        self.windows = 0
        self.pixels = 0

    def __call__(self, x):
        t0 = time.perf_counter()
        try:
            return self.forward(x)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.windows += len(x)
            self.pixels += len(x) * x.shape[-1] * x.shape[-2]


def work_folder(workdir: Path | None, prefix: str) -> Path:
    """``--workdir`` (created if missing), or a fresh temporary folder."""
    work = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def synthetic_slide(folder: Path, name: str, side: int, mpp: float, tissue: float = 1.0) -> Path:
    """``folder/name``: a side² synthetic slide (seed 3) at ``mpp``, written unless an earlier run left it there."""
    from dannucnet.slides.synthetic import write_synthetic_slide

    path = folder / name
    if not path.exists():
        write_synthetic_slide(path, side, seed=3, mpp=mpp, tissue_fraction=tissue)
    return path


def turn_arguments(p: argparse.ArgumentParser, side: int, model: str | None = "dannucnet-monuseg-20x") -> None:
    """The options every take-turns benchmark shares: slide side, model (none: the benchmark takes its own
    list), runtime, repeats, work folder."""
    p.add_argument("--side", type=int, default=side, help=f"slide side in px (default {side})")
    if model is not None:
        p.add_argument("--model", default=model)
    p.add_argument("--runtime", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path)


def take_turns(arms: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Each arm's result dicts (with ``mp_s``), the arms run in turn ``repeats`` times so that all meet the
    same load, every other round in reverse (A B, B A: the first run's warm-up is not always one arm's);
    each run is printed as it ends."""
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for round_ in range(repeats):
        for name, arm in list(arms.items())[:: -1 if round_ % 2 else 1]:
            results[name].append(arm())
            print(f"  {name}: {results[name][-1]['mp_s']:.3f} MP/s, load {os.getloadavg()[0]:.1f}", flush=True)
    return results


def print_turns(results: dict[str, list[dict]], first: str, columns: dict[str, str]) -> None:
    """A markdown table of each arm's best run: MP/s, × the first arm's best, then ``columns`` (header: key)."""
    base = max(r["mp_s"] for r in next(iter(results.values())))
    print(f"\n| {first} | MP/s (best) | × before | " + " | ".join(columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for name, rows in results.items():
        best = max(rows, key=lambda r: r["mp_s"])
        cells = [f"{best[key]:.2f}" if isinstance(best[key], float) else str(best[key]) for key in columns.values()]
        print(f"| {name} | {best['mp_s']:.3f} | {best['mp_s'] / base:.2f} | " + " | ".join(cells) + " |")


def make_slides(folder: Path, side40: int, side20: int, tissue: float) -> dict[str, tuple[Path, float]]:
    """The same kind of synthetic tissue scanned at 0.25 µm/px (40×) and at 0.5 µm/px (20×)."""
    return {label: (synthetic_slide(folder, f"slide_{label}_{side}.tif", side, mpp, tissue), mpp)
            for label, side, mpp in (("40x", side40, 0.25), ("20x", side20, 0.5))}


def build_predictors(model: str | None, runtimes: list[str], batch_size: int | None) -> dict:
    from dannucnet.engine import Predictor
    from dannucnet.model import load_model

    loaded = load_model(model)
    predictors = {}
    for name in runtimes:
        t0 = time.perf_counter()
        predictor = Predictor(loaded, device="cpu", runtime=name, batch_size=batch_size)
        start = time.perf_counter() - t0
        if predictor.runtime != name:
            print(f"{name}: not usable here, skipped (fell back to {predictor.runtime})")
            continue
        warm = predictor.tile
        predictor.predict_tiles(__import__("numpy").full((predictor.batch_size, warm, warm, 3), 200, "uint8"))
        predictors[name] = (predictor, start)
    return predictors


def run_once(predictor, slide: Path, out_dir: Path, pipelined: bool = False) -> dict:
    from dannucnet.jobs.segment_file import segment_to_geojson
    from dannucnet.jobs.segmenters import LocalSegmenter

    timed = TimedForward(predictor.forward)
    original, predictor.forward = predictor.forward, timed
    try:
        segmenter = LocalSegmenter(predictor, pipelined=pipelined)
        summary = segment_to_geojson(segmenter, slide, out_dir / f"{slide.stem}.geojson.gz")
    finally:
        predictor.forward = original
    mp = summary.width * summary.height / 1e6
    return {"load_1min": os.getloadavg()[0], "mp": mp, "seconds": summary.seconds, "mp_s": mp / summary.seconds,
            "model_seconds": timed.seconds,
            "forward_calls": timed.calls, "nuclei": summary.nuclei,
            "description": predictor.description + (" piped" if pipelined else "")}


def bare_threads(predictors: dict, batches: int = 3) -> list[dict]:
    """ms per window of the bare forward pass per runtime at 1 and 2 threads (fresh runtimes for the exported ones)."""
    import numpy as np
    import torch

    from dannucnet.engine.runtime import build_forward

    rows = []
    for name, (predictor, _) in predictors.items():
        b, t = predictor.batch_size, predictor.tile
        x = torch.from_numpy(np.random.default_rng(0).random((b, 3, t, t), dtype=np.float32))
        for threads in (1, 2):
            if name == "torch":
                before = torch.get_num_threads()
                torch.set_num_threads(threads)
                forward = predictor.network
            else:
                forward, _, _ = build_forward(name, predictor.network, predictor.model.source, t, threads)
            with torch.inference_mode():
                forward(x)
                t0 = time.perf_counter()
                for _ in range(batches):
                    forward(x)
                ms = (time.perf_counter() - t0) / (batches * b) * 1000
            if name == "torch":
                torch.set_num_threads(before)
            rows.append({"runtime": name, "threads": threads, "ms_per_window": ms})
    return rows


def profile_once(predictor, slide: Path, out_dir: Path, top: int = 14) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run_once(predictor, slide, out_dir)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


#: CPU features that decide a CPU runtime's speed, in the order printed: the VMs this project ran on
#: differed 5× per window between an AVX2-only EPYC (OpenVINO fp32) and a Xeon with avx512_bf16 (bf16).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")


def machine() -> str:
    """CPU model, the vector features that set the runtimes' precision, cores and Python."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or ("no AVX2" if flags else "CPU features unknown")
    return f"{cpu} ({isa}), {os.cpu_count()} logical cores, Python {platform.python_version()}"


def print_table(rows: list[dict]) -> None:
    from dannucnet.tables import format_table

    header = ["slide", "runtime", "MP", "e2e s", "MP/s", "× torch", "× QuPath", "model s", "other s", "nuclei", "load"]
    cells = [[r["slide"], r["description"], f"{r['mp']:.2f}", f"{r['seconds']:.1f}", f"{r['mp_s']:.3f}",
              f"{r['vs_torch']:.2f}", f"{r['mp_s'] / QUPATH_MP_S:.2f}", f"{r['model_seconds']:.1f}",
              f"{r['seconds'] - r['model_seconds']:.1f}", r["nuclei"], f"{r['load_1min']:.1f}"] for r in rows]
    cells.append(["", "QuPath cell detection (reference, issue 18)", "", "", f"{QUPATH_MP_S:.3f}", "", "1.00",
                  "", "", "", ""])
    print(format_table(header, cells, align="<<" + ">" * (len(header) - 2)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40× 1024² and 20× 512²")
    p.add_argument("--side40", type=int, default=2048, help="40× slide side in px (default 2048)")
    p.add_argument("--side20", type=int, default=1024,
                   help="20× slide side in px (default 1024: the same tissue area in µm² ÷ 4)")
    p.add_argument("--tissue-fraction", type=float, default=1.0,
                   help="synthetic tissue cover (default 1.0: every chunk runs)")
    p.add_argument("--slides", nargs="+", default=["40x", "20x"], choices=["40x", "20x"], help="which slides to run")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--model", help="model name or folder (default: the shipped model)")
    p.add_argument("--also-model", metavar="NAME",
                   help="also run this model (e.g. dannucnet-monuseg-20x; auto or auto-fast: the model those choose "
                        "for each slide's pixel size) on each slide with the last runtime given; its rows are ratios "
                        "against the first model's torch row in this process")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default: the predictor's, 2 on CPU)")
    p.add_argument("--pipelined", action="store_true",
                   help="also run each slide through the pipelined runner (segment --pipelined) on OpenVINO")
    p.add_argument("--profile", action="store_true", help="cProfile one 40× run of the first exported runtime")
    p.add_argument("--threads", action="store_true", help="also time the bare forward pass at 1 and 2 threads")
    p.add_argument("--workdir", type=Path, help="where slides are written and kept (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    if args.quick:
        args.side40, args.side20 = 1024, 512

    work = work_folder(args.workdir, "bench_runtime_")
    slides = make_slides(work, args.side40, args.side20, args.tissue_fraction)
    predictors = build_predictors(args.model, args.runtimes, args.batch_size)
    card = next(iter(predictors.values()))[0].card
    print(f"machine: {machine()}")
    print(f"model {card.name} {card.version} (trained: {card.trained}); start-up s: "
          + ", ".join(f"{n} {s:.1f}" for n, (_, s) in predictors.items()))
    from dannucnet.catalogue import AUTO_FAST, AUTO_NAMES
    from dannucnet.commands._common import resolve_auto

    also_built: dict[str, dict] = {}

    def also_for(mpp: float) -> dict:
        """The --also-model predictors for a slide of ``mpp`` µm/px (auto / auto-fast choose per slide)."""
        name = args.also_model
        if name in AUTO_NAMES:
            name = resolve_auto(mpp, fast=name == AUTO_FAST)
        key = str(name)
        if key not in also_built:
            also_built[key] = build_predictors(name, args.runtimes[-1:], args.batch_size)
        return also_built[key]
    rows = []
    for label, (slide, mpp) in slides.items():
        if label not in args.slides:
            continue
        base = None
        for name, (predictor, _) in predictors.items():
            row = {"slide": label, "mpp": mpp, "runtime": name, **run_once(predictor, slide, work)}
            base = base or (row["mp_s"] if name == "torch" else None)
            row["vs_torch"] = row["mp_s"] / base if base else float("nan")
            rows.append(row)
            print(f"  {label} {row['description']}: {row['mp_s']:.3f} MP/s", flush=True)
            if args.pipelined and name == "openvino":
                piped = {"slide": label, "mpp": mpp, "runtime": name, **run_once(predictor, slide, work, True)}
                piped["vs_torch"] = piped["mp_s"] / base if base else float("nan")
                rows.append(piped)
                print(f"  {label} {piped['description']}: {piped['mp_s']:.3f} MP/s", flush=True)
        for name, (predictor, _) in (also_for(mpp) if args.also_model else {}).items():
            row = {"slide": label, "mpp": mpp, "runtime": name, **run_once(predictor, slide, work)}
            chosen = f"{args.also_model}: " if args.also_model in AUTO_NAMES else ""
            row["description"] = f"{chosen}{predictor.card.name}: {row['description']}"
            row["vs_torch"] = row["mp_s"] / base if base else float("nan")
            rows.append(row)
            print(f"  {label} {row['description']}: {row['mp_s']:.3f} MP/s", flush=True)
    print()
    print_table(rows)
    result = {"machine": machine(), "rows": rows, "qupath_mp_s": QUPATH_MP_S}
    if args.threads:
        result["threads"] = bare_threads(predictors)
        print("\nbare forward pass, ms per window:")
        for r in result["threads"]:
            print(f"  {r['runtime']:12} {r['threads']} thread(s): {r['ms_per_window']:7.1f}")
    if args.profile:
        exported = [n for n in predictors if n != "torch"] or list(predictors)
        result["profile"] = profile_once(predictors[exported[0]][0], slides["40x"][0], work)
        print(f"\ncProfile, {exported[0]}, 40× slide (cumulative):\n{result['profile']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
