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

from bench_runtime import print_turns, synthetic_slide, take_turns, turn_arguments, work_folder

CHILD = """
import json, sys, time
from dannucnet.engine import Predictor
from dannucnet.jobs.segment_file import segment_to_geojson
from dannucnet.jobs.segmenters import LocalSegmenter
from dannucnet.model import load_model
import numpy
slide, out, model, side, runtime = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
predictor = Predictor(load_model(model), device="cpu", runtime=runtime)
started = time.perf_counter()
summary = segment_to_geojson(LocalSegmenter(predictor), slide, out)
seconds = time.perf_counter() - started
print(json.dumps({"mp_s": side * side / 1e6 / seconds, "nuclei": summary.nuclei,
                  "hugepages": bool(numpy._core.multiarray._get_madvise_hugepage())}))
"""


def run(slide: Path, out: Path, args: argparse.Namespace, flag: str) -> dict:
    """One slide job in a child process with ``NUMPY_MADVISE_HUGEPAGE=flag``: its MP/s, nuclei, huge pages."""
    env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": flag}
    done = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(out), args.model, str(args.side), args.runtime],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    turn_arguments(p, side=4096)
    p.add_argument("--mpp", type=float, default=0.5, help="slide pixel size (default 0.5: a 20× scan)")
    args = p.parse_args()
    work = work_folder(args.workdir, "bench_hugepages_")
    slide = synthetic_slide(work, f"slide_{args.side}_{args.mpp:g}.tif", args.side, args.mpp)
    flags = {"on (numpy's default)": "1", "off (dannucnet's default)": "0"}
    results = take_turns({name: lambda flag=flag: run(slide, work / "out.geojson.gz", args, flag)
                          for name, flag in flags.items()}, args.repeats)
    print(f"\nslide {args.side}² at {args.mpp:g} µm/px, model {args.model}")
    print_turns(results, "huge pages", {"numpy's huge pages": "hugepages", "nuclei": "nuclei"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
