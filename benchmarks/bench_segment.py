"""Standalone door vs bare model: how much does everything around the network cost?

For synthetic pyramidal slides (4096² and 8192² by default) this measures, in
one process per slide size (so peak RSS is that size's own):

* **bare model** — ``Predictor.predict_tiles`` over exactly the windows the
  pipeline runs (same chunks, same windows, same batches; the pixels are read
  beforehand and not timed);
* **end to end** — ``jobs.segment_file.segment_to_geojson``: tissue mask,
  decoding, inference, blending, instances, polygons, measurements, GeoJSON.gz;

and prints tiles/s, megapixels/s, nuclei polygonised per second, peak RSS and
the ratios issue 2 sets targets for: end-to-end / bare model (≤ 1.3 on CPU)
and RSS(8192²) / RSS(4096²) (< 1.5).

    python benchmarks/bench_segment.py                  # 4096² and 8192², default model, auto device
    python benchmarks/bench_segment.py --quick          # 512² and 1024²: proves the script runs
    python benchmarks/bench_segment.py --sizes 2048 4096 --model untrained --device cpu

An untrained model finds almost no nuclei, which makes post-processing look
cheaper than it is on real tissue: the report says which model ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB.

    On Linux this is VmHWM, the high-water mark of this program's own memory. Not ru_maxrss: Linux
    carries it over from the parent through fork and exec, so a child started by a parent that
    had just rendered a 32k² test slide reported the parent's 1.1 GB as its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): 1 = linear, 0 = flat."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return None if sxx == 0 else sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def make_slide(folder: Path, size: int, tissue_fraction: float, seed: int = 0) -> Path:
    """A synthetic pyramidal JPEG TIFF at 0.25 µm/px, reused when already written."""
    from dannucnet.slides.synthetic import write_synthetic_slide

    path = folder / f"synthetic_{size}_t{int(round(tissue_fraction * 100))}_s{seed}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        write_synthetic_slide(path, size, seed=seed, tissue_fraction=tissue_fraction)
        print(f"  wrote {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def run_child(script: Path, args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is a JSON result."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"measurement {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# child: one slide, one process
# ---------------------------------------------------------------------------


def measure(slide: Path, model: str | None, device: str, batch_size: int | None, out_dir: Path) -> dict:
    import numpy as np
    import torch

    from dannucnet.engine import Predictor, resample_rgb, scale_to_model
    from dannucnet.engine.tiling import pad_to_tile, plan_windows
    from dannucnet.jobs.segment_file import segment_to_geojson
    from dannucnet.jobs.segmenters import LocalSegmenter
    from dannucnet.model import load_model
    from dannucnet.pipeline import SegmentOptions, plan_slide
    from dannucnet.slides import open_image

    loaded = load_model(model)
    predictor = Predictor(loaded, device=device, batch_size=batch_size)
    options = SegmentOptions()
    # warm-up: first calls allocate and pick kernels
    predictor.predict_tiles(np.full((predictor.batch_size, predictor.tile, predictor.tile, 3), 200, np.uint8))
    rss_model = peak_rss_mb()

    out = out_dir / f"{slide.stem}.geojson.gz"
    summary = segment_to_geojson(LocalSegmenter(predictor, options), slide, out)
    rss_e2e = peak_rss_mb()

    # bare model over the same windows, batch by batch as Predictor.predict cuts them
    tiles = 0
    bare = 0.0
    sync = torch.cuda.synchronize if predictor.device.type == "cuda" else (lambda: None)
    with open_image(slide) as src:
        plan = plan_slide(src, predictor.card.mpp, options=options)
        t = predictor.tile
        for chunk in plan.chunks:
            read = chunk.read.to_int()
            rgb = src.read_region(int(read.x), int(read.y), int(read.width), int(read.height),
                                  downsample=plan.downsample)
            scale = scale_to_model(plan.mpp * read.width / rgb.shape[1], predictor.card.mpp)
            padded, _ = pad_to_tile(resample_rgb(rgb, scale), t)
            windows = plan_windows(padded.shape[0], padded.shape[1], t, predictor.overlap)
            batches = [np.stack([padded[w.y : w.y + t, w.x : w.x + t] for w in windows[i : i + predictor.batch_size]])
                       for i in range(0, len(windows), predictor.batch_size)]
            sync()
            t0 = time.perf_counter()
            for b in batches:
                predictor.predict_tiles(b)
            sync()
            bare += time.perf_counter() - t0
            tiles += len(windows)
    return {
        "size": summary.width, "height": summary.height, "chunks": summary.chunks,
        "skipped_chunks": plan.skipped_background, "tiles": tiles, "nuclei": summary.nuclei,
        "e2e_seconds": summary.seconds, "bare_seconds": bare, "rss_model_mb": rss_model, "rss_e2e_mb": rss_e2e,
        "rss_total_mb": peak_rss_mb(), "model": summary.model, "model_version": summary.model_version,
        "trained": summary.model_trained, "device": summary.device, "batch_size": predictor.batch_size,
        "torch_threads": torch.get_num_threads(), "output_mb": out.stat().st_size / 1e6,
    }


# ---------------------------------------------------------------------------
# parent: slides, table, ratios
# ---------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    from dannucnet.tables import format_table

    header = ["size", "chunks", "tiles", "bare s", "e2e s", "e2e/bare", "tiles/s", "bare t/s", "MP/s", "nuclei",
              "nuc/s", "RSS MB"]
    cells = []
    for r in rows:
        mp = r["size"] * r["height"] / 1e6
        cells.append([f"{r['size']}²", r["chunks"], r["tiles"], f"{r['bare_seconds']:.1f}", f"{r['e2e_seconds']:.1f}",
                      f"{r['e2e_seconds'] / max(r['bare_seconds'], 1e-9):.2f}", f"{r['tiles'] / r['e2e_seconds']:.2f}",
                      f"{r['tiles'] / max(r['bare_seconds'], 1e-9):.2f}", f"{mp / r['e2e_seconds']:.2f}", r["nuclei"],
                      f"{r['nuclei'] / r['e2e_seconds']:.1f}", f"{r['rss_e2e_mb']:.0f}"])
    print(format_table(header, cells, align=">" * len(header)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="slide sides in px (default 4096 8192)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (512 1024) to check the script works")
    p.add_argument("--model", help="model name or folder (default: the shipped default model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--tissue-fraction", type=float, default=1.0, help="synthetic tissue cover (default 1.0)")
    p.add_argument("--workdir", type=Path, help="where slides are written and kept (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        out_dir = Path(tempfile.mkdtemp(prefix="bench_out_"))
        result = measure(args.child, args.model, args.device, args.batch_size, out_dir)
        print(json.dumps(result))
        return 0

    sizes = [512, 1024] if args.quick else args.sizes
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_segment_")
    folder = args.workdir or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in sizes:
            slide = make_slide(folder, size, args.tissue_fraction)
            child = ["--child", str(slide), "--device", args.device]
            if args.model:
                child += ["--model", args.model]
            if args.batch_size:
                child += ["--batch-size", str(args.batch_size)]
            print(f"measuring {size}² ...", file=sys.stderr)
            rows.append(run_child(Path(__file__).resolve(), child))
    finally:
        if tmp is not None:
            tmp.cleanup()
    first = rows[0]
    trained = "trained" if first["trained"] else "UNTRAINED: few nuclei, post-processing cost understated"
    print(f"model {first['model']} {first['model_version']} ({trained})"
          f" on {first['device']}, batch {first['batch_size']}, {first['torch_threads']} torch threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print_table(rows)
    for r in rows:
        print(f"{r['size']}²: end-to-end / bare model = {r['e2e_seconds'] / max(r['bare_seconds'], 1e-9):.2f} "
              f"(target <= 1.3 on CPU); peak RSS {r['rss_e2e_mb']:.0f} MB, of which {r['rss_model_mb']:.0f} MB after "
              f"loading the model")
    by = {r["size"]: r for r in rows}
    a, b = (by[4096], by[8192]) if 4096 in by and 8192 in by else (rows[0], rows[-1])
    if a is not b:
        print(f"peak RSS {b['size']}² / {a['size']}² = {b['rss_e2e_mb'] / a['rss_e2e_mb']:.2f} (target < 1.5)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
