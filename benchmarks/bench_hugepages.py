"""numpy's huge pages on and off, on one slide job (issue 18).

numpy asks Linux for 2 MB pages for large arrays unless ``NUMPY_MADVISE_HUGEPAGE=0``, which it
reads once, at import; ``dannucnet`` sets 0 unless the environment says otherwise. So each
setting runs in a child process of this one, taking turns on the same synthetic slide
(``segment_to_geojson``, the ``dannucnet segment`` door, OpenVINO where installed): MP/s end to
end per setting and the ratio against numpy's default (on).

    PYTHONPATH=python_backend python benchmarks/bench_hugepages.py --side 4096 --model dannucnet-monuseg-20x
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_runtime import synthetic_slide, work_folder

CHILD = """
import json, sys, time
from dannucnet.engine import Predictor
from dannucnet.jobs.segment_file import segment_to_geojson
from dannucnet.jobs.segmenters import LocalSegmenter
from dannucnet.model import load_model
import numpy
slide, out, model, side = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
predictor = Predictor(load_model(model), device="cpu", runtime="auto")
started = time.perf_counter()
summary = segment_to_geojson(LocalSegmenter(predictor), slide, out)
seconds = time.perf_counter() - started
print(json.dumps({"mp_s": side * side / 1e6 / seconds, "nuclei": summary.nuclei,
                  "hugepages": bool(numpy._core.multiarray._get_madvise_hugepage())}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=4096, help="slide side in px (default 4096)")
    p.add_argument("--mpp", type=float, default=0.5, help="slide pixel size (default 0.5: a 20× scan)")
    p.add_argument("--model", default="dannucnet-monuseg-20x")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    work = work_folder(args.workdir, "bench_hugepages_")
    slide = synthetic_slide(work, f"slide_{args.side}_{args.mpp:g}.tif", args.side, args.mpp)
    rates: dict[str, list[float]] = {"on (numpy's default)": [], "off (dannucnet's default)": []}
    for _ in range(args.repeats):
        for name, flag in zip(rates, ("1", "0")):  # taking turns, so both meet the same load
            env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": flag}
            done = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(work / "out.geojson.gz"), args.model,
                                   str(args.side)], env=env, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rates[name].append(row["mp_s"])
            print(f"  huge pages {name}: {row['mp_s']:.3f} MP/s, {row['nuclei']} nuclei, load {os.getloadavg()[0]:.1f}",
                  flush=True)
    base = max(rates["on (numpy's default)"])
    print(f"\nslide {args.side}² at {args.mpp:g} µm/px, model {args.model}")
    for name, values in rates.items():
        print(f"  huge pages {name}: best {max(values):.3f} MP/s ({max(values) / base:.2f}×)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
