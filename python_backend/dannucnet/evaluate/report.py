"""Markdown + PNG report of an evaluation, set beside the published numbers.

The comparison rows are kept here, with their sources, so every report says
plainly what it is compared with and how far the comparison goes: the paper
trained on PanNuke and tested on the Kumar test images with *pixel* metrics
only (its "JI" is a smoothed pixel Jaccard, and its averages dropped F1 = 0
images), so only F1 and JI can be set side by side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from dannucnet.atomic import atomic_path, write_text
from dannucnet.errors import OutputError
from dannucnet.evaluate.runner import EvaluationResult
from dannucnet.formats.kumar_split import KUMAR_TEST_DIFF, KUMAR_TEST_SAME


@dataclass(frozen=True)
class Reference:
    """Published scores (percent) of another method, with where they come from."""

    label: str
    source: str
    scores: dict[str, float]
    approximate: bool = False


PAPER_KUMAR = Reference(
    label="DAN-NucNet paper (Table 3, Kumar test)",
    source="paper Table 3; trained on PanNuke; pixel metrics, F1 = 0 images dropped",
    scores={"f1": 81.11, "jaccard": 69.18},
)
QUPATH_WATERSHED = Reference(
    label="QuPath WatershedCellDetection (defaults)",
    source="issue 3 reference: brightfield defaults on held-out real H&E",
    scores={"f1": 70.0, "aji": 48.0},
    approximate=True,
)
HOVERNET_KUMAR = Reference(
    label="HoVer-Net (Kumar test)",
    source="vqdang/hover_net README",
    scores={"f1": 82.6, "aji": 64.1, "pq": 59.7},
)
REFERENCES = (PAPER_KUMAR, QUPATH_WATERSHED, HOVERNET_KUMAR)

# (key, column header) of the main tables; scores are shown in percent like the paper.
COLUMNS = (
    ("f1", "F1"),
    ("jaccard", "JI"),
    ("precision", "Prec."),
    ("recall", "Rec."),
    ("aji", "AJI"),
    ("pq", "PQ"),
    ("dq", "DQ"),
    ("sq", "SQ"),
    ("det_f1", "Det. F1"),
)
BOX_METRICS = (("f1", "F1"), ("jaccard", "JI"), ("aji", "AJI"), ("pq", "PQ"))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _score_cells(scores: dict[str, float]) -> list[str]:
    return [_pct(scores.get(key)) for key, _ in COLUMNS]


def _reference_cells(ref: Reference) -> list[str]:
    cells = []
    for key, _ in COLUMNS:
        value = ref.scores.get(key)
        if value is None:
            cells.append("—")
        else:
            cells.append(f"≈ {value:.0f}" if ref.approximate else f"{value:.2f}")
    return cells


def _groups(result: EvaluationResult) -> list[tuple[str, list[str]]]:
    """Kumar same-/different-organ subsets when the evaluated images include them."""
    stems = {r.stem for r in result.images}
    groups = []
    for name, members in (("same organ", KUMAR_TEST_SAME), ("different organ", KUMAR_TEST_DIFF)):
        chosen = [s for s in members if s in stems]
        if chosen and len(chosen) < len(stems):
            groups.append((name, chosen))
    return groups


def render_markdown(result: EvaluationResult, plots: Sequence[str] = ()) -> str:
    """The report text; ``plots`` are image file names (relative to the report) to embed."""
    model = result.model
    split = result.split or "all"
    n = len(result.images)
    lines = [
        f"# Evaluation of `{model.get('name', '?')}` (version {model.get('version', '?')}) on split `{split}`",
        "",
        f"{n} images; threshold {result.threshold:g}; device {model.get('device') or 'n/a'}. "
        "Scores in percent, macro mean over images (images with F1 = 0 included). "
        "**final** = the polygons a user receives, rasterised back at pixel centres; "
        "**raw** = probability > threshold, connected components as instances (the paper's output).",
        "",
    ]
    if not model.get("trained", True):
        lines += ["> **Untrained model**: these numbers only show that the tooling runs.", ""]
    if split != "kumar-test":
        lines += [
            f"> The published rows are on the Kumar test split (14 images); this run is on `{split}`, "
            "so the comparison is indicative only.",
            "",
        ]
    header = ["method", *(h for _, h in COLUMNS)]
    rows = [[f"{ref.label} [{i + 1}]", *_reference_cells(ref)] for i, ref in enumerate(REFERENCES)]
    rows.append([f"**this model, final polygons** ({n} images)", *_score_cells(result.mean("final"))])
    rows.append([f"this model, raw mask ({n} images)", *_score_cells(result.mean("raw"))])
    for name, stems in _groups(result):
        rows.append([f"this model, final, {name} ({len(stems)} images)", *_score_cells(result.mean("final", stems))])
    lines += ["## Overall, beside the published numbers", "", *_table(header, rows), ""]
    lines += [f"[{i + 1}] {ref.source}." for i, ref in enumerate(REFERENCES)]
    lines += [
        "",
        "The paper's JI is a pixel Jaccard with smoothing 100, its precision/recall columns are swapped "
        "in its script, and its averages leave out images with F1 = 0; ours are plain and keep every image.",
        "",
    ]
    if result.nuclei_poor is not None:
        from dannucnet.evaluate.poor import poor_line

        lines += ["## Where nuclei are few", "", poor_line(result.nuclei_poor) + ".", "",
                  "Nuclei the annotators left out count as false here: compare models on one set.", ""]

    organ_rows = []
    finals, raws = result.by_organ("final"), result.by_organ("raw")
    for organ in result.organs:
        f, r = finals[organ], raws[organ]
        organ_rows.append(
            [
                organ,
                str(int(f["n_images"])),
                *(_pct(f.get(k)) for k in ("f1", "jaccard", "precision", "recall", "aji", "pq", "det_f1")),
                _pct(r.get("f1")),
                _pct(r.get("aji")),
            ]
        )
    lines += [
        "## Per organ (final polygons; raw mask F1/AJI for comparison)",
        "",
        *_table(
            ["organ", "images", "F1", "JI", "Prec.", "Rec.", "AJI", "PQ", "Det. F1", "raw F1", "raw AJI"], organ_rows
        ),
        "",
    ]

    image_rows = []
    for img in result.images:
        f = img.final
        image_rows.append(
            [
                img.stem,
                img.organ or "unknown",
                *(_pct(f.get(k)) for k in ("f1", "jaccard", "aji", "pq", "det_f1")),
                str(int(f.get("n_true", 0))),
                str(int(f.get("n_pred", 0))),
                _pct(img.raw.get("f1")),
                f"{img.seconds:.1f}",
            ]
        )
    lines += [
        "## Per image (final polygons)",
        "",
        *_table(
            ["image", "organ", "F1", "JI", "AJI", "PQ", "Det. F1", "true nuclei", "found", "raw F1", "s"],
            image_rows,
        ),
        "",
    ]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def plot_organ_bars(result: EvaluationResult, path: Path) -> Path:
    """Per-organ F1 and JI bars (final polygons) against the paper's overall Kumar values."""
    plt = _pyplot()
    finals = result.by_organ("final")
    organs = result.organs
    x = list(range(len(organs)))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(organs) + 2), 4.6))
    ax.bar([i - width / 2 for i in x], [100 * finals[o]["f1"] for o in organs], width, label="F1 (this model)")
    ax.bar([i + width / 2 for i in x], [100 * finals[o]["jaccard"] for o in organs], width, label="JI (this model)")
    ax.axhline(PAPER_KUMAR.scores["f1"], color="C0", linestyle="--", linewidth=1, label="F1, paper (Kumar, all)")
    ax.axhline(PAPER_KUMAR.scores["jaccard"], color="C1", linestyle="--", linewidth=1, label="JI, paper (Kumar, all)")
    ax.set_xticks(x, organs, rotation=20)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score (%)")
    ax.set_title(f"Per-organ pixel scores, split {result.split or 'all'}")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def plot_per_image_box(result: EvaluationResult, path: Path) -> Path:
    """Box plot of per-image F1, JI, AJI and PQ, final polygons beside the raw mask (cf. the paper's Fig. 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    data, positions, colours = [], [], []
    for i, (key, _) in enumerate(BOX_METRICS):
        for j, source in enumerate(("final", "raw")):
            data.append([100 * getattr(img, source)[key] for img in result.images])
            positions.append(3 * i + j)
            colours.append("C0" if source == "final" else "C7")
    box = ax.boxplot(data, positions=positions, widths=0.8, patch_artist=True, showmeans=True)
    for patch, colour in zip(box["boxes"], colours):
        patch.set_facecolor(colour)
        patch.set_alpha(0.6)
    ax.set_xticks([3 * i + 0.5 for i in range(len(BOX_METRICS))], [name for _, name in BOX_METRICS])
    ax.set_ylim(0, 100)
    ax.set_ylabel("per-image score (%)")
    ax.set_title(f"Per-image scores, {len(result.images)} images (blue: final polygons, grey: raw mask)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _pyplot() -> ModuleType:  # matplotlib.pyplot; matplotlib is optional
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OutputError("plots need matplotlib: pip install 'dannucnet[report]'") from exc
    return plt


def write_report(result: EvaluationResult, directory: str | os.PathLike[str], plots: bool = True) -> Path:
    """Write ``report.md``, ``evaluation.json`` and (optionally) the PNG plots; return the report path."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        names: list[str] = []
        if plots and result.images:
            names.append(plot_organ_bars(result, directory / "organ_bars.png").name)
            names.append(plot_per_image_box(result, directory / "per_image_box.png").name)
        write_text(directory / "evaluation.json", json.dumps(result.to_dict(), indent=2) + "\n")
        report = write_text(directory / "report.md", render_markdown(result, names))
    except OSError as exc:
        raise OutputError(f"cannot write the report into {directory}: {exc}") from exc
    return report
