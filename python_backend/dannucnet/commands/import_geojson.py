"""``dannucnet import-geojson``: bring ``dannucnet segment`` output of a slide into its QuPath entry."""

from __future__ import annotations

import argparse

NAME = "import-geojson"
HELP = ("write nuclei from a dannucnet GeoJSON file into one image of a QuPath project "
        "(replacing earlier dannucnet nuclei)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Only detections an earlier dannucnet run wrote (named 'dannucnet:...') are replaced; "
        "annotations and other detections stay. The image's data folder is backed up first "
        "(PROJECT/dannucnet-backups). A file without polygon nuclei is refused: it would only delete "
        "the earlier ones. Needs QuPath (PAQUO_QUPATH_DIR)."
    )
    parser.add_argument("project", help="project.qpproj (or its folder)")
    parser.add_argument("image", help="image name (as QuPath shows it) or entry id")
    parser.add_argument("geojson", help="GeoJSON (.geojson or .geojson.gz) written by 'dannucnet segment'")
    parser.add_argument("--force", action="store_true",
                        help="import even when the file names another image or nuclei fall outside the image")
    parser.add_argument("--no-backup", action="store_true", help="do not back up the image's data first")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dannucnet.errors import InputError
    from dannucnet.outputs import refuse_clobbering
    from dannucnet.qupath.batch import BACKUP_DIR
    from dannucnet.qupath.import_geojson import read_nuclei
    from dannucnet.qupath.project import import_nuclei, project_file

    pfile = project_file(args.project)
    # QuPath rewrites the project file and the image's data folder; backups are rotated
    refuse_clobbering([("geojson", args.geojson)], [("project", pfile)],
                      replaced=[("project", pfile.parent / "data"), ("project", pfile.parent / BACKUP_DIR)])
    data = read_nuclei(Path(args.geojson))
    if not data.nuclei:  # importing would only delete the image's earlier dannucnet nuclei
        skipped = "; ".join(f"{rule}: {n}" for rule, n in sorted(data.counts.items())) or "no features"
        raise InputError(f"{args.geojson} holds no nuclei to import ({skipped}); "
                         "give a file with polygon nuclei written by 'dannucnet segment' (nothing was changed)")
    name, removed, added = import_nuclei(args.project, args.image, data, force=args.force, backup=not args.no_backup)
    for rule, n in sorted(data.counts.items()):
        print(f"  {rule}: {n}")
    print(f"{name}: {added} nuclei imported, {removed} earlier dannucnet nuclei replaced")
    return 0
