"""Issue 20's decision table: models side by side on data none of them was trained on.

For each ``--model``: the NuInsSeg human-spleen ``val`` split (every third image,
never trained on; see ``formats/nuinsseg.heldout_splits``) — mean pixel F1, AJI,
PQ, precision and recall of the final polygons, and the pooled pixel precision
on its nuclei-poor 256² crops (annotated nucleus share under ``--poor-share``,
each crop segmented as its own chunk, as a fat or stroma chunk of a slide is);
nuclei invented per mm² on synthetic fat and stroma. With ``--external`` the
same on GBM40 (the external test: never trained or decided on; run it once per
decided model). The Kumar test is ``dannucnet evaluate``'s.

    PYTHONPATH=python_backend python benchmarks/bench_heldout.py \\
        --model models/dannucnet-monuseg --model runs/candidate
"""

from __future__ import annotations

import argparse
import json
import time

from bench_colour import score_free
from dannucnet.engine import Predictor
from dannucnet.evaluate.runner import evaluate_model
from dannucnet.formats.dataset import load_dataset
from dannucnet.model import load_model
from dannucnet.pipeline import SegmentOptions

KEYS = ("f1", "aji", "pq", "precision", "recall")


def score_set(predictor: Predictor, samples, poor_share: float, options: SegmentOptions) -> dict:
    res = evaluate_model(predictor, samples, options=options, poor_share=poor_share)  # the poor crops too
    row = {k: round(v, 4) for k, v in res.mean("final").items() if k in KEYS}
    poor = res.nuclei_poor or {}
    row["poor_crops"] = poor.get("crops", 0)
    if row["poor_crops"]:
        row["poor_precision"] = round(poor["pixel_precision"], 4)
        row["poor_pred_per_mm2"] = round(poor["found_per_mm2"], 1)
        row["poor_true_per_mm2"] = round(poor["annotated_per_mm2"], 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model name or folder; repeatable")
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--poor-share", type=float, default=0.08)
    ap.add_argument("--external", action="store_true", help="also GBM40, the external test (once per decision)")
    args = ap.parse_args()
    sets = {"nuinsseg-val": load_dataset(f"{args.data_root}/nuinsseg-human-spleen").select("val")}
    if args.external:
        sets["gbm40"] = load_dataset(f"{args.data_root}/gbm40").samples
    options = SegmentOptions()
    for model in args.model:
        predictor = Predictor(load_model(model), device="cpu", runtime=args.runtime)
        started = time.perf_counter()
        row: dict[str, object] = {"model": f"{predictor.card.name} {predictor.card.version} ({model})"}
        for name, samples in sets.items():
            row[name] = score_set(predictor, samples, args.poor_share, options)
        row["free_per_mm2"] = {k: round(v, 1) for k, v in score_free(predictor, options).items()}
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
