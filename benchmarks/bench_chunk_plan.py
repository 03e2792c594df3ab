"""Slide chunks cut to fill whole network windows, against equal pieces (issue 18).

A slide is cut into chunks of at most 2048 model px, each read with a 32 µm margin and
cut into 256² windows overlapping at least 32 px. Equal pieces ignore that grid: a
2048 px core read with 64 px margins (0.5 µm/px) is 2176 px, which takes 10 windows
where 9 would hold 1920 px of core. ``plan_slide`` now cuts each axis so that the reads
fill whole windows (``geometry.ownership._aligned_cuts``). Both plans run here in one
process, taking turns on the same synthetic slide through the same predictor
(``run_slide`` with the in-process step, what ``dannucnet segment`` runs): MP/s end to
end, network pixels per slide pixel, chunks and nuclei (ownership is exact either way;
only network context near the seams differs).

    PYTHONPATH=python_backend python benchmarks/bench_chunk_plan.py --side 6144
    PYTHONPATH=python_backend python benchmarks/bench_chunk_plan.py --side 8192 --mpp 0.25 --model dannucnet-monuseg
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_runtime import TimedForward, machine, print_turns, synthetic_slide, take_turns, turn_arguments, work_folder


def run(step, slide: Path, options, rois=None) -> dict:
    from dannucnet.pipeline.slide import run_slide
    from dannucnet.slides import open_image

    predictor = step.predictor
    timed = TimedForward(predictor.forward)
    original, predictor.forward = predictor.forward, timed
    try:
        with open_image(slide) as source:
            started = time.perf_counter()
            chunks = nuclei = 0
            for found in run_slide(step, source, rois=rois, options=options):
                chunks += 1
                nuclei += len(found)
            seconds = time.perf_counter() - started
            pixels = source.width * source.height
    finally:
        predictor.forward = original
    return {"mp_s": pixels / 1e6 / seconds, "model_s": timed.seconds, "seconds": seconds, "chunks": chunks,
            "network_px_per_px": timed.pixels / pixels, "nuclei": nuclei}


PLAN_COLUMNS = {"model s": "model_s", "network px per slide px": "network_px_per_px", "chunks": "chunks",
                "nuclei": "nuclei"}


def header(card, description: str, args) -> str:
    """The machine, the model and the slide, as the take-turns benchmarks print them first."""
    return (f"machine: {machine()}\nmodel {card.name} {card.version} at {card.mpp} µm/px, {description}; "
            f"slide {args.side}² at {args.mpp:g} µm/px")


def compare_steps(arms: dict, slide: Path, repeats: int, first: str, rois=None) -> None:
    """Each arm (a slide step and its options) on ``slide`` (inside ``rois``) in turn; then the best runs."""
    results = take_turns({name: lambda arm=arm: run(arm[0], slide, arm[1], rois) for name, arm in arms.items()},
                         repeats)
    print_turns(results, first, PLAN_COLUMNS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    turn_arguments(p, side=6144)
    p.add_argument("--mpp", type=float, default=0.5, help="the slide's µm/px (default 0.5: a 20× slide)")
    args = p.parse_args()

    from dannucnet.engine import Predictor
    from dannucnet.model import load_model
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.pipeline.slide import InProcessStep

    class EqualPieces(InProcessStep):
        """The plan before: equal pieces of at most the chunk size (no window grid given to the planner)."""

        windows = None  # type: ignore[assignment]

    work = work_folder(args.workdir, "bench_chunk_plan_")
    slide = synthetic_slide(work, f"slide_{args.mpp:g}_{args.side}.tif", args.side, args.mpp)
    predictor = Predictor(load_model(args.model), device="cpu", runtime=args.runtime)
    print(header(predictor.card, predictor.description, args))
    options = SegmentOptions()
    compare_steps({"equal pieces (before)": (EqualPieces(predictor), options),
                   "window-aligned (now)": (InProcessStep(predictor), options)}, slide, args.repeats, "chunk plan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
