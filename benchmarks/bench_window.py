"""Network window sizes (and chunk sizes) end to end on one slide (issue 18): 256² windows against larger ones.

The network has no global pooling (every pool in ``model/network.py`` is local), so a
window of any multiple of 16 px sees the same nucleus the same way; what the window
size changes is how many pixels are run twice. Neighbouring windows overlap at least
32 px, so a 256² window moves 224 px per step and the network runs (256/224)² = 1.31
pixels per slide pixel before chunk margins; a 512² window runs (512/480)² = 1.14.
Each size runs here in one process, taking turns on the same synthetic slide through
the in-process step (what ``dannucnet segment`` runs; the chunk plan follows each
size's windows): MP/s end to end, network seconds, network pixels per slide pixel,
chunks and nuclei.

    PYTHONPATH=python_backend python benchmarks/bench_window.py --side 4096
    PYTHONPATH=python_backend python benchmarks/bench_window.py --side 4096 --mpp 0.25 --model dannucnet-monuseg
    PYTHONPATH=python_backend python benchmarks/bench_window.py --windows 512 --chunk-sizes 2048 3072 ...
"""

from __future__ import annotations

import argparse

from bench_chunk_plan import compare_steps, header
from bench_runtime import synthetic_slide, turn_arguments, work_folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    turn_arguments(p, side=4096)
    p.add_argument("--mpp", type=float, default=0.5, help="the slide's µm/px (default 0.5: a 20× slide)")
    p.add_argument("--windows", type=int, nargs="+", default=[256, 512], help="window sides; the first is the baseline")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[2048],
                   help="chunk core sides (model px) to try with each window side (default 2048)")
    args = p.parse_args()

    from dannucnet.engine import Predictor
    from dannucnet.model import load_model
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.pipeline.slide import InProcessStep

    work = work_folder(args.workdir, "bench_window_")
    slide = synthetic_slide(work, f"slide_{args.mpp:g}_{args.side}.tif", args.side, args.mpp)
    loaded = load_model(args.model)
    steps = {}
    for side in args.windows:
        predictor = Predictor(loaded, device="cpu", runtime=args.runtime, tile_size=side)
        steps[f"{side}² windows, batch {predictor.batch_size}"] = InProcessStep(predictor)
    print(header(loaded.card, predictor.description, args))
    arms = {f"{name}, chunks {chunk}": (step, SegmentOptions(chunk_size=chunk))
            for name, step in steps.items() for chunk in args.chunk_sizes}
    compare_steps(arms, slide, args.repeats, "windows, chunk size")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
