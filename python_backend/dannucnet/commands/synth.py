"""`dannucnet synth`: write a synthetic H&E slide (pyramidal TIFF) with known nuclei.

Why a command: demos, benchmarks and bug reports need a slide of any size
that anyone can regenerate bit for bit from a seed, with its ground truth.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from dannucnet.errors import InputError

NAME = "synth"
HELP = "write a synthetic H&E slide (pyramidal TIFF) with known nuclei, optionally its label TIFF"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="output TIFF path (e.g. synthetic.tif)")
    parser.add_argument("--size", type=int, default=4096, help="width in pixels (and height unless --height) [4096]")
    parser.add_argument("--height", type=int, default=None, help="height in pixels [same as --size]")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same slide [0]")
    parser.add_argument("--mpp", type=float, default=0.25, help="pixel size in µm/px written to the file [0.25]")
    parser.add_argument("--tissue-fraction", type=float, default=1.0,
                        help="fraction of the slide covered by tissue; <1 leaves white glass around tissue blobs [1.0]")
    parser.add_argument("--density", type=float, default=2000.0, help="nuclei per mm² of tissue [2000]")
    parser.add_argument("--labels", type=Path, default=None,
                        help="also write ground-truth instance labels (int32 TIFF)")
    parser.add_argument("--compression", choices=["jpeg", "deflate", "zlib", "lzw", "none"], default="jpeg",
                        help="tile compression [jpeg]")
    parser.add_argument("--tile-size", type=int, default=256, help="TIFF tile size [256]")
    parser.add_argument("--flavour", choices=["generic", "ome", "svs"], default="generic",
                        help="file layout: generic pyramidal TIFF, OME-TIFF or Aperio SVS-like [generic]")


def run(args: argparse.Namespace) -> int:
    from dannucnet.slides.synthetic import write_synthetic_slide

    width = int(args.size)
    height = int(args.height) if args.height is not None else width
    if width <= 0 or height <= 0:
        raise InputError(f"--size/--height must be positive, got {width}x{height}")
    from dannucnet.outputs import refuse_clobbering

    refuse_clobbering([], [("output", args.output), ("--labels", args.labels)])
    t0 = time.perf_counter()
    slide = write_synthetic_slide(
        args.output,
        (width, height),
        seed=args.seed,
        mpp=args.mpp,
        tissue_fraction=args.tissue_fraction,
        density=args.density,
        labels_path=args.labels,
        tile_size=args.tile_size,
        compression=args.compression,
        flavour=args.flavour,
    )
    dt = time.perf_counter() - t0
    msg = f"wrote {slide.path} ({width}x{height} px, {slide.mpp} µm/px, {len(slide.nuclei)} nuclei) in {dt:.1f} s"
    if slide.labels_path is not None:
        msg += f"; labels: {slide.labels_path}"
    print(msg)
    return 0
