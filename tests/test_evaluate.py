"""Evaluation runner, report and CLI on a tiny untrained model and synthetic images (CPU, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dannucnet.cli import main as cli_main
from dannucnet.engine import Predictor
from dannucnet.evaluate.metrics import SCORE_NAMES, score_labels
from dannucnet.evaluate.report import render_markdown, write_report
from dannucnet.evaluate.runner import (
    EvaluationResult,
    ImageResult,
    evaluate_model,
    mean_scores,
    polygons_to_labels,
    raw_instances,
)
from dannucnet.formats.dataset import DatasetWriter, load_dataset
from dannucnet.geometry.polygons import labels_to_polygons
from dannucnet.model import DANNucNet, LoadedModel, ModelCard, ModelConfig, save_model
from dannucnet.slides.synthetic import make_synthetic_he

TINY = ModelConfig(base_filters=16, depth=2)


def _tiny_model(distance_head: bool = False) -> LoadedModel:
    import torch

    torch.manual_seed(0)
    config = ModelConfig(**{**TINY.to_dict(), "distance_head": distance_head})
    network = DANNucNet(config).eval()
    card = ModelCard(name="tiny-test", version="0", architecture=config.to_dict(), tile_size=128)
    return LoadedModel(network=network, card=card, source="test")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic 128 x 128 images (one model tile each) in two 'organs'; the third has a region mask."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    writer = DatasetWriter(root)
    for i, organ in enumerate(("Breast", "Breast", "Colon")):
        img = make_synthetic_he(128, 128, seed=i, density=15000)
        region = None
        if i == 2:
            region = np.zeros(img.labels.shape, bool)
            region[:, :64] = True
        writer.add(f"img{i}", img.rgb, img.labels, region=region, organ=organ)
    writer.close(mpp=0.25, splits={"test": ["img0", "img2"], "all": ["img0", "img1", "img2"]})
    return root


def test_ground_truth_polygons_score_about_one() -> None:
    """The scoring path (labels → final polygons → raster at pixel centres) loses nothing measurable."""
    truth = make_synthetic_he(256, 256, seed=3, density=12000).labels
    assert truth.max() > 15
    polygons = labels_to_polygons(truth)
    ordered = [polygons[i] for i in sorted(polygons)]
    scores = score_labels(truth, polygons_to_labels(ordered, truth.shape))
    assert scores["f1"] > 0.99
    assert scores["aji"] > 0.97
    assert scores["pq"] > 0.95
    assert scores["det_f1"] > 0.98


def test_raw_instances_are_connected_components() -> None:
    prob = np.zeros((6, 8), np.float32)
    prob[1:3, 1:3] = 0.9
    prob[4:6, 5:8] = 0.7
    prob[0, 7] = 0.4  # below threshold
    labels = raw_instances(prob, 0.5)
    assert labels.max() == 2 and (labels > 0).sum() == 4 + 6


@pytest.mark.parametrize("distance_head", [False, True], ids=["probability", "probability+distance"])
def test_evaluate_model_runs_and_is_json_serialisable(dataset_dir: Path, distance_head: bool) -> None:
    samples = load_dataset(dataset_dir).select("all")
    seen: list[str] = []
    result = evaluate_model(
        Predictor(_tiny_model(distance_head), device="cpu"), samples, threshold=0.5,
        progress=lambda r: seen.append(r.stem),
    )
    assert seen == ["img0", "img1", "img2"]
    assert result.threshold == 0.5 and result.model["name"] == "tiny-test"
    assert [r.organ for r in result.images] == ["Breast", "Breast", "Colon"]
    for image in result.images:
        for source in (image.final, image.raw):
            for name in SCORE_NAMES:
                assert 0.0 <= source[name] <= 1.0 and not math.isnan(source[name]), name
        assert image.final["n_true"] > 0
    # The region mask of img2 drops the nuclei right of column 64 from the truth.
    full_truth = len(np.unique(samples[2].load_labels())) - 1
    assert result.images[2].final["n_true"] < full_truth
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data["overall"]) == {"final", "raw"}
    assert set(data["by_organ"]["final"]) == {"Breast", "Colon"}
    assert data["overall"]["final"]["n_images"] == 3
    assert EvaluationResult.from_dict(data).to_dict() == data


def _image(stem: str, organ: str, f1: float) -> ImageResult:
    scores = {name: f1 for name in SCORE_NAMES}
    scores.update(n_true=10, n_pred=0 if f1 == 0 else 10)
    return ImageResult(stem=stem, organ=organ, mpp=0.25, final=scores, raw=dict(scores), seconds=1.0)


def test_means_are_macro_and_keep_f1_zero_images() -> None:
    result = EvaluationResult(
        model={"name": "m", "version": "1", "trained": True},
        split="kumar-test",
        threshold=0.5,
        images=[_image("a", "Liver", 0.0), _image("b", "Liver", 0.8), _image("c", "Colon", 0.6)],
    )
    assert result.mean("final")["f1"] == pytest.approx((0.0 + 0.8 + 0.6) / 3)
    assert result.by_organ("final")["Liver"]["f1"] == pytest.approx(0.4)
    assert result.by_organ("final")["Liver"]["n_images"] == 2
    assert mean_scores([]) == {"n_images": 0}


def test_report_sets_results_beside_the_paper(tmp_path: Path) -> None:
    from dannucnet.formats.kumar_split import KUMAR_TEST, ORGANS

    images = [_image(stem, ORGANS[stem], 0.5 + 0.03 * i) for i, stem in enumerate(KUMAR_TEST)]
    result = EvaluationResult(model={"name": "m", "version": "1", "trained": True}, split="kumar-test",
                              threshold=0.5, images=images)
    report = write_report(result, tmp_path / "report")
    text = report.read_text()
    assert "81.11" in text and "69.18" in text  # paper Table 3, Kumar
    assert "WatershedCellDetection" in text and "≈ 70" in text and "≈ 48" in text
    assert "same organ (8 images)" in text and "different organ (6 images)" in text
    for organ in ("Liver", "Kidney", "Bladder", "Stomach"):
        assert f"| {organ} |" in text
    for png in ("organ_bars.png", "per_image_box.png"):
        assert f"]({png})" in text
        with Image.open(tmp_path / "report" / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert json.loads((tmp_path / "report" / "evaluation.json").read_text())["split"] == "kumar-test"
    assert "indicative only" not in text
    other = EvaluationResult(model={"name": "m", "version": "1", "trained": False}, split="all", threshold=0.5,
                             images=images[:2])
    assert "indicative only" in render_markdown(other) and "Untrained" in render_markdown(other)


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} written: strict JSON readers refuse it")


def test_cli_evaluate_writes_json_and_report(dataset_dir: Path, tmp_path: Path, capsys) -> None:
    model_dir = save_model(tmp_path / "tiny", _tiny_model().network, _tiny_model().card)
    out = tmp_path / "scores.json"
    code = cli_main(
        [
            "evaluate", "--model", str(model_dir), "--data", str(dataset_dir), "--split", "test",
            "--json", str(out), "--report", str(tmp_path / "rep"), "--device", "cpu", "--threshold", "0.4",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "final polygons (2)" in printed and "Colon" in printed
    data = json.loads(out.read_text(), parse_constant=_not_json)
    assert [r["stem"] for r in data["images"]] == ["img0", "img2"]
    assert data["threshold"] == 0.4 and data["split"] == "test"
    assert data["model"]["name"] == "tiny-test" and data["model"]["min_area_um2"] == 3.0
    # 128² images hold no 64 µm square (256 px): the nuclei-poor score says so rather than a made-up 1.0
    assert data["nuclei_poor_crops"]["crops"] == 0
    # and has no rates to give: null, not NaN (strict JSON) and not a made-up precision
    rates = ("pixel_precision", "found_per_mm2", "annotated_per_mm2")
    assert [data["nuclei_poor_crops"][k] for k in rates] == [None] * 3
    assert "nuclei-poor crops: none in this split" in printed
    assert "## Where nuclei are few" in (tmp_path / "rep" / "report.md").read_text()
    common = ["evaluate", "--model", str(model_dir), "--data", str(dataset_dir), "--split", "test", "--no-progress"]
    assert cli_main([*common, "--json", str(out), "--poor-share", "0"]) == 0
    assert json.loads(out.read_text())["nuclei_poor_crops"] is None
    assert "nuclei-poor" not in capsys.readouterr().out
    assert cli_main([*common, "--poor-share", "1.5"]) != 0
    assert "--poor-share must be at least 0 and below 1" in capsys.readouterr().err


def test_cli_refuses_unknown_split(dataset_dir: Path, capsys) -> None:
    code = cli_main(["evaluate", "--model", "untrained", "--data", str(dataset_dir), "--split", "nope"])
    assert code != 0
    assert "no split 'nope'" in capsys.readouterr().err


def test_cli_evaluate_records_each_runtime_in_the_card(dataset_dir: Path, tmp_path: Path) -> None:
    """--update-card: metrics.<split> stays PyTorch's; every runtime's headline scores go under <split>-runtimes."""
    from dannucnet.engine.runtime import runtime_available

    if runtime_available("onnxruntime") is not None:
        pytest.skip("onnxruntime not usable here: pip install 'dannucnet[fast]'")
    model_dir = save_model(tmp_path / "tiny", _tiny_model().network, _tiny_model().card)
    common = ["evaluate", "--model", str(model_dir), "--data", str(dataset_dir), "--split", "test", "--no-progress",
              "--threshold", "0.4", "--update-card"]
    assert cli_main([*common, "--runtime", "torch"]) == 0
    reference = json.loads((model_dir / "model_card.json").read_text())["metrics"]["test"]
    assert cli_main([*common, "--runtime", "onnxruntime"]) == 0
    metrics = ModelCard.load(model_dir).metrics  # the card still loads
    assert metrics["test"] == reference  # an exported runtime never replaces the reference record
    runs = metrics["test-runtimes"]
    assert set(runs) == {"torch fp32", "onnxruntime fp32"}
    for key in ("f1", "aji", "pq"):
        expected = pytest.approx(reference["final_polygons"][key], abs=1e-3)
        assert runs["onnxruntime fp32"]["final_polygons"][key] == expected


def test_cli_records_a_whole_set_under_its_folder_name(dataset_dir: Path, tmp_path: Path) -> None:
    """Without --split (an external test such as GBM40) the scores are named by the data folder, not 'all'."""
    model_dir = save_model(tmp_path / "tiny", _tiny_model().network, _tiny_model().card)
    assert cli_main(["evaluate", "--model", str(model_dir), "--data", str(dataset_dir), "--no-progress",
                     "--runtime", "torch", "--threshold", "0.4", "--update-card"]) == 0
    json.loads((model_dir / "model_card.json").read_text(), parse_constant=_not_json)
    metrics = ModelCard.load(model_dir).metrics
    assert set(metrics) == {dataset_dir.name, f"{dataset_dir.name}-runtimes"}
    assert metrics[dataset_dir.name]["final_polygons"]["n_images"] == len(list((dataset_dir / "images").iterdir()))
    for record in (metrics[dataset_dir.name], metrics[f"{dataset_dir.name}-runtimes"]["torch fp32"]):
        assert record["nuclei_poor_crops"]["crops"] == 0
    # a split named by its set (--card-key): 'test' alone would not say which set's test it was
    assert cli_main(["evaluate", "--model", str(model_dir), "--data", str(dataset_dir), "--split", "test",
                     "--no-progress", "--runtime", "torch", "--update-card", "--card-key", "synthetic-test"]) == 0
    metrics = ModelCard.load(model_dir).metrics
    assert metrics["synthetic-test"]["final_polygons"]["n_images"] == 2 and "test" not in metrics
    assert set(metrics["synthetic-test-runtimes"]) == {"torch fp32"}
    assert cli_main(["evaluate", "--model", str(model_dir), "--data", str(dataset_dir), "--card-key", "x"]) != 0
