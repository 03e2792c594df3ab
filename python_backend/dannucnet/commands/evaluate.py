"""``dannucnet evaluate``: score a model on a labelled dataset, the way a user receives its output."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dannucnet.commands._common import add_model_arguments, load_predictor
from dannucnet.evaluate.poor import POOR_SHARE, poor_line
from dannucnet.pipeline import SegmentOptions

if TYPE_CHECKING:  # torch and the datasets load only when a command runs
    from dannucnet.engine.predictor import Predictor
    from dannucnet.evaluate.runner import EvaluationResult, ImageResult
    from dannucnet.formats.dataset import Dataset, Sample

NAME = "evaluate"
HELP = "score a model on an instance dataset folder (pixel F1/Jaccard, AJI, PQ, detection F1)"

# (key, header) of the summary printed at the end.
SUMMARY_COLUMNS = (
    ("f1", "F1"),
    ("jaccard", "JI"),
    ("precision", "Prec"),
    ("recall", "Rec"),
    ("aji", "AJI"),
    ("pq", "PQ"),
    ("det_f1", "DetF1"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="instance dataset folder (or the MoNuSeg folder)")
    p.add_argument("--split", help="split to score, e.g. kumar-test (default: kumar-test if defined, else all)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write per-image and mean scores as JSON")
    p.add_argument("--report", metavar="DIR", help="write report.md, evaluation.json and PNG plots into DIR")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the model card's)")
    p.add_argument("--min-area", type=float, default=SegmentOptions.min_area_um2, metavar="UM2",
                   help=f"drop nuclei smaller than this (µm², default {SegmentOptions.min_area_um2:g}, as segment)")
    p.add_argument("--mpp", type=float, metavar="UM",
                   help="score the dataset resampled to this pixel size (e.g. 0.5: the Kumar 40x images as a 20x scan)")
    p.add_argument("--poor-share", type=float, default=POOR_SHARE, metavar="SHARE",
                   help="also score the nuclei-poor 64 µm crops: those under this share of annotated nucleus "
                        "pixels, each segmented alone; pooled pixel precision and nuclei/mm² (default 0.08; 0: skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--update-card", action="store_true",
                   help="record the mean and per-organ scores under metrics.<split> (without --split: the data "
                        "folder's name) in the model folder's card (PyTorch runs only) and the headline scores per "
                        "runtime under metrics.<split>-runtimes")
    p.add_argument("--card-key", metavar="NAME",
                   help="with --update-card: record under metrics.NAME instead of the split's name (a split "
                        "such as 'val' says nothing of its set: e.g. nuinsseg-val)")


def _default_split(dataset: Dataset) -> str | None:
    return "kumar-test" if "kumar-test" in dataset.splits else None


def _pixel_size(samples: list[Sample]) -> float | None:
    """The split's pixel size for ``--model auto`` (one model scores the whole split): the median
    of the samples' (they share one in a dataset folder), ``None`` when none has one."""
    known = sorted(s.mpp for s in samples if s.mpp)
    return known[len(known) // 2] if known else None


def summary_table(result: EvaluationResult) -> str:
    """Plain-text table of overall, per-organ means for final polygons and the raw mask."""
    from dannucnet.tables import format_table

    def row(label: str, scores: dict[str, float]) -> list[str]:
        return [label[:28], *(f"{100 * scores.get(k, float('nan')):.2f}" for k, _ in SUMMARY_COLUMNS)]

    n = len(result.images)
    rows = [row(f"final polygons ({n})", result.mean("final")), row(f"raw mask ({n})", result.mean("raw"))]
    for organ, scores in result.by_organ("final").items():
        rows.append(row(f"  {organ} ({int(scores['n_images'])})", scores))
    header = ["", *(h for _, h in SUMMARY_COLUMNS)]
    return format_table(header, rows, rule=False, align="<" + ">" * len(SUMMARY_COLUMNS))


def run(args: argparse.Namespace) -> int:
    from dannucnet.atomic import write_text
    from dannucnet.errors import InputError, OutputError
    from dannucnet.evaluate.runner import evaluate_model
    from dannucnet.formats.dataset import load_dataset

    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise InputError(f"--threshold must lie between 0 and 1, not {args.threshold}")
    if args.card_key is not None and not (args.update_card and args.card_key.strip()):
        raise InputError("--card-key names the card's record: give it with --update-card, and not empty")
    if not 0.0 <= args.poor_share < 1.0:
        raise InputError(f"--poor-share must be at least 0 and below 1, not {args.poor_share}")
    _check_numbers(args)
    _check_outputs(args)
    dataset = load_dataset(args.data)
    split = args.split or _default_split(dataset)
    samples = dataset.select(split)
    _refuse_clobbering(args, dataset)
    if args.mpp is not None:
        from dannucnet.formats.dataset import resampled

        samples = resampled(samples, args.mpp)
    options = SegmentOptions(threshold=args.threshold, min_area_um2=args.min_area)
    predictor = load_predictor(args, mpp=_pixel_size(samples))  # --model auto: chosen for the split's pixel size
    if args.update_card:  # before the evaluation, not after it
        _check_writable("--update-card", _card_path(predictor))

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="evaluate", unit="image")

    def progress(image: ImageResult) -> None:
        if bar is not None:
            bar.set_postfix(F1=f"{image.final['f1']:.3f}", AJI=f"{image.final['aji']:.3f}")
            bar.update(1)

    started = time.perf_counter()
    try:
        result = evaluate_model(
            predictor, samples, threshold=args.threshold, progress=progress, split=split, options=options,
            poor_share=args.poor_share or None,
        )
    finally:
        if bar is not None:
            bar.close()
    result_seconds = time.perf_counter() - started

    at = f" resampled to {args.mpp:g} µm/px" if args.mpp is not None else ""
    print(f"model {result.model['name']} on {args.data} split {split or 'all'}{at}: {len(samples)} images, "
          f"{predictor.description}, {result_seconds:.0f} s")
    print(summary_table(result))
    if result.nuclei_poor is not None:
        print(poor_line(result.nuclei_poor))
    if args.json_out:
        out = Path(args.json_out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {out}: {exc}") from exc
        write_text(out, json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"scores written to {out}")
    if args.report:
        from dannucnet.evaluate.report import write_report

        print(f"report written to {write_report(result, args.report)}")
    if args.update_card:
        key = args.card_key or split or Path(args.data).resolve().name  # a whole set is named by its folder
        _record_in_card(predictor, result, key if args.mpp is None else f"{key}-{args.mpp:g}mpp", args.data)
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """The numbers a run would fail on only deep inside it (or not at all, scoring nonsense).

    ``--mpp``: the one plausibility rule of every ``--mpp`` (:func:`dannucnet.slides.mpp.validate_given_mpp`):
    inf and 1000 shrank the images to 1 px and scored 100.00, 1e-9 was a cv2.error. ``--min-area``: the
    bound every door has (``pipeline.options.MAX_MIN_AREA_UM2``: 10,000 µm² keeps no nucleus); inf was an
    OverflowError in the pipeline. (``--batch-size`` is its argument type's: ``_common.batch_size``.)
    """
    from dannucnet.errors import InputError
    from dannucnet.pipeline.options import MAX_MIN_AREA_UM2
    from dannucnet.slides.mpp import validate_given_mpp

    if args.mpp is not None:
        validate_given_mpp(args.mpp)
    if not (math.isfinite(args.min_area) and 0.0 <= args.min_area <= MAX_MIN_AREA_UM2):
        raise InputError(f"--min-area must be 0 to {MAX_MIN_AREA_UM2:g} µm² (a nucleus is 20-200 µm²), "
                         f"not {args.min_area:g}")


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --report can be written, checked before the evaluation rather than after all its work
    (and with a good --json and a bad --report, the JSON written but exit 2)."""
    if args.json_out:
        _check_writable("--json", Path(args.json_out))
    if args.report:
        _check_writable("--report", Path(args.report), folder=True)
        for name in REPORT_FILES:
            _check_writable("--report", Path(args.report) / name)


def _check_writable(label: str, path: Path, folder: bool = False) -> None:
    """That the file (``folder``: the folder) ``path`` can be written, without creating anything, so that a
    refused run leaves nothing behind: not a folder where a file goes (or a file where a folder goes), and
    the nearest folder that exists on the way, where the rest would be made, writable."""
    from dannucnet.errors import OutputError

    path = Path(os.path.abspath(path))
    if path.exists() and path.is_dir() != folder:
        want = "a folder" if folder else "a file name, e.g. scores.json"
        raise OutputError(f"cannot write {label} {path}: it is {'a folder' if path.is_dir() else 'a file'}; "
                          f"give {want}")
    if path.exists() and not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
        raise OutputError(f"cannot write {label} {path}: it is read-only; choose another")
    if path.exists() and folder:
        return
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {label} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {label} {path}: the folder {existing} is not writable; choose another")


def _card_path(predictor: Predictor) -> Path:
    """The model card --update-card writes: only a model given as a folder has one."""
    from dannucnet.errors import InputError
    from dannucnet.model.card import CARD_FILE

    card_path = Path(predictor.model.source) / CARD_FILE
    if not card_path.is_file():
        raise InputError(f"--update-card needs a model folder, not {predictor.model.source}")
    return card_path


#: Headline scores kept per runtime (metrics.<split>-runtimes): the ones the 0.3-point rule is about, and more.
RUNTIME_KEYS = ("f1", "aji", "pq", "det_f1", "precision", "recall", "n_pred")


def _record_in_card(predictor: Predictor, result: EvaluationResult, split: str, data: str) -> None:
    """Write the measured scores into the model card so they travel with the weights.

    ``metrics.<split>`` is the reference record and is written by PyTorch runs only (so an
    exported runtime can never silently replace it); every run also writes its headline
    scores under ``metrics.<split>-runtimes.<runtime> <precision>``.
    """
    from dannucnet.atomic import write_text

    card_path = _card_path(predictor)
    card = json.loads(card_path.read_text(encoding="utf-8"))
    summary = result.to_dict()
    final, raw = result.mean("final"), result.mean("raw")
    key = f"{predictor.runtime} {predictor.precision}"
    sides = list(result.model["windows"])  # the predictor's window sides, as evaluate_model recorded them
    if sides != [predictor.card.tile_size]:  # windows other than the training patch alone (the card's window)
        key += ", " + " or ".join(f"{side}²" for side in sides) + " windows"
    card.setdefault("metrics", {}).setdefault(f"{split}-runtimes", {})[key] = {
        "data": Path(data).name, "threshold": summary["threshold"], "tta": bool(predictor.tta),
        "device": str(predictor.device),  # no seconds: speed is benchmarks/bench_runtime.py's, on a quiet machine
        "windows": sides,
        "final_polygons": {k: final[k] for k in RUNTIME_KEYS if k in final},
        "raw_mask": {k: raw[k] for k in RUNTIME_KEYS if k in raw},
        **_poor_record(result),
    }
    if predictor.runtime != "torch":
        write_text(card_path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
        print(f"scores recorded in {card_path} under metrics.{split}-runtimes ({split} itself is PyTorch's)")
        return
    card["metrics"][split] = {
        "data": Path(data).name,
        "threshold": summary["threshold"],
        "windows": sides,
        "averaging": summary["averaging"],
        "final_polygons": result.mean("final"),
        "raw_mask": result.mean("raw"),
        "by_organ_final_polygons": result.by_organ("final"),
        **_poor_record(result),
    }
    write_text(card_path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    print(f"scores recorded in {card_path}")


def _poor_record(result: EvaluationResult) -> dict[str, object]:
    """The nuclei-poor crops' pooled scores for a card entry (nothing when they were not measured)."""
    return {} if result.nuclei_poor is None else {"nuclei_poor_crops": result.nuclei_poor}


#: What ``evaluate.report.write_report`` writes into ``--report DIR``.
REPORT_FILES = ("report.md", "evaluation.json", "organ_bars.png", "per_image_box.png")


def _refuse_clobbering(args: argparse.Namespace, dataset: Dataset) -> None:
    """Neither --json nor the report may replace a file of the dataset or the model, nor each other."""
    from dannucnet.outputs import model_inputs, refuse_clobbering

    data = [("--data", args.data), ("--data", Path(args.data) / "dataset.json")]
    for s in dataset.samples:
        data += [("--data", s.image_path), ("--data", s.label_path), ("--data", s.region_path)]
    report = [("--report", args.report)]
    if args.report:
        report += [("--report", Path(args.report) / name) for name in REPORT_FILES]
    refuse_clobbering(data + model_inputs(args.model), [("--json", args.json_out), *report])
