"""Shared fixtures: data locations, small models, synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("DANNUCNET_DATA", REPO.parent / "shared" / "data"))


def monuseg_root() -> Path:
    return data_root() / "monuseg-train"


requires_monuseg = pytest.mark.skipif(
    not (monuseg_root() / "labels").is_dir(),
    reason="MoNuSeg data not found (set DANNUCNET_DATA to the folder holding monuseg-train/)",
)


@pytest.fixture(scope="session")
def untrained_predictor():
    from dannucnet.engine import Predictor
    from dannucnet.model import untrained_model

    return Predictor(untrained_model(), device="cpu")


@pytest.fixture(scope="session")
def training_set(tmp_path_factory):
    """A two-image synthetic instance dataset folder (split ``train``), a strip of each image outside the
    annotated region; training tests read it and write their models elsewhere."""
    import numpy as np

    from dannucnet.formats.dataset import DatasetWriter
    from dannucnet.slides.synthetic import make_synthetic_he

    root = tmp_path_factory.mktemp("data") / "synthetic"
    writer = DatasetWriter(root)
    for i in range(2):
        im = make_synthetic_he(160, 192, seed=100 + i)
        region = np.ones(im.labels.shape, bool)
        region[:, :16] = False  # a strip outside the annotated region
        writer.add(f"img{i}", im.rgb, im.labels, region=region, organ="Synthetic")
    writer.close(mpp=0.25, splits={"train": ["img0", "img1"]}, provenance={"name": "synthetic"})
    return root


@pytest.fixture(scope="module")
def shipped():
    """The default installed model on the CPU (PyTorch), one per test module; skipped where none is trained."""
    from dannucnet.engine import Predictor
    from dannucnet.model import load_model

    model = load_model(None)
    if not model.card.trained:
        pytest.skip("no trained default model installed in models/")
    return Predictor(model, device="cpu")


@pytest.fixture(scope="session", autouse=True)
def _runtime_cache(tmp_path_factory):
    """ONNX exports (engine.runtime) of networks without a model folder go to a session folder, not ~/.cache."""
    if "DANNUCNET_CACHE" in os.environ:
        yield
        return
    os.environ["DANNUCNET_CACHE"] = str(tmp_path_factory.mktemp("runtime-cache"))
    try:
        yield
    finally:
        os.environ.pop("DANNUCNET_CACHE", None)
