"""The chunk margin in µm against the old fixed 128 model px, on a 20× slide through the 20× model (issue 18).

A slide is cut into 2048 px chunks (model pixels), each read with a margin of
context so that the chunk owning a nucleus's centroid sees all of it. The margin
was 128 model px for every model: 32 µm at 0.25 µm/px but 64 µm for the 0.5 µm/px
model, twice what the largest nucleus (~25 µm) needs. It is now 32 µm for every
model (``pipeline.options.NUCLEUS_MARGIN_UM``). Both run here in one process,
taking turns on the same synthetic 20× slide (``segment_to_geojson``, the
``dannucnet segment`` door): MP/s end to end, the network pixels per slide pixel
(windows × 256² ÷ slide pixels) and the nuclei found (ownership is exact either
way; only network context at the seams differs).

    PYTHONPATH=python_backend python benchmarks/bench_margin.py --side 4096
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_runtime import TimedForward, machine, print_turns, synthetic_slide, take_turns, turn_arguments, work_folder


def run(predictor, slide: Path, out: Path, options) -> dict:
    from dannucnet.jobs.segment_file import segment_to_geojson
    from dannucnet.jobs.segmenters import LocalSegmenter

    timed = TimedForward(predictor.forward)
    original, predictor.forward = predictor.forward, timed
    try:
        started = time.perf_counter()
        summary = segment_to_geojson(LocalSegmenter(predictor, options=options), slide, out)
        seconds = time.perf_counter() - started
    finally:
        predictor.forward = original
    pixels = summary.width * summary.height
    return {"mp_s": pixels / 1e6 / seconds, "model_s": timed.seconds, "seconds": seconds,
            "network_px_per_px": timed.pixels / pixels, "nuclei": summary.nuclei}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    turn_arguments(p, side=4096)  # a 20× slide: 16.8 MP
    args = p.parse_args()

    from dannucnet.engine import Predictor
    from dannucnet.model import load_model
    from dannucnet.pipeline import SegmentOptions

    work = work_folder(args.workdir, "bench_margin_")
    slide = synthetic_slide(work, f"slide_20x_{args.side}.tif", args.side, 0.5)
    predictor = Predictor(load_model(args.model), device="cpu", runtime=args.runtime)
    print(f"machine: {machine()}\nmodel {predictor.card.name} {predictor.card.version} at {predictor.card.mpp} µm/px, "
          f"{predictor.description}; slide {args.side}² at 0.5 µm/px")
    configs = {"128 model px (before)": SegmentOptions(margin=128), "32 µm (now)": SegmentOptions()}
    results = take_turns({name: lambda options=options: run(predictor, slide, work / "out.geojson.gz", options)
                          for name, options in configs.items()}, args.repeats)
    print_turns(results, "margin", {"model s": "model_s", "network px per slide px": "network_px_per_px",
                                    "nuclei": "nuclei"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
