"""``dannucnet batch-slides``: a cohort of slides → one QuPath GeoJSON each, on Dask distributed."""

from __future__ import annotations

import argparse
import sys

from dannucnet.commands._common import (
    add_model_arguments,
    add_segment_options,
    add_server_arguments,
    bounded,
    segment_options,
)

NAME = "batch-slides"
HELP = "segment many slides (a folder or a list file), one task per slide, on a local or Dask cluster"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", metavar="DIR_OR_LIST",
                   help="folder of slides, or a text file with one slide path per line")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="folder for the <slide>.geojson.gz (or .parquet) outputs")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler (e.g. tcp://host:8786); default: a local cluster on this machine")
    p.add_argument("--workers", type=bounded(int, 1, 1024),
                   help="local cluster worker processes (default: one per GPU, else cores/4)")
    p.add_argument("--retries", type=bounded(int, 0, 100), default=1,
                   help="retries per slide after an unexpected error (default 1)")
    add_model_arguments(p)
    p.add_argument("--mpp", type=float, help="pixel size in µm/px for slides that lack one")
    add_segment_options(p)
    add_server_arguments(p)
    p.add_argument("--force", action="store_true", help="redo slides already done with this model version")
    p.add_argument("--format", choices=("geojson", "parquet"), default="geojson",
                   help="geojson: <slide>.geojson.gz for QuPath (default); parquet: <slide>.parquet (GeoParquet)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dannucnet.cohort import find_slides, run_cohort
    from dannucnet.commands._common import UNTRAINED_WARNING, server_token
    from dannucnet.errors import InputError

    if args.server and args.tta:
        raise InputError("--tta runs the model on the workers; it cannot be combined with --server")
    if args.mpp is not None:  # refused here, not by every slide's task after it (--mpp 0 failed each slide)
        from dannucnet.slides.mpp import validate_given_mpp

        validate_given_mpp(args.mpp)
    if not args.output.strip():
        raise InputError("-o is empty: give the folder for the outputs")
    slides = find_slides(args.slides)
    _refuse_clobbering(args, slides)
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise InputError("batch-slides needs Dask distributed: pip install 'dannucnet[cluster]'") from None
    bar = tqdm(total=len(slides), desc="slides", unit="slide", disable=args.quiet, file=sys.stderr,
               dynamic_ncols=True)
    failed = 0

    def progress(done: int, total: int, outcome) -> None:
        nonlocal failed
        failed += outcome.status == "failed"
        bar.n = done
        bar.set_postfix(failed=failed, refresh=False)
        bar.refresh()

    try:
        report = run_cohort(
            slides, args.output, model=args.model, device=args.device, mpp=args.mpp,
            options=segment_options(args), scheduler=args.scheduler, workers=args.workers,
            retries=args.retries, force=args.force, batch_size=args.batch_size, progress=progress,
            output_format=args.format, tta=args.tta, runtime=args.runtime,
            server=args.server, token=server_token(args), pipelined=args.pipelined,
        )
    finally:
        bar.close()
    print(report.table())
    if not report.model_trained:
        print(UNTRAINED_WARNING.format(name=report.model), file=sys.stderr)
    if not report.ok:
        print(f"{report.count('failed')} slide(s) failed: see the .failed.json records in {args.output}",
              file=sys.stderr)
        return 1
    return 0


def _refuse_clobbering(args: argparse.Namespace, slides: list) -> None:
    """No slide, slide list or model file may be one of the outputs or their .done/.failed records."""
    from pathlib import Path

    from dannucnet.cohort.inputs import output_path_for
    from dannucnet.cohort.records import DONE_SUFFIX, FAILED_SUFFIX
    from dannucnet.cohort.runner import OUTPUT_SUFFIX
    from dannucnet.outputs import Named, model_inputs, refuse_clobbering

    listing = Path(args.slides)
    inputs = [("slide", s) for s in slides] + [("slide list", listing)] * listing.is_file() + model_inputs(args.model)
    outputs: list[Named] = []
    for slide in slides:
        out = output_path_for(slide, Path(args.output), OUTPUT_SUFFIX[args.format])
        outputs += [("output", out), ("record", f"{out}{DONE_SUFFIX}"), ("record", f"{out}{FAILED_SUFFIX}")]
    refuse_clobbering(inputs, outputs)
