"""``dannucnet batch``: segment every image of a QuPath project and write the nuclei into it."""

from __future__ import annotations

import argparse
from pathlib import Path

from dannucnet.commands._common import add_model_arguments, add_segment_options, make_segmenter
from dannucnet.qupath.regions import DEFAULT_NUCLEUS_CLASSES

NAME = "batch"
HELP = "segment the images of a QuPath project headless and write the nuclei as detections (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Segments inside parent annotations (default: every area annotation whose class is not a nucleus "
        "class; the whole image where there is none). Writes class Nucleus detections named "
        "'dannucnet:<model>@<version>' and replaces only those. Each image's data is backed up "
        "(PROJECT/dannucnet-backups) before writing; PROJECT/dannucnet-batch.json records finished images, "
        "so a rerun skips them. Needs QuPath (PAQUO_QUPATH_DIR)."
    )
    parser.add_argument("project", help="project.qpproj (or its folder)")
    parser.add_argument("--images", nargs="+", metavar="NAME", help="only these images (name or entry id); default all")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--parents", nargs="+", metavar="CLASS", help="segment inside annotations of these classes only")
    where.add_argument("--whole-image", action="store_true", help="segment whole images, ignoring annotations")
    parser.add_argument("--nucleus-class", nargs="+", metavar="CLASS", default=list(DEFAULT_NUCLEUS_CLASSES),
                        help="annotation classes that are nuclei, never parents (default: Nucleus)")
    add_model_arguments(parser)
    add_segment_options(parser)
    parser.add_argument("--server", metavar="HOST:PORT", help="segment through a running 'dannucnet serve'")
    parser.add_argument("--token", help="server token (default: the DANNUCNET_TOKEN environment variable)")
    parser.add_argument("--mpp", type=float, metavar="UM_PER_PX", help="pixel size for images that have none")
    parser.add_argument("--force", action="store_true", help="redo images already done with this model version")


def run(args: argparse.Namespace) -> int:
    from dannucnet.qupath.batch import format_summary
    from dannucnet.qupath.project import open_project, project_file, run_batch
    from dannucnet.qupath.regions import RegionRules

    pfile = project_file(args.project)
    _refuse_clobbering(args, pfile)
    # One model for the whole run: the detections and the ledger are tagged with its name and version.
    # A server is asked first (a wrong address, token or model fails before QuPath starts, and costs no
    # model load); a model in this process loads only once QuPath has opened the project.
    segmenter = make_segmenter(args, one_model=True) if args.server else None
    open_project(pfile, mode="r")
    if segmenter is None:
        segmenter = make_segmenter(args, one_model=True)
    print(f"model {segmenter.model_name} {segmenter.model_version}")
    rows = run_batch(
        pfile, segmenter, images=args.images, parents=args.parents, whole_image=args.whole_image,
        rules=RegionRules(nucleus_classes=tuple(args.nucleus_class)), force=args.force, assume_mpp=args.mpp,
    )
    print(format_summary(rows))
    return 1 if any(r.status.startswith("failed") for r in rows) else 0


def _refuse_clobbering(args: argparse.Namespace, pfile: Path) -> None:
    """The ledger beside the project may not be the project, nor the model live in folders QuPath rewrites."""
    from dannucnet.outputs import model_inputs, refuse_clobbering
    from dannucnet.qupath.batch import BACKUP_DIR
    from dannucnet.qupath.ledger import ledger_path

    refuse_clobbering([("project", pfile), *model_inputs(args.model)], [("ledger", ledger_path(pfile))],
                      replaced=[("project", pfile.parent / "data"), ("project", pfile.parent / BACKUP_DIR)])
