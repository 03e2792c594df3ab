"""Installed models end to end on one slide, taking turns (issue 18): the full 20× model against its lite copy.

Each ``--models`` entry gets its own predictor (same runtime) and runs the in-process step
(what ``dannucnet segment`` runs) on the same synthetic slide, the models taking turns,
best of ``--repeats``: MP/s end to end, network seconds, network pixels per slide pixel,
chunks and nuclei. The first model is the baseline. Nuclei counts differ between models by
what each finds; accuracy is in their cards and ``docs/models.md``.

    PYTHONPATH=python_backend python benchmarks/bench_models.py --side 4096
    PYTHONPATH=python_backend python benchmarks/bench_models.py --side 4096 --mpp 0.25 \\
        --models dannucnet-monuseg dannucnet-monuseg-20x
"""

from __future__ import annotations

import argparse

from bench_chunk_plan import compare_steps
from bench_runtime import machine, synthetic_slide, turn_arguments, work_folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    turn_arguments(p, side=4096, model=None)
    p.add_argument("--mpp", type=float, default=0.5, help="the slide's µm/px (default 0.5: a 20× slide)")
    p.add_argument("--models", nargs="+", default=["dannucnet-monuseg-20x", "dannucnet-monuseg-20x-lite"],
                   help="models to compare; the first is the baseline")
    args = p.parse_args()

    from dannucnet.engine import Predictor
    from dannucnet.model import load_model
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.pipeline.slide import InProcessStep

    work = work_folder(args.workdir, "bench_models_")
    slide = synthetic_slide(work, f"slide_{args.mpp:g}_{args.side}.tif", args.side, args.mpp)
    print(f"machine: {machine()}\nslide {args.side}² at {args.mpp:g} µm/px")
    arms = {}
    for name in args.models:
        predictor = Predictor(load_model(name), device="cpu", runtime=args.runtime)
        card = predictor.card
        base = card.config.base_filters
        label = f"{card.name} {card.version} ({base} base filters, {card.mpp:g} µm/px)"
        print(f"{label}: {predictor.description}")
        arms[label] = (InProcessStep(predictor), SegmentOptions())
    compare_steps(arms, slide, args.repeats, "model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
