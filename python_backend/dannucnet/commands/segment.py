"""``dannucnet segment``: an image or slide on this machine → QuPath GeoJSON (+ overlay)."""

from __future__ import annotations

import argparse
import sys

from dannucnet.commands._common import (
    add_model_arguments,
    add_segment_options,
    add_server_arguments,
    chunk_progress,
    make_segmenter,
)

NAME = "segment"
HELP = "segment nuclei in an H&E image or whole slide and write QuPath GeoJSON"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="SVS, pyramidal TIFF, OME-TIFF, or a plain PNG/JPEG/TIFF image")
    p.add_argument("-o", "--output", required=True,
                   help="output .geojson or .geojson.gz (QuPath), or .parquet (GeoParquet, needs pyarrow)")
    add_model_arguments(p)
    p.add_argument("--region", metavar="X,Y,W,H", help="only this rectangle (full-resolution pixels)")
    p.add_argument("--mpp", type=float, help="pixel size in µm/px (overrides or supplies the image's)")
    add_segment_options(p)
    add_server_arguments(p)
    p.add_argument("--overlay", metavar="PNG", help="also write a PNG with the nucleus outlines")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dannucnet.errors import InputError
    from dannucnet.jobs.segment_file import parse_region, segment_to_file, writer_for
    from dannucnet.outputs import model_inputs, refuse_clobbering

    refuse_clobbering([("input", args.input), *model_inputs(args.model)],
                      [("-o", args.output), ("--overlay", args.overlay)])
    if args.overlay and not args.overlay.lower().endswith(".png"):  # it is always a PNG, whatever its name
        raise InputError(f"--overlay {args.overlay}: the overlay is a PNG; give a name ending in .png")
    region = parse_region(args.region) if args.region else None
    segmenter = make_segmenter(args)
    progress, close = chunk_progress("segmenting", enabled=not args.quiet)
    try:
        summary = segment_to_file(
            segmenter, args.input, args.output, writer_for(args.output), mpp=args.mpp, region=region,
            overlay_path=args.overlay, progress=progress,
        )
    finally:
        close()
    print(
        f"{summary.nuclei} nuclei in {summary.width} x {summary.height} px at {summary.mpp:g} µm/px "
        f"({summary.chunks} chunks with tissue) "
        f"in {summary.seconds:.1f} s on {summary.device}"
    )
    print(f"wrote {summary.output}")
    if summary.overlay:
        print(f"wrote {summary.overlay}")
    if not summary.model_trained:
        print("note: the model is untrained; these nuclei are not meaningful", file=sys.stderr)
    return 0
