"""``dannucnet demo``: the whole standalone job on a built-in synthetic slide.

Makes a synthetic H&E pyramidal TIFF with known nuclei, segments it with the
default model through exactly the code path of ``dannucnet segment``, and
writes QuPath GeoJSON plus an overlay PNG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dannucnet.commands._common import add_model_arguments, chunk_progress, predictor_pool

NAME = "demo"
HELP = "segment a built-in synthetic H&E slide end to end (about a minute on a laptop CPU)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--seed", type=int, default=7)
    add_model_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dannucnet.errors import InputError, OutputError
    from dannucnet.jobs.segment_file import segment_to_geojson
    from dannucnet.jobs.segmenters import LocalSegmenter
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.slides.synthetic import MAX_SIDE, write_synthetic_slide

    for option, value in (("--width", args.width), ("--height", args.height)):  # checked before --out is made
        if not 0 < value <= MAX_SIDE:
            raise InputError(f"{option} must be 1 to {MAX_SIDE:,} px, got {value}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a read-only or unreachable place
        raise OutputError(f"cannot create the output folder {out}: {exc.strerror or exc}; "
                          "choose another with --out") from None
    t0 = time.perf_counter()
    slide = write_synthetic_slide(out / "demo_slide.tif", (args.width, args.height), seed=args.seed,
                                  tissue_fraction=0.8)
    print(f"made a synthetic H&E slide {slide.width} x {slide.height} px at {slide.mpp} µm/px with "
          f"{len(slide.nuclei)} nuclei in {time.perf_counter() - t0:.1f} s: {slide.path}")
    segmenter = LocalSegmenter(predictor_pool(args), SegmentOptions())
    progress, close = chunk_progress("segmenting", enabled=not args.quiet)
    try:
        summary = segment_to_geojson(
            segmenter, slide.path, out / "demo_nuclei.geojson",
            overlay_path=out / "demo_overlay.png", progress=progress,
        )
    finally:
        close()
    print(f"found {summary.nuclei} nuclei in {summary.seconds:.1f} s on {summary.device} "
          f"with model {summary.model} {summary.model_version}{'' if summary.model_trained else ' (UNTRAINED)'}")
    print(f"QuPath GeoJSON: {summary.output}  (QuPath: File > Import objects, or drag onto the image)")
    print(f"overlay:        {summary.overlay}")
    return 0
