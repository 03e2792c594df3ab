"""``dannucnet models``: the installed models, read from their cards (nothing is downloaded)."""

from __future__ import annotations

import argparse
import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dannucnet.catalogue import CatalogueEntry

NAME = "models"
HELP = "list the installed models (name, version, µm/px, base filters, Kumar-test scores, licence, folder)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--for-mpp", type=float, metavar="UM",
                   help="also say which model --model auto (and auto-fast) picks for an image of this pixel size, "
                        "and why")


def run(args: argparse.Namespace) -> int:
    from dannucnet.catalogue import AUTO, AUTO_FAST, choose_model
    from dannucnet.errors import InputError
    from dannucnet.model.registry import list_models, search_path
    from dannucnet.slides.mpp import MPP_MAX, MPP_MIN, is_plausible

    if args.for_mpp is not None and not is_plausible(args.for_mpp):  # inf answered as "unknown pixel size"
        raise InputError(f"--for-mpp must be a pixel size from {MPP_MIN:g} to {MPP_MAX:g} µm/px, not {args.for_mpp}")
    entries = list_models()
    if args.json:
        document: dict = {"models": [e.to_dict() for e in entries]}
        if args.for_mpp is not None:
            for key in (AUTO, AUTO_FAST):
                chosen, reason = choose_model(args.for_mpp, entries, fast=key == AUTO_FAST)
                document[key] = {"mpp": args.for_mpp, "model": chosen.name if chosen else None, "reason": reason}
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return 0
    print(table(entries))
    if not entries:
        print("no model installed in " + ", ".join(str(p) for p in search_path())
              + " (the built-in 'untrained' network still runs)")
    if args.for_mpp is not None:
        for key in (AUTO, AUTO_FAST):
            _, reason = choose_model(args.for_mpp, entries, fast=key == AUTO_FAST)
            print(f"--model {key}: {reason}")
    return 0


def table(entries: list[CatalogueEntry]) -> str:
    """One line per model; FILTERS is the network's base width (16: a lite model, what auto-fast prefers);
    scores are the final polygons' pixel F1 / AJI / PQ in per cent."""
    from dannucnet.tables import format_table

    rows = []
    for e in entries:
        m = e.metrics
        scores = "/".join(f"{100 * m[k]:.1f}" for k in ("f1", "aji", "pq") if k in m) or "-"
        if m.get("split") not in (None, "kumar-test"):
            scores += f" ({m['split']})"
        state = "" if e.usable else (" (untrained)" if not e.trained else " (no weights)")
        short = re.search(r"\(([^)]*)\)", e.licence)  # "... data (CC BY-NC-SA 4.0): ..." → the licence's name
        licence = (short.group(1) if short else e.licence[:40]) or "-"
        rows.append((e.name + state, e.version, f"{e.mpp:g}", str(e.base_filters), scores, licence, e.path))
    return format_table(("NAME", "VERSION", "µm/px", "FILTERS", "F1/AJI/PQ", "LICENCE", "PATH"), rows, rule=False)
