"""benchmarks/gpu_session.py end to end in --smoke mode on the CPU (generated Kumar-like data).

The script is what a lent GPU session runs in one command; this keeps it working between
sessions: every step (GPU check, train, evaluate new and shipped model, bench_slides) runs for
real on tiny settings and the summary and returned files are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dannucnet.formats.dataset import DatasetWriter
from dannucnet.slides.synthetic import make_synthetic_he

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.py"


@pytest.fixture(scope="module")
def kumar_like(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "kumar-like"
    writer = DatasetWriter(root)
    for i in range(3):
        im = make_synthetic_he(400, 400, seed=40 + i)  # 70 % of 400 rows > one 256 patch
        writer.add(f"img{i}", im.rgb, im.labels, organ="Synthetic")
    writer.close(mpp=0.25, splits={"kumar-train": ["img0", "img1"], "kumar-test": ["img2"]})
    return root


@pytest.mark.slow
def test_smoke_run_reports_every_step(kumar_like: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"  # ≈ 50 s on a quiet 2-core CPU; the budget only caps a loaded one
    env = {**os.environ, "PYTHONPATH": str(REPO / "python_backend"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--budget", "540", "--data", str(kumar_like), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=570, check=False,
    )
    assert "no GPU: smoke run" in proc.stdout, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = {r["step"]: r["status"] for r in summary["steps"]}
    assert steps == {"train": "ok", "eval": "ok", "eval-shipped": "ok", "bench_slides": "ok"}, proc.stdout
    assert proc.returncode == 0
    assert summary["train"]["epochs_run"] == 1
    for key in ("eval", "eval-shipped"):
        assert summary[key]["n_images"] == 1 and 0.0 <= summary[key]["aji"] <= 1.0
    assert summary["verdict"].startswith("Kumar test (report only): ") and "held-out" in summary["verdict"]
    assert [r["size"] for r in summary["bench"]["slides"]] == [256, 512]
    # the tool returns at most 8 files, 16 MB each, two folders deep: the weights come back in parts
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size <= 16_000_000 for p in files)
    parts = sorted((out / "model").glob("weights.safetensors.part*"))
    assert len(parts) >= 2
    import hashlib

    assert hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest() == summary["weights_sha256"]
    assert "| Kumar test |" in proc.stdout


def test_full_run_without_gpu_says_so(tmp_path: Path) -> None:
    """Without --smoke and without a GPU the script stops at once with exit 2 and one clear line."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "python_backend"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "o")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "no GPU: the full recipe needs one" in proc.stdout
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["gpu"]["cuda"] is False


def test_verdict_rule() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_session import verdict

    shipped = {"f1": 0.8008, "aji": 0.5505, "pq": 0.5117}
    assert verdict({"f1": 0.799, "aji": 0.56, "pq": 0.52}, shipped).startswith("Kumar test (report only): higher")
    lower = "Kumar test (report only): not higher"
    assert verdict({"f1": 0.79, "aji": 0.56, "pq": 0.52}, shipped).startswith(lower)  # F1 0.98 points lower
    assert verdict({"f1": 0.81, "aji": 0.55, "pq": 0.52}, shipped).startswith(lower)  # AJI not higher
    assert verdict(None, shipped).startswith("no comparison")
    assert np.isfinite(shipped["aji"])
