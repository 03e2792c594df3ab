"""Windows with nothing to find, run or skipped, end to end: glass, and beyond an annotation (issue 18).

Chunks with no tissue at all were already skipped (``plan_slide``, from the slide's tissue
mask), but every chunk at the edge of the tissue ran all its windows, glass included. Now
a window whose every pixel is glass (``tiling.GlassMap``: brighter than the colour
step's glass level in all three channels) is blended as zeros without running the
network. Both run here in one process, taking turns on the same synthetic slide with
white glass around blobs of tissue (``--tissue``, the share of the slide that is tissue),
through the in-process step (what ``dannucnet segment`` runs): MP/s end to end, network
seconds, network pixels per slide pixel, chunks and nuclei (which must match).

``--roi`` segments only inside a region of interest, as a QuPath annotation would: an
ellipse inscribed in the slide (``--roi ellipse``) or a band a fifth of the slide wide
along its diagonal (``--roi band``, a tumour region drawn inside tissue). Windows farther
from it than a chunk margin (32 µm) cannot change a nucleus it keeps
(``chunk_nuclei.clip_reach``) and are skipped too. Use ``--tissue 1`` to see that part alone.

    PYTHONPATH=python_backend python benchmarks/bench_glass.py --side 4096 --tissue 0.35
    PYTHONPATH=python_backend python benchmarks/bench_glass.py --side 4096 --tissue 1 --roi band
    PYTHONPATH=python_backend python benchmarks/bench_glass.py --mpp 0.25 --model dannucnet-monuseg
"""

from __future__ import annotations

import argparse

from bench_chunk_plan import compare_steps, header
from bench_runtime import synthetic_slide, turn_arguments, work_folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    turn_arguments(p, side=4096)
    p.add_argument("--mpp", type=float, default=0.5, help="the slide's µm/px (default 0.5: a 20× slide)")
    p.add_argument("--tissue", type=float, default=0.35, help="share of the slide that is tissue (default 0.35)")
    p.add_argument("--roi", choices=["ellipse", "band"],
                   help="segment only inside an inscribed ellipse or a diagonal band a fifth of the slide wide")
    args = p.parse_args()

    import shapely
    from shapely import affinity

    from dannucnet.engine import Predictor
    from dannucnet.model import load_model
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.pipeline.slide import InProcessStep

    work = work_folder(args.workdir, "bench_glass_")
    slide = synthetic_slide(work, f"slide_{args.mpp:g}_{args.side}_{args.tissue:g}.tif", args.side, args.mpp,
                            tissue=args.tissue)
    loaded = load_model(args.model)
    arms = {}
    for skip in (False, True):
        predictor = Predictor(loaded, device="cpu", runtime=args.runtime)
        predictor.skip_glass = skip
        arms["skipped" if skip else "every window run"] = (InProcessStep(predictor), SegmentOptions())
    side, rois = args.side, None
    if args.roi == "ellipse":
        rois = [affinity.scale(shapely.Point(side / 2, side / 2).buffer(side / 2, quad_segs=32), 0.95, 0.7)]
    elif args.roi == "band":
        rois = [shapely.LineString([(0.1 * side, 0.9 * side), (0.9 * side, 0.1 * side)]).buffer(side / 10)]
    print(header(loaded.card, predictor.description, args) + f", {args.tissue:g} of it tissue"
          + (f", inside the {args.roi} ({rois[0].area / side**2:.0%} of the slide)" if rois else ""))
    compare_steps(arms, slide, args.repeats, "windows with nothing to find", rois)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
