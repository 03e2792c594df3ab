"""``dannucnet export-training``: QuPath annotations → a dataset folder for ``dannucnet train``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dannucnet.qupath.regions import DEFAULT_MAX_NUCLEUS_UM2, DEFAULT_NUCLEUS_CLASSES

if TYPE_CHECKING:
    from paquo.projects import QuPathProject

NAME = "export-training"
HELP = "export annotated nuclei of a QuPath project as a training dataset (images, instance labels, region masks)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Rules: a nucleus is an annotation/detection of a --nucleus-class, or an unclassified closed shape "
        "of at most --max-nucleus-area µm²; every other area annotation (or those of --region-class) is a "
        "densely annotated training region. Pixels outside regions are ignored by training. "
        "See docs/qupath-loop.md. Needs QuPath (PAQUO_QUPATH_DIR)."
    )
    parser.add_argument("project", help="project.qpproj (or its folder)")
    parser.add_argument("-o", "--output", required=True,
                        help="dataset folder to write, outside the project (read by: dannucnet train --data DIR)")
    parser.add_argument("--images", nargs="+", metavar="NAME", help="only these images (name or entry id); default all")
    parser.add_argument("--region-class", nargs="+", metavar="CLASS",
                        help="classes of the training-region annotations, e.g. 'Training region'; "
                             "default: every area annotation that is not a nucleus")
    parser.add_argument("--nucleus-class", nargs="+", metavar="CLASS", default=list(DEFAULT_NUCLEUS_CLASSES),
                        help="classes that are nuclei (default: Nucleus)")
    parser.add_argument("--max-nucleus-area", type=float, default=DEFAULT_MAX_NUCLEUS_UM2, metavar="UM2",
                        help="an unclassified closed shape up to this area (µm²) is a nucleus (default: %(default)s)")
    parser.add_argument("--patch-size", type=int, metavar="PX",
                        help="cut regions into PX×PX patches (at the output pixel size); default: whole regions")
    parser.add_argument("--mpp", type=float, metavar="UM_PER_PX",
                        help="resample to this pixel size (the model's, e.g. 0.25); default: keep each image's own")
    parser.add_argument("--assume-mpp", type=float, metavar="UM_PER_PX",
                        help="pixel size for images that have none (otherwise they are skipped)")
    parser.add_argument("--keep-empty-regions", action="store_true",
                        help="export regions without any nucleus as pure background (default: skip them)")
    parser.add_argument("--include-dannucnet-detections", action="store_true",
                        help="count nuclei written by 'dannucnet batch' as ground truth (e.g. after correcting them)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of regions in the 'val' split (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dannucnet.errors import InputError
    from dannucnet.outputs import refuse_clobbering, refuse_inside
    from dannucnet.qupath.batch import BACKUP_DIR
    from dannucnet.qupath.export import ExportOptions, export_training
    from dannucnet.qupath.project import iter_entry_data, open_project, project_file
    from dannucnet.qupath.regions import RegionRules

    out = Path(args.output)
    if out.name in ("", ".."):  # ".", "/", "": no name to put the dataset (and its .partial) under
        raise InputError(f"-o needs a folder name for the dataset, got {args.output!r}; e.g. -o training-data")
    pfile = project_file(args.project)
    written = [("-o", out), ("-o", out.with_name(out.name + ".partial"))]
    # the project folder and what QuPath keeps there (named too, in case they are links elsewhere)
    project = [("project", pfile), ("project", pfile.parent),
               *(("project", pfile.parent / sub) for sub in ("data", BACKUP_DIR, "classifiers", "scripts"))]
    refuse_inside(project[1:], written)
    # the writer fills OUT.partial, and --overwrite replaces OUT: neither may hold the project
    refuse_clobbering(project, [("-o", out)], replaced=written)
    qp = open_project(pfile, mode="r")
    images = [("image", path) for path in _image_files(qp)]
    refuse_clobbering(images, [("-o", out)], replaced=written)
    rules = RegionRules(
        nucleus_classes=tuple(args.nucleus_class),
        region_classes=tuple(args.region_class) if args.region_class else None,
        max_nucleus_um2=args.max_nucleus_area,
        include_own_detections=args.include_dannucnet_detections,
        keep_empty_regions=args.keep_empty_regions,
    )
    options = ExportOptions(
        rules=rules, target_mpp=args.mpp, assume_mpp=args.assume_mpp,
        patch_size=args.patch_size, val_fraction=args.val_fraction,
    )
    entries = iter_entry_data(qp, args.images, own_detections=args.include_dannucnet_detections)
    report = export_training(entries, args.output, options, project=pfile.parent.name, overwrite=args.overwrite,
                             progress=print)
    print(report.format())
    print(f"wrote {report.output}; train with: dannucnet train --data {report.output}")
    return 0


def _image_files(qp: QuPathProject) -> list[str]:
    """Local files behind the project's images (``file:`` URIs)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    uris = (urlparse(str(entry.uri)) for entry in qp.images)
    return [url2pathname(u.path) for u in uris if u.scheme == "file"]
