"""What ``--model auto`` and ``--model auto-fast`` choose from, and the choice: no torch here.

A :class:`CatalogueEntry` is one installed model as its card describes it (``model.registry.list_models``
reads the cards; a server's ``ListModels`` answer gives the same fields), and :func:`choose_model` picks
one for an image's pixel size. It lives apart from the registry, which loads networks, so a client of a
server can make the server's choice from its list without loading torch (~1.5 s).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dannucnet.values import finite_float

DEFAULT_MODEL = "dannucnet-monuseg"
AUTO = "auto"
#: ``--model auto-fast``: auto's pixel-size rule, then the cheapest network of that pixel size. On a
#: CPU without bf16 (AVX2 EPYC, OpenVINO fp32) the lite models run a slide 2.5× faster than the full
#: ones for about 1 point of PQ (docs/models.md): a trade the user makes by asking, never auto.
AUTO_FAST = "auto-fast"
AUTO_NAMES = (AUTO, AUTO_FAST)
#: Largest upsampling ``--model auto`` treats as "the model's own magnification". Scanners call
#: different pixel sizes 40× (Aperio 0.2527, 3DHistech 0.2428, Hamamatsu 0.2265 µm/px) and 20×
#: (0.504, 0.4855, 0.453): within 15 % they are one magnification, and upsampling by 1.15 costs
#: 1.32× the compute; beyond it (e.g. 0.30 µm/px against a 0.25 model) a coarser model is used.
UPSAMPLE_TOLERANCE = 1.15


@dataclass(frozen=True)
class CatalogueEntry:
    """One installed model as ``dannucnet models``, ``GET /v1/models`` and ``ListModels`` show it."""

    name: str  # what --model takes: the folder name
    version: str
    mpp: float
    trained: bool
    licence: str
    path: str
    has_weights: bool
    card_name: str = ""
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # headline scores: split, f1, aji, pq
    base_filters: int = 32  # the network's width and depth (card ``architecture``): its cost
    depth: int = 4

    @property
    def usable(self) -> bool:
        """Trained and complete: what ``--model auto`` may pick."""
        return self.trained and self.has_weights

    @property
    def cost(self) -> int:
        """Relative network work per pixel, what ``auto-fast`` minimises: a UNet level has half the side
        and twice the filters of the one above, so each level costs about the same, and a conv's work
        grows with the square of its width: ``base_filters² × (depth + 1)``. Measured, not just counted:
        16 base filters ran a 512² window in 380 ms against 32's 1068 (2.8×; the count says 4×)."""
        return self.base_filters**2 * (self.depth + 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def headline_metrics(metrics: dict[str, Any], mpp: float | None = None) -> dict[str, Any]:
    """Pixel F1, AJI and PQ of the final polygons on the card's Kumar test at the model's own pixel size
    (``kumar-test-0.5mpp``, written by ``evaluate --mpp 0.5 --update-card``), else the Kumar test, else
    the first scored split. A score that is not a finite number (a card edited by hand) is left out, so
    one card cannot break ``dannucnet models`` or ``--model auto``."""
    if not isinstance(metrics, dict):
        return {}
    scored = {k: v for k, v in metrics.items() if isinstance(v, dict) and isinstance(v.get("final_polygons"), dict)}
    if not scored:
        return {}
    preferred = [f"kumar-test-{mpp:g}mpp" if mpp else "", "kumar-test"]
    split = next((k for k in preferred if k in scored), sorted(scored)[0])
    final = scored[split]["final_polygons"]
    scores = {k: finite_float(final.get(k)) for k in ("f1", "aji", "pq")}
    return {"split": split, **{k: v for k, v in scores.items() if v is not None}}


def choose_model(
    image_mpp: float | None, entries: list[CatalogueEntry] | None = None, fast: bool = False
) -> tuple[CatalogueEntry | None, str]:
    """``--model auto`` for one image: (the model, why) — ``None`` when no trained model is installed.

    The finest model that does not upsample the image (beyond :data:`UPSAMPLE_TOLERANCE`) wins:
    a 20× image (0.5 µm/px) gets a 0.5 µm/px model, not a 0.25 one that would run on 4× the
    pixels; a 40× image gets the 0.25 model, whose resolution it has. An image coarser than
    every model gets the coarsest (least upsampling). Ties go to the default model, then the
    higher Kumar-test PQ. With ``fast`` (``--model auto-fast``) the pixel size is chosen the same
    way and ties go to the cheapest network (:attr:`CatalogueEntry.cost`) first: speed is never
    bought with a coarser resolution, only with a narrower network.
    """
    if entries is None:  # the installed models (reading their cards needs dannucnet.model, hence torch)
        from dannucnet.model.registry import list_models

        entries = list_models()
    usable = [e for e in entries if e.usable]
    if not usable:
        return None, "no trained model is installed"

    def rank(e: CatalogueEntry) -> tuple[float, int, bool, float, str]:
        return (e.mpp, e.cost if fast else 0, e.name != DEFAULT_MODEL, -e.metrics.get("pq", 0.0), e.name)

    def best(candidates: list[CatalogueEntry]) -> tuple[CatalogueEntry, str]:
        chosen = min(candidates, key=rank)
        rivals = [e for e in candidates if e.mpp == chosen.mpp and e is not chosen]
        if not (fast and rivals):
            return chosen, ""
        return chosen, (f"; of the {len(rivals) + 1} models at {chosen.mpp:g} µm/px, the cheapest network "
                        f"({chosen.base_filters} base filters)")

    if image_mpp is None or not math.isfinite(image_mpp) or image_mpp <= 0:
        default = [e for e in usable if e.name == DEFAULT_MODEL]
        at = default[0].mpp if default else min(usable, key=rank).mpp
        chosen, why = best([e for e in usable if e.mpp == at])
        role = ("the default" if chosen.name == DEFAULT_MODEL else
                "at the default model's pixel size" if default else "the finest installed")
        return chosen, f"the image's pixel size is unknown: {chosen.name} ({chosen.mpp:g} µm/px), {role}{why}"
    no_upsampling = [e for e in usable if e.mpp * UPSAMPLE_TOLERANCE >= image_mpp]
    if no_upsampling:
        chosen, why = best(no_upsampling)
        coarser = chosen.mpp > image_mpp * 1.01
        how = f"downsampled {chosen.mpp / image_mpp:.2g}×" if coarser else "at about its own resolution"
        return chosen, (f"image at {image_mpp:g} µm/px: {chosen.name} works at {chosen.mpp:g} µm/px, the finest "
                        f"installed model that needs no upsampling (image {how}){why}")
    coarsest = max(e.mpp for e in usable)
    chosen, why = best([e for e in usable if e.mpp == coarsest])
    return chosen, (f"image at {image_mpp:g} µm/px is coarser than every installed model: {chosen.name} "
                    f"({chosen.mpp:g} µm/px) upsamples it least ({image_mpp / chosen.mpp:.2g}×){why}")


def possible_choices(entries: list[CatalogueEntry], fast: bool = False) -> list[CatalogueEntry]:
    """Every model :func:`choose_model` can pick from ``entries``, over all pixel sizes: the one it
    prefers at each pixel size (a resumed ``--model auto`` cohort counts their output as done)."""
    picks = {}
    for mpp in sorted({e.mpp for e in entries if e.usable}):
        chosen, _ = choose_model(mpp, [e for e in entries if e.mpp == mpp], fast=fast)
        if chosen is not None:
            picks[chosen.name] = chosen
    return list(picks.values())
