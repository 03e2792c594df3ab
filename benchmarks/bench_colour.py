"""Colour-normalisation candidates measured with a shipped model (issue 20).

For each candidate (a ColourReference variant on the card's reference) the model
segments (1) nuclei-poor 256² crops of NuInsSeg human spleen and GBM40 — crops
whose annotated nucleus share is below ``--poor-share`` — each crop as its own
chunk, as a fat or stroma chunk of a slide is; and (2) the whole NuInsSeg and
GBM40 images. Reported: pooled pixel precision and predicted / true nuclei per
mm² on the poor crops; mean pixel F1, AJI, PQ on the whole sets.

    PYTHONPATH=python_backend python benchmarks/bench_colour.py --runtime openvino
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from dannucnet.engine import Predictor
from dannucnet.engine.colour import ColourReference, lab_stats, normalise_colour
from dannucnet.evaluate.poor import PoorCrop, poor_crops, score_poor_crops
from dannucnet.evaluate.runner import evaluate_model
from dannucnet.formats.dataset import load_dataset
from dannucnet.model import load_model
from dannucnet.pipeline import SegmentOptions, segment_region
from dannucnet.slides.nuclei_free import make_fat_like, make_stroma_like

SETS = {"nuinsseg": "nuinsseg-human-spleen", "gbm40": "gbm40"}
DATA = "../shared/data"


def candidates(ref: ColourReference) -> dict[str, ColourReference | None]:
    base = dataclasses.replace(ref, max_scale=2.0, max_shift=None, min_dark_share=0.0)
    return {
        "a-today": base,
        "b-clamp": dataclasses.replace(base, max_scale=1.25, max_shift=10.0),
        "b2-clamp-loose": dataclasses.replace(base, max_scale=1.5, max_shift=20.0),
        "b3-scale-only": dataclasses.replace(base, max_scale=1.25),
        "b4-scale-1.5": dataclasses.replace(base, max_scale=1.5),
        "b5-mean-only": dataclasses.replace(base, max_scale=1.0),
        "f-scale+gate": dataclasses.replace(base, max_scale=1.25, min_dark_share=0.01),
        "c-gate": dataclasses.replace(base, min_dark_share=0.05),
        "bc-clamp+gate": dataclasses.replace(base, max_scale=1.25, max_shift=10.0, min_dark_share=0.05),
        "d-none": None,
        "e-image-stats": base,  # poor crops normalised with their whole 512² image's statistics
    }


def all_poor_crops(poor_share: float) -> tuple[list[PoorCrop], dict[str, tuple]]:
    """Both sets' nuclei-poor crops, and each image's colour statistics (for ``e-image-stats``)."""
    crops, stats = [], {}
    for name, root in SETS.items():
        samples = load_dataset(f"{DATA}/{root}").samples
        crops += crops_of(samples, name, poor_share)
        stats.update({s.stem: lab_stats(s.load_image())[:2] for s in samples})
    return crops, stats


def crops_of(samples, name: str, poor_share: float) -> list[PoorCrop]:
    """The nuclei-poor crops of these samples (``dannucnet.evaluate.poor``), keyed by set name."""
    return [dataclasses.replace(c, key=f"{name}/{c.key}") for c in poor_crops(samples, poor_share)]


def score_poor(predictor: Predictor, crops: list[PoorCrop], options: SegmentOptions,
               image_stats: dict[str, tuple] | None = None) -> dict[str, float]:
    """Pooled pixel precision and nuclei/mm² of the crops, each segmented alone. ``image_stats`` (stem →
    its whole image's colour statistics): normalise each crop with them, as if they came from the slide."""
    if image_stats is None:
        return score_poor_crops(predictor, crops, options).to_dict()
    saved = predictor.colour
    normalised = [dataclasses.replace(c, rgb=normalise_colour(c.rgb, saved, image_stats[c.stem])) for c in crops]
    predictor.colour = None
    try:
        return score_poor_crops(predictor, normalised, options).to_dict()
    finally:
        predictor.colour = saved


def score_free(predictor: Predictor, options: SegmentOptions, n: int = 4, size: int = 512) -> dict[str, float]:
    """Nuclei per mm² the model invents on synthetic fat and stroma (eosin only), 0.25 µm/px."""
    out = {}
    for make in (make_fat_like, make_stroma_like):
        found = sum(len(segment_region(predictor, make(size, seed), mpp=0.25, options=options).nuclei)
                    for seed in range(n))
        key = make.__name__.removeprefix("make_").removesuffix("_like") + "_per_mm2"
        out[key] = found / (n * (size * 0.25e-3) ** 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/dannucnet-monuseg")
    ap.add_argument("--runtime", default="openvino")
    ap.add_argument("--poor-share", type=float, default=0.08)
    ap.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    ap.add_argument("--parts", default="poor,free,nuinsseg,gbm40", help="comma-separated: poor,free,nuinsseg,gbm40")
    ap.add_argument("--data-root", default=DATA)
    args = ap.parse_args()
    globals()["DATA"] = args.data_root
    parts = args.parts.split(",")
    predictor = Predictor(load_model(args.model), device="cpu", runtime=args.runtime)
    options = SegmentOptions()
    crops, stats = all_poor_crops(args.poor_share) if "poor" in parts else ([], {})
    for name, ref in candidates(predictor.colour).items():
        if args.only and name not in args.only:
            continue
        predictor.colour = ref
        t = time.perf_counter()
        row: dict[str, object] = {}
        if "poor" in parts:
            row["poor"] = score_poor(predictor, crops, options, stats if name == "e-image-stats" else None)
        if "free" in parts and name != "e-image-stats":
            row["free"] = score_free(predictor, options)
        for set_name, root in SETS.items():
            if set_name in parts and name != "e-image-stats":  # whole images: e is a-today
                res = evaluate_model(predictor, load_dataset(f"{DATA}/{root}").samples, options=options)
                row[set_name] = {k: round(v, 4) for k, v in res.mean("final").items()
                                 if k in ("f1", "aji", "pq", "precision", "recall")}
        row["seconds"] = round(time.perf_counter() - t, 1)
        print(name, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
