"""Options shared by every door (CLI, server, QuPath batch), with the defaults in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dannucnet.errors import InputError
from dannucnet.geometry.cells import cell_margin_px
from dannucnet.geometry.qupath_stains import HE_DEFAULT, Stains

#: A nucleus is 20-200 µm²; a minimum of 10,000 µm² (a 100 µm square) already keeps none.
MAX_MIN_AREA_UM2 = 10_000.0

#: QuPath's Cell detection allows 0-25 µm of cell expansion; we accept the same range.
MAX_CELL_EXPANSION_UM = 25.0
#: Context read around a slide chunk's core, in µm: more than the largest nucleus (~25 µm), so that the
#: chunk owning a nucleus's centroid sees all of it. 128 px for a 0.25 µm/px model, as before; 64 px for a
#: 0.5 µm/px one, whose 128 px read 64 µm: an inner 2048 px chunk put 1.89 network pixels through per
#: core pixel, against 1.56 with 64 (256² windows overlapping ≥ 32 px); a 6144² 20× slide ran 1.16×
#: faster (benchmarks/bench_margin.py, docs/performance.md). Chunks cut to fill whole windows
#: (``plan_slide`` with the predictor's windows) take that to 1.41 on a 4096² 20× slide.
NUCLEUS_MARGIN_UM = 32.0


@dataclass(frozen=True)
class SegmentOptions:
    """How a region or slide is segmented.

    Sizes are in pixels at the model's resolution (0.25 µm/px for the shipped
    model) so they mean the same tissue size on every scanner.
    """

    threshold: float | None = None  # None: the model card's threshold
    # Smaller specks are dropped. 3 µm² (48 px at 0.25 µm/px) was chosen on the held-out bottom rows of the
    # Kumar training images with dannucnet-monuseg 1.5: over 1–10 µm² it has the best mean of pixel F1, AJI,
    # PQ and detection F1 (the earlier 8 µm² = 128 px lost 1.5 F1 and 2.5 AJI there: it also forbade the
    # split from cutting off any fragment that small, so small nuclei stayed merged with their neighbours).
    min_area_um2: float = 3.0
    # Core side of a slide chunk, model px. 3072 rather than 2048 since the windows became 512² (issue 18): a core
    # of 2048 read with margins cannot fill 512² windows (2432 px would hold a 2176 px core at 0.25 µm/px), so a 40×
    # 4096² slide ran 1.56 network px per px with 2048 and 1.27 with 3072 (0.135 → 0.166 MP/s end to end, AVX2 EPYC;
    # a 40960² slide 1.50 → 1.35 by the plan). One 3328² read peaked at 2.24 GB RSS against 1.97 GB for 2304².
    chunk_size: int = 3072
    margin: int | None = None  # context around a chunk core, model px; None: NUCLEUS_MARGIN_UM; see chunk_margin
    skip_background: bool = True  # skip slide chunks without tissue
    max_nuclei: int | None = None  # refuse to return more than this (the server's response limit)
    # > 0: grow each nucleus into a cell by this many µm (QuPath's Cell detection default is 5); 0: nuclei only
    cell_expansion_um: float = 0.0
    stains: Stains | None = None  # colour deconvolution for the OD measurements; None: QuPath's "H&E default"
    auto_stains: bool = False  # estimate the stains from each image (QuPath's Estimate stain vectors) before segmenting

    @property
    def stain_vectors(self) -> Stains:
        return HE_DEFAULT if self.stains is None else self.stains

    def chunk_margin(self, model_mpp: float) -> int:
        """Context around a chunk core in model px: the nucleus margin plus what cells need (2 × expansion)."""
        nucleus = self.margin if self.margin is not None else math.ceil(NUCLEUS_MARGIN_UM / model_mpp - 1e-9)
        return nucleus + cell_margin_px(self.cell_expansion_um / model_mpp)

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        if not 0 <= self.min_area_um2 <= MAX_MIN_AREA_UM2:  # inf (or 1e308 µm² in px) overflowed int()
            raise InputError(f"minimum area must be 0 to {MAX_MIN_AREA_UM2:g} µm² (a nucleus is 20-200 µm²), "
                             f"got {self.min_area_um2}")
        if self.chunk_size < 256:
            raise InputError(f"chunk size must be at least 256 px, got {self.chunk_size}")
        if self.margin is not None and self.margin < 0:
            raise InputError(f"margin must be zero or positive, got {self.margin}")
        e = self.cell_expansion_um
        if not (isinstance(e, (int, float)) and math.isfinite(e) and 0 <= e <= MAX_CELL_EXPANSION_UM):
            raise InputError(f"cell expansion must be 0-{MAX_CELL_EXPANSION_UM:g} µm, got {e}")
        if self.stains is not None and not isinstance(self.stains, Stains):
            raise InputError("stains must be QuPath stain vectors (see --stains)")
