"""What cells and QuPath's full measurement set cost per 1,000 nuclei, beside the model (issue 17).

One process, one image, the same probability map for every variant, each timed
``--repeats`` times in alternating order (median reported):

* **model** — ``Predictor.predict`` on the image at the model's resolution;
* **nuclei only** — ``chunk_nuclei`` without cells: instances, polygons and the
  nucleus half of QuPath's measurements (shape, Hematoxylin/Eosin OD);
* **cells (5 µm)** — the same plus nearest-nucleus expansion, cell outlines and
  all 41 Cell detection measurements;
* **old 8 measurements** — ``measure_nuclei`` (what the pipeline measured before
  issue 17) on the same nuclei, for scale.

Per stage it prints ms per 1,000 nuclei and the ratio to the model's time on the
same image. Uses a MoNuSeg training image (1000² at 0.25 µm/px) when
``../shared/data`` is there, else a synthetic H&E image of the same size.

    python benchmarks/bench_cells.py                    # shipped model, CPU
    python benchmarks/bench_cells.py --repeats 1 --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def load_image(quick: bool) -> tuple[np.ndarray, str]:
    root = Path(__file__).resolve().parents[1].parent.parent / "shared" / "data" / "monuseg-train" / "images"
    images = sorted(root.glob("*.tif")) if root.is_dir() else []
    size = 512 if quick else 1000
    if images:
        import tifffile

        rgb = tifffile.imread(images[0])[..., :3]
        return np.ascontiguousarray(rgb[:size, :size]), f"MoNuSeg {images[0].stem} ({size}²)"
    from dannucnet.slides.synthetic import make_synthetic_he

    return make_synthetic_he(size, size, seed=3, density=6000).rgb, f"synthetic H&E ({size}²)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model name or folder (default: the shipped model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--expansion", type=float, default=5.0, help="cell expansion in µm (QuPath's default 5)")
    ap.add_argument("--quick", action="store_true", help="a 512² crop: proves the script runs")
    args = ap.parse_args()

    import torch

    from dannucnet.engine import Predictor
    from dannucnet.geometry.instances import label_nuclei, split_map
    from dannucnet.geometry.measurements import measure_nuclei
    from dannucnet.geometry.polygons import labels_to_polygons
    from dannucnet.model import load_model
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.pipeline.chunk_nuclei import ChunkGeometry, chunk_nuclei
    from dannucnet.tables import format_table

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(args.model)
    predictor = Predictor(model, device="cpu")
    card = model.card
    rgb, what = load_image(args.quick)
    print(f"model {card.name} {card.version} ({'trained' if card.trained else 'UNTRAINED'}), CPU "
          f"{torch.get_num_threads()} threads; image: {what}")
    where = ChunkGeometry(origin=(0.0, 0.0), to_level0=1.0, mpp=card.mpp, core=None, threshold=card.threshold,
                          min_area_px=max(1, round(SegmentOptions().min_area_um2 / card.mpp**2)))
    nuclei_only = SegmentOptions()
    with_cells = SegmentOptions(cell_expansion_um=args.expansion)

    times: dict[str, list[float]] = {k: [] for k in ("model", "nuclei only", "cells", "old 8 measurements")}
    stages: dict[str, list[float]] = {k: [] for k in ("cells: expansion + outlines", "cells: 41 measurements")}
    count = 0
    prob = None
    for r in range(args.repeats):
        t0 = time.perf_counter()
        prob = predictor.predict(rgb)
        times["model"].append(time.perf_counter() - t0)
        order = [("nuclei only", nuclei_only), ("cells", with_cells)]
        for name, options in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            nuclei, stage = chunk_nuclei(prob, rgb, where, options=options)
            times[name].append(time.perf_counter() - t0)
            if name == "cells":
                stages["cells: expansion + outlines"].append(stage["cells"])
                stages["cells: 41 measurements"].append(stage["measurements"])
                count = len(nuclei)
        labels = label_nuclei(prob, threshold=card.threshold, min_area_px=where.min_area_px)
        polys = labels_to_polygons(labels)
        t0 = time.perf_counter()
        measure_nuclei(polys, labels, split_map(prob)[0], rgb, card.mpp)
        times["old 8 measurements"].append(time.perf_counter() - t0)

    model_s = statistics.median(times["model"])
    per_k = 1000.0 / max(count, 1)
    print(f"{count} nuclei; median of {args.repeats} (alternating order)\n")
    rows = [("model (bare predict)", model_s)]
    rows += [(k, statistics.median(v)) for k, v in times.items() if k != "model"]
    rows += [(k, statistics.median(v)) for k, v in stages.items()]
    print(format_table(["stage", "s", "ms / 1,000 nuclei", "x model"],
                       [[name, f"{s:.3f}", f"{1000 * s * per_k:.1f}", f"{s / model_s:.3f}"] for name, s in rows],
                       rule=False, align="<>>>"))
    extra = statistics.median(times["cells"]) - statistics.median(times["nuclei only"])
    print(f"\ncells at {args.expansion:g} µm add {1000 * extra * per_k:.1f} ms per 1,000 nuclei "
          f"({extra / model_s:.1%} of the model's time) to the nuclei-only post-processing")


if __name__ == "__main__":
    main()
