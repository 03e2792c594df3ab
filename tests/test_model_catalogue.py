"""The model catalogue: ``dannucnet models``, ``--model auto``, ``GET /v1/models``, gRPC ``ListModels``,
a model per request, and the shipped native-20× model's card.

Two tiny hand-set "darkness" models (see ``test_service_server.darkness_network``) stand in for a
40× and a 20× model: the 40× one finds the dark synthetic nuclei, the 20× one is made blind
(its threshold lies above any darkness), so which model ran is visible in the nuclei found.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from dannucnet.catalogue import possible_choices
from dannucnet.cli import main
from dannucnet.engine import Predictor
from dannucnet.engine.pool import PredictorPool
from dannucnet.errors import InputError
from dannucnet.model import ModelCard, load_model, registry, save_model
from dannucnet.model.registry import CatalogueEntry, choose_model, list_models
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service._generated.v1 import segmentation_pb2_grpc as pb_grpc
from dannucnet.service.limits import Limits
from dannucnet.service.server import Server, ServerConfig
from dannucnet.slides.synthetic import make_synthetic_he, write_synthetic_slide
from test_service_server import OVERLAP, TILE, TOKEN, b64, darkness_network, png, request

REPO = Path(__file__).resolve().parents[1]
METRICS = {"kumar-test": {"final_polygons": {"f1": 0.8, "aji": 0.55, "pq": 0.51, "n_images": 14}}}


def _save(root: Path, name: str, mpp: float, level: float = 0.4, depth: int = 2, **card) -> Path:
    card = {"trained": True, "licence": "test data (CC0): any use", **card}
    return save_model(root / name, darkness_network(level=level, depth=depth),
                      ModelCard(name=name, version="t", tile_size=TILE, mpp=mpp, **card))


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    _save(root, "dannucnet-monuseg", 0.25, metrics=METRICS)  # the default model's name: the tie-breaker
    _save(root, "blind-20x", 0.5, level=5.0)  # darkness never exceeds 5: finds nothing
    _save(root, "random", 0.5, trained=False)  # untrained: listed, never chosen by auto
    (root / "broken").mkdir()
    (root / "broken" / "model_card.json").write_text("{ not json")
    (root / "no-weights").mkdir()
    ModelCard(name="no-weights", version="1", mpp=1.0, trained=True).save(root / "no-weights")
    return root


@pytest.fixture
def catalogue(models_root, monkeypatch, tmp_path):
    """Only the test models are installed: DANNUCNET_MODELS set, the repository's models/ hidden."""
    monkeypatch.setenv("DANNUCNET_MODELS", str(models_root))
    monkeypatch.setattr(registry, "REPO_MODELS", tmp_path / "no-repo-models")
    return models_root


def entry(name: str, mpp: float, trained: bool = True, weights: bool = True, pq: float | None = None,
          filters: int = 32):
    metrics = {} if pq is None else {"split": "kumar-test", "pq": pq}
    return CatalogueEntry(name=name, version="1", mpp=mpp, trained=trained, licence="", path=f"/m/{name}",
                          has_weights=weights, metrics=metrics, base_filters=filters)


# ---- the catalogue ------------------------------------------------------------------
def test_list_models_reads_the_cards(catalogue, caplog, monkeypatch):
    monkeypatch.setattr(registry, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        entries = {e.name: e for e in list_models()}
    assert sorted(entries) == ["blind-20x", "dannucnet-monuseg", "no-weights", "random"]
    default = entries["dannucnet-monuseg"]
    assert (default.mpp, default.usable, default.licence) == (0.25, True, "test data (CC0): any use")
    assert default.metrics == {"split": "kumar-test", "f1": 0.8, "aji": 0.55, "pq": 0.51}
    assert Path(default.path) == catalogue / "dannucnet-monuseg"
    assert not entries["random"].usable and not entries["no-weights"].usable
    assert "broken" in caplog.text  # the unreadable card is named, the others still listed


def test_a_card_with_scores_that_are_not_numbers_is_still_listed_and_chosen(tmp_path, monkeypatch, capsys):
    """A hand-edited card (null, text or NaN scores) crashed ``dannucnet models`` and every ``--model auto``;
    now its bad scores are left out, the model stays usable, and ``models --json`` stays strict JSON."""
    root = tmp_path / "models"
    bad = {"kumar-test": {"final_polygons": {"f1": None, "aji": "0.5", "pq": float("nan")}}}
    _save(root, "dannucnet-monuseg", 0.25, metrics=bad)
    _save(root, "other", 0.25, metrics={"kumar-test": {"final_polygons": [1, 2]}, "x": {"final_polygons": {"pq": 0.4}}})
    monkeypatch.setenv("DANNUCNET_MODELS", str(root))
    monkeypatch.setattr(registry, "REPO_MODELS", tmp_path / "no-repo-models")
    entries = {e.name: e for e in list_models()}
    assert entries["dannucnet-monuseg"].metrics == {"split": "kumar-test"}
    assert entries["other"].metrics == {"split": "x", "pq": 0.4}
    assert choose_model(0.25)[0].name == "dannucnet-monuseg"
    capsys.readouterr()
    assert main(["models", "--json"]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in models --json")

    names = [m["name"] for m in json.loads(capsys.readouterr().out, parse_constant=refuse)["models"]]
    assert sorted(names) == ["dannucnet-monuseg", "other"]


def test_user_folder_hides_the_same_name_in_models(catalogue, tmp_path, monkeypatch):
    user = tmp_path / "user"
    _save(user, "blind-20x", 0.5)
    monkeypatch.setenv("DANNUCNET_MODELS", os.pathsep.join([str(user), str(catalogue)]))
    paths = {e.name: Path(e.path) for e in list_models()}
    assert paths["blind-20x"] == user / "blind-20x"
    assert paths["dannucnet-monuseg"] == catalogue / "dannucnet-monuseg"


# ---- --model auto: the choice ---------------------------------------------------------
BOTH = [entry("dannucnet-monuseg", 0.25, pq=0.51), entry("dannucnet-monuseg-20x", 0.5, pq=0.45)]


@pytest.mark.parametrize("mpp, expected", [
    (0.25, "dannucnet-monuseg"),  # 40×: its own model
    (0.2527, "dannucnet-monuseg"),  # Aperio 40×: 1 % upsampling is "the same magnification"
    (0.2265, "dannucnet-monuseg"),  # Hamamatsu 40×: slightly downsampled
    (0.5, "dannucnet-monuseg-20x"),  # 20×: never upsampled 2× when a 20× model exists
    (0.504, "dannucnet-monuseg-20x"),
    (0.35, "dannucnet-monuseg-20x"),  # between: downsampled to 0.5 rather than upsampled 1.4×
    (1.0, "dannucnet-monuseg-20x"),  # 10×: coarser than every model, the least upsampling
    (None, "dannucnet-monuseg"),  # unknown pixel size: the default model
])
def test_auto_picks_the_model_whose_pixel_size_suits(mpp, expected):
    chosen, reason = choose_model(mpp, BOTH)
    assert chosen.name == expected
    assert expected in reason and (mpp is None or f"{mpp:g}" in reason)


def test_auto_with_only_a_40x_model_upsamples_and_says_so():
    chosen, reason = choose_model(0.5, BOTH[:1])
    assert chosen.name == "dannucnet-monuseg" and "upsamples it least (2×)" in reason


def test_auto_skips_untrained_and_incomplete_models_and_breaks_ties():
    entries = [entry("random", 0.5, trained=False), entry("no-weights", 0.5, weights=False),
               entry("a-40x", 0.25, pq=0.40), entry("b-40x", 0.25, pq=0.50)]
    assert choose_model(0.5, entries)[0].name == "b-40x"  # higher PQ wins the tie
    assert choose_model(0.25, entries + [entry("dannucnet-monuseg", 0.25)])[0].name == "dannucnet-monuseg"
    assert choose_model(0.25, entries[:2]) == (None, "no trained model is installed")


def test_models_command_lists_and_explains(catalogue, capsys):
    assert main(["models", "--json", "--for-mpp", "0.5"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in document["models"]] == ["dannucnet-monuseg", "blind-20x", "random", "no-weights"]
    assert document["auto"]["model"] == "blind-20x" and "0.5 µm/px" in document["auto"]["reason"]
    assert main(["models", "--for-mpp", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "80.0/55.0/51.0" in out and "CC0" in out and "random (untrained)" in out
    assert "FILTERS" in out and " 16 " in out.splitlines()[1]  # the test models' width, from their cards
    assert "--model auto: image at 0.25 µm/px: dannucnet-monuseg" in out
    assert "--model auto-fast: image at 0.25 µm/px: dannucnet-monuseg" in out  # one model per pixel size: the same
    assert main(["models", "--for-mpp", "-1"]) == 2


# ---- --model auto on a door: segment ------------------------------------------------------
@pytest.mark.parametrize("mpp, model, finds_nuclei", [(0.25, "dannucnet-monuseg", True), (0.5, "blind-20x", False)])
def test_segment_auto_runs_the_model_chosen_for_the_image(catalogue, tmp_path, caplog, mpp, model, finds_nuclei):
    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, (256, 192), seed=3, mpp=mpp)
    out = tmp_path / "out.geojson"
    with caplog.at_level(logging.INFO):
        assert main(["segment", str(slide), "-o", str(out), "-q", "--device", "cpu"]) == 0
    assert f"--model auto: image at {mpp:g} µm/px: {model}" in caplog.text
    collection = json.loads(out.read_text())
    assert all(f["properties"]["metadata"]["model"] == model for f in collection["features"])
    assert (len(collection["features"]) > 0) == finds_nuclei


def test_pool_loads_each_model_once(catalogue):
    built = []
    pool = PredictorPool(lambda name: built.append(name) or Predictor(load_model(name), device="cpu"))
    a, _ = pool.for_image(0.5)
    b, _ = pool.for_image(0.49)
    c = pool.get(str(catalogue / "blind-20x"))  # the same model by its path
    assert a is b is c and len(built) == 1
    assert pool.for_image(0.25)[0].card.name == "dannucnet-monuseg" and len(built) == 2


# ---- the server: GET /v1/models, ListModels, a model per request ---------------------------
def _catalogue_server(default: str) -> Server:
    """A server of the installed (test) models whose requests without a model get ``default``."""
    config = ServerConfig(host="127.0.0.1", port=0, http_port=0, token=TOKEN, max_batch=4,
                          limits=Limits(max_message_bytes=4 * 1024 * 1024, max_pixels=1024 * 1024))
    loaded = load_model(default)

    def factory(name):
        return Predictor(load_model(name), device="cpu", overlap=OVERLAP)

    return Server(Predictor(loaded, device="cpu", overlap=OVERLAP), config, model_source=loaded.source,
                  model_factory=factory, default_model=default).start()


@pytest.fixture
def server(catalogue):
    srv = _catalogue_server("auto")
    yield srv
    srv.stop(grace=2)


def _region(model: str | None, mpp: float) -> dict:
    rgb = make_synthetic_he(160, 128, seed=2, density=6000).rgb
    body = {"image": {"encoded": b64(png(rgb))}, "pixelSizeMicrons": mpp}
    return body if model is None else {**body, "model": model}


def test_http_lists_models_and_runs_the_one_asked(server, catalogue):
    status, listing, _ = request(server, "GET", "/v1/models")
    assert status == 200 and listing["defaultModel"] == "auto"
    by_name = {m["name"]: m for m in listing["models"]}
    assert by_name["dannucnet-monuseg"]["pixelSizeMicrons"] == 0.25
    assert by_name["dannucnet-monuseg"]["metrics"] == {"f1": 0.8, "aji": 0.55, "pq": 0.51}
    assert by_name["dannucnet-monuseg"]["loaded"] and not by_name["blind-20x"].get("loaded", False)

    def count(model, mpp):
        status, payload, _ = request(server, "POST", "/v1/segment?alt=json", _region(model, mpp))
        assert status == 200, payload
        return payload.get("nucleusCount", 0)

    assert count(None, 0.25) > 0  # auto at 40×: the 0.25 model
    assert count(None, 0.5) == 0  # auto at 20×: the (blind) 0.5 model
    assert count("dannucnet-monuseg", 0.5) > 0  # asked for by name: that one, whatever the pixel size
    assert count("blind-20x", 0.25) == 0
    _, listing, _ = request(server, "GET", "/v1/models")
    assert all(m.get("loaded", False) == (m["name"] in ("dannucnet-monuseg", "blind-20x")) for m in listing["models"])
    status, payload, _ = request(server, "POST", "/v1/segment", _region("nope", 0.25))
    assert status == 400 and "unknown model 'nope'" in payload["error"]["message"]
    assert "blind-20x" in payload["error"]["message"]
    status, payload, _ = request(server, "POST", "/v1/segment", _region(str(catalogue / "blind-20x"), 0.25))
    assert status == 400  # a client names installed models; it never points the server at a folder


def test_grpc_list_models_and_per_request_model(server):
    channel = grpc.insecure_channel(server.grpc_address)
    stub = pb_grpc.SegmentationStub(channel)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    try:
        listing = stub.ListModels(pb.ListModelsRequest(), metadata=auth, timeout=30)
        assert [m.name for m in listing.models] == ["dannucnet-monuseg", "blind-20x", "random", "no-weights"]
        assert listing.models[0].metrics_split == "kumar-test" and listing.models[2].trained is False
        rgb = make_synthetic_he(160, 128, seed=2, density=6000).rgb
        image = pb.Image(encoded=png(rgb))
        asked = stub.SegmentRegion(pb.SegmentRegionRequest(image=image, pixel_size_microns=0.25, model="blind-20x"),
                                   metadata=auth, timeout=60)
        auto = stub.SegmentRegion(pb.SegmentRegionRequest(image=image, pixel_size_microns=0.25, model="auto"),
                                  metadata=auth, timeout=60)
        assert asked.nucleus_count == 0 < auto.nucleus_count
        with pytest.raises(grpc.RpcError) as info:
            stub.SegmentRegion(pb.SegmentRegionRequest(image=image, pixel_size_microns=0.25, model="nope"),
                               metadata=auth, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown model" in info.value.details()
    finally:
        channel.close()


# ---- training at another pixel size --------------------------------------------------------
def test_training_targets_are_made_at_the_training_pixel_size(tmp_path):
    """Two touching nuclei keep a background seam when the image is halved to 0.5 µm/px."""
    import tifffile
    from PIL import Image

    from dannucnet.formats.dataset import Sample
    from dannucnet.train.patches import grid_patches, load_train_image

    labels = np.zeros((400, 300), np.uint16)
    labels[100:180, 60:140] = 1
    labels[100:180, 140:220] = 2  # touching nucleus 1 along column 140
    rgb = np.full((400, 300, 3), 220, np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", labels)
    sample = Sample("a", tmp_path / "a.png", tmp_path / "a.tif", mpp=0.25)
    image = load_train_image(sample, 0.5, (0.0, 0.7), instance_gaps=True, distance=True)
    assert image.rgb.shape == (200, 150, 3) and image.rows == (0, 140)
    row = image.mask[70, 30:110]
    assert row[:10].all() and row[-10:].all() and not row[38:42].all()  # the seam survives
    assert image.depth[70, 70] == 0 and image.depth[70, 50] > 200  # two distance hills, a valley between
    held_out = [image.__class__(**{**image.__dict__, "rows": (140, 200)})]
    patches = grid_patches(held_out, size=128)
    assert {p[0].shape for p in patches} == {(48, 128, 3)}  # 60 rows → 48-high patches, not none


# ---- the shipped native-20× model ------------------------------------------------------------
MODEL_20X = REPO / "models" / "dannucnet-monuseg-20x"


@pytest.mark.skipif(not (MODEL_20X / "weights.safetensors").is_file(),
                    reason="models/dannucnet-monuseg-20x has no weights in this checkout")
def test_native_20x_model_card():
    card = json.loads((MODEL_20X / "model_card.json").read_text())
    assert card["name"] == "dannucnet-monuseg-20x" and card["mpp"] == 0.5 and card["trained"] is True
    assert card["architecture"]["distance_head"] is True and "--mpp 0.5" in card["training"]["command"]
    assert card["training"]["history"] and card["metrics"]["validation"]["pixel_f1"] > 0.7
    assert (MODEL_20X / "weights.safetensors").stat().st_size < 40 * 1024 * 1024
    loaded = load_model("dannucnet-monuseg-20x")
    assert loaded.card.mpp == 0.5 and loaded.network.config.distance_head
    installed = [e for e in list_models() if e.name in ("dannucnet-monuseg", "dannucnet-monuseg-20x")]
    assert choose_model(0.5, installed)[0].name == "dannucnet-monuseg-20x"
    assert choose_model(0.25, installed)[0].name == "dannucnet-monuseg"


def test_evaluate_mpp_resamples_images_and_labels(tmp_path):
    """``evaluate --mpp 0.5``: the 40× Kumar images become a 20× test set, ids intact."""
    import tifffile
    from PIL import Image

    from dannucnet.formats.dataset import Sample, resampled

    labels = np.zeros((200, 120), np.uint16)
    labels[20:60, 20:60], labels[100:140, 40:100] = 7, 300
    Image.fromarray(np.full((200, 120, 3), 200, np.uint8)).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", labels)
    native = Sample("a", tmp_path / "a.png", tmp_path / "a.tif", organ="Liver", mpp=0.25)
    (half,) = resampled([native], 0.5)
    assert half.mpp == 0.5 and half.organ == "Liver" and half.meta["resampled_from_mpp"] == 0.25
    assert half.load_image().shape == (100, 60, 3) and half.load_region() is None
    small = half.load_labels()
    assert small.shape == (100, 60) and set(np.unique(small)) == {0, 7, 300}
    assert (small == 300).sum() == 20 * 30
    assert resampled([native], 0.2525)[0] is native  # within 1 %: as it is


def test_segment_via_server_sends_the_model(server, catalogue, tmp_path):
    """`segment --server --model NAME` runs that model on the server; an unknown name fails at once."""
    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, (192, 160), seed=3, mpp=0.25)
    out = tmp_path / "out.geojson"
    common = ["segment", str(slide), "-o", str(out), "-q", "--server", server.grpc_address, "--token", TOKEN]
    assert main(common + ["--model", "blind-20x"]) == 0
    assert json.loads(out.read_text())["features"] == []  # the blind model ran, not the server's 40× default
    assert main(common) == 0  # auto: the server picks the 0.25 model for this 40× slide
    assert json.loads(out.read_text())["features"]
    assert main(common + ["--model", "nope"]) == 2


# ---- the lite models: copies of the 40× and 20× models with half the filters, each taught by its full model -------
LITE = [("dannucnet-monuseg-lite", 0.25, "dannucnet-monuseg", "kumar-test"),
        ("dannucnet-monuseg-20x-lite", 0.5, "dannucnet-monuseg-20x", "kumar-test-0.5mpp")]


@pytest.mark.parametrize(("name", "mpp", "full", "split"), LITE)
def test_lite_model_card_and_it_is_never_chosen_over_the_full_one(name, mpp, full, split):
    folder = REPO / "models" / name
    if not (folder / "weights.safetensors").is_file():
        pytest.skip(f"models/{name} has no weights in this checkout")
    card = json.loads((folder / "model_card.json").read_text())
    assert card["name"] == name and card["mpp"] == mpp and card["trained"] is True
    assert card["architecture"]["base_filters"] == 16 and card["architecture"]["distance_head"] is True
    assert card["training"]["config"]["architecture"]["base_filters"] == 16
    assert f"--teacher models/{full} " in card["training"]["command"]
    assert (folder / "weights.safetensors").stat().st_size < 8 * 1024 * 1024
    loaded = load_model(name)
    assert loaded.network.config.base_filters == 16
    assert sum(p.numel() for p in loaded.network.parameters()) < 2_400_000
    installed = list_models()
    lite = next(e for e in installed if e.name == name)
    assert lite.usable and lite.metrics["split"] == split
    # the full model scores the higher PQ (or is the default), so --model auto keeps it; the lite one is asked for
    assert choose_model(mpp, installed)[0].name == full


# ---- --model auto-fast: auto's pixel size, then the cheapest network ----------------------------
SHIPPED = [entry("dannucnet-monuseg", 0.25, pq=0.516), entry("dannucnet-monuseg-lite", 0.25, pq=0.513, filters=16),
           entry("dannucnet-monuseg-20x", 0.5, pq=0.451),
           entry("dannucnet-monuseg-20x-lite", 0.5, pq=0.444, filters=16)]


@pytest.mark.parametrize("mpp, auto, fast", [
    (0.25, "dannucnet-monuseg", "dannucnet-monuseg-lite"),  # 40×: never the 20× lite model, though it is cheaper
    (0.5, "dannucnet-monuseg-20x", "dannucnet-monuseg-20x-lite"),
    (0.35, "dannucnet-monuseg-20x", "dannucnet-monuseg-20x-lite"),
    (1.0, "dannucnet-monuseg-20x", "dannucnet-monuseg-20x-lite"),
    (None, "dannucnet-monuseg", "dannucnet-monuseg-lite"),  # unknown: the default model's pixel size
])
def test_auto_fast_keeps_autos_pixel_size_and_takes_the_cheapest_network(mpp, auto, fast):
    assert choose_model(mpp, SHIPPED)[0].name == auto
    chosen, reason = choose_model(mpp, SHIPPED, fast=True)
    assert chosen.name == fast and "of the 2 models at" in reason and "the cheapest network (16 base filters)" in reason
    assert chosen.cost * 4 == choose_model(mpp, SHIPPED)[0].cost  # half the width: a quarter of the work


def test_auto_fast_never_takes_an_unusable_model_and_is_auto_without_a_choice():
    full = [SHIPPED[0], SHIPPED[2]]
    for mpp in (0.25, 0.5, None):
        assert choose_model(mpp, full, fast=True) == choose_model(mpp, full)  # same model, same words
    unusable = [entry("cheap-random", 0.25, trained=False, filters=16), entry("cheap-empty", 0.25, weights=False,
                                                                             filters=16)]
    assert choose_model(0.25, [SHIPPED[0], *unusable], fast=True)[0].name == "dannucnet-monuseg"
    assert {e.name for e in possible_choices(SHIPPED)} == {"dannucnet-monuseg", "dannucnet-monuseg-20x"}
    assert {e.name for e in possible_choices(SHIPPED, fast=True)} == {"dannucnet-monuseg-lite",
                                                                       "dannucnet-monuseg-20x-lite"}
    assert possible_choices(unusable) == []


@pytest.fixture(scope="module")
def fast_root(tmp_path_factory):
    """A second 40× model, cheaper than the default one (depth 1 against 2), that finds nuclei as it does."""
    root = tmp_path_factory.mktemp("fast-models")
    _save(root, "fast-40x", 0.25, depth=1)
    return root


@pytest.fixture
def fast_catalogue(catalogue, fast_root, monkeypatch):
    monkeypatch.setenv("DANNUCNET_MODELS", os.pathsep.join([str(fast_root), str(catalogue)]))
    return fast_root


def _features(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def test_segment_auto_fast_runs_the_cheapest_model_of_the_images_pixel_size(fast_catalogue, tmp_path, caplog):
    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, (256, 192), seed=3, mpp=0.25)
    out = tmp_path / "out.geojson"
    cheap = next(e for e in list_models() if e.name == "fast-40x")
    assert (cheap.base_filters, cheap.depth) == (16, 1)  # read from its card
    for model, expected in (("auto-fast", "fast-40x"), ("auto", "dannucnet-monuseg")):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(["segment", str(slide), "-o", str(out), "-q", "--device", "cpu", "--model", model]) == 0
        assert f"--model {model}: image at 0.25 µm/px: {expected}" in caplog.text
        features = _features(out)
        assert features and {f["properties"]["metadata"]["model"] for f in features} == {expected}


@pytest.fixture
def fast_server(fast_catalogue):
    """A server whose requests without a model get auto-fast."""
    assert load_model("auto-fast").card.name == "fast-40x"  # no image: the cheapest model of the default's pixel size
    srv = _catalogue_server("auto-fast")
    yield srv
    srv.stop(grace=2)


def test_server_takes_auto_fast_per_request_and_as_its_default(fast_server):
    def ran(model, mpp):
        status, payload, _ = request(fast_server, "POST", "/v1/segment?alt=json", _region(model, mpp))
        assert status == 200, payload
        return payload["model"], payload.get("nucleusCount", 0)

    assert ran(None, 0.25)[0] == "fast-40x"  # the server's default: auto-fast
    assert ran("auto", 0.25)[0] == "dannucnet-monuseg"
    assert ran("auto-fast", 0.5) == ("blind-20x", 0)  # the only 20× model
    status, listing, _ = request(fast_server, "GET", "/v1/models")
    assert status == 200 and listing["defaultModel"] == "auto-fast"
    by_name = {m["name"]: m for m in listing["models"]}
    assert (by_name["fast-40x"]["baseFilters"], by_name["fast-40x"]["depth"]) == (16, 1)
    assert by_name["fast-40x"]["hasWeights"] and not by_name["no-weights"].get("hasWeights", False)
    status, payload, _ = request(fast_server, "POST", "/v1/segment", _region("nope", 0.25))
    assert status == 400 and "(or auto or auto-fast)" in payload["error"]["message"]


def test_server_clients_name_the_model_the_server_runs(fast_server, tmp_path, caplog):
    """`segment --server` (and batch-slides' workers) make the server's auto choice from its list and name
    that model in every request, so the output says which model ran; batch-slides --model is not ignored."""
    from dannucnet.cohort.runner import _model_identity
    from dannucnet.cohort.worker import TaskSpec, segment_slide_task
    from dannucnet.jobs.segmenters import ServerSegmenter
    from dannucnet.pipeline import SegmentOptions

    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, (192, 160), seed=3, mpp=0.25)
    out = tmp_path / "out.geojson"
    common = ["segment", str(slide), "-o", str(out), "-q", "--server", fast_server.grpc_address, "--token", TOKEN]
    for model, expected in (("auto", "dannucnet-monuseg"), ("auto-fast", "fast-40x")):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(common + ["--model", model]) == 0
        assert f"--model {model} on {fast_server.grpc_address}: image at 0.25 µm/px: {expected}" in caplog.text
        assert {f["properties"]["metadata"]["model"] for f in _features(out)} == {expected}
    # the QuPath batch settles one model before its first image: the server's default (auto-fast) at 40×
    one = ServerSegmenter(fast_server.grpc_address, token=TOKEN, one_model=True)
    assert (one.model_name, one.client.model) == ("fast-40x", "fast-40x")
    one.choose_for(0.5)
    assert one.model_name == "fast-40x"  # settled: a 20× image does not change it
    options = SegmentOptions()
    spec = TaskSpec(input=str(slide), output=str(tmp_path / "cohort.geojson.gz"), model="blind-20x", device="cpu",
                    batch_size=None, mpp=None, options=options, server=fast_server.grpc_address, token=TOKEN)
    result = segment_slide_task(spec)
    assert (result["status"], result["model"], result["nuclei"]) == ("done", "blind-20x", 0)
    name, _, _, accepted = _model_identity("auto-fast", fast_server.grpc_address, TOKEN, options)
    assert name == "fast-40x" and {n for n, _ in accepted} == {"fast-40x", "blind-20x"}
    with pytest.raises(InputError, match="has no model 'nope'"):
        _model_identity("nope", fast_server.grpc_address, TOKEN, options)


def test_a_one_model_server_answers_to_the_folder_name_it_lists(tmp_path, monkeypatch):
    """A server started with one model (no per-request models) lists it under its folder name; a client that
    names it so (as `segment --server --model auto` now does) is served, not refused for the card's name."""
    from dannucnet.jobs.segmenters import ServerSegmenter

    root = tmp_path / "models"
    folder = _save(root, "folder-name", 0.25)
    card = json.loads((folder / "model_card.json").read_text())
    card["name"] = "card-name"
    (folder / "model_card.json").write_text(json.dumps(card))
    monkeypatch.setenv("DANNUCNET_MODELS", str(root))
    monkeypatch.setattr(registry, "REPO_MODELS", tmp_path / "no-repo-models")
    config = ServerConfig(host="127.0.0.1", port=0, http_port=0, token=TOKEN, max_batch=4,
                          limits=Limits(max_message_bytes=4 * 1024 * 1024, max_pixels=1024 * 1024))
    loaded = load_model(str(folder))
    srv = Server(Predictor(loaded, device="cpu", overlap=OVERLAP), config, model_source=loaded.source).start()
    try:
        segmenter = ServerSegmenter(srv.grpc_address, token=TOKEN, model="auto")
        assert [e.name for e in segmenter.catalogue] == ["folder-name"] and segmenter.client.model == "folder-name"
        rgb = make_synthetic_he(160, 128, seed=2, density=6000).rgb
        response = segmenter.client.segment_region_response(rgb, mpp=0.25)
        assert response.model == "card-name" and response.nucleus_count > 0
        segmenter.client.model = "other"
        with pytest.raises(InputError, match="this server runs only 'card-name'"):
            segmenter.client.segment_region_response(rgb, mpp=0.25)
    finally:
        srv.stop(grace=2)


def test_the_plan_is_made_for_the_model_the_image_gets(server, fast_server):
    """POST /v1/plan (what the QuPath script asks first) plans for the model auto or auto-fast gives the image's
    level-0 pixel size, and names it: a 20× image is read at its own pixels for the 20× model (it was planned
    for the server's startup 40× model: read 2× upsampled, and its chunks then went to the 40× model)."""
    def plan(srv, mpp, model=None):
        body = {"imageWidth": 600, "imageHeight": 400, "imagePixelWidthMicrons": mpp, "imagePixelHeightMicrons": mpp}
        status, payload, _ = request(srv, "POST", "/v1/plan", body if model is None else {**body, "model": model})
        assert status == 200, payload
        return payload["model"], payload["downsample"], payload["modelPixelSizeMicrons"], len(payload["chunks"])

    assert plan(server, 0.5) == ("blind-20x", 1.0, 0.5, 1)  # the server's default: auto
    assert plan(server, 0.25) == ("dannucnet-monuseg", 1.0, 0.25, 1)
    assert plan(server, 0.5, "dannucnet-monuseg")[:3] == ("dannucnet-monuseg", 0.5, 0.25)  # asked: read upsampled
    assert plan(fast_server, 0.25)[:2] == ("fast-40x", 1.0)  # the server's default: auto-fast
    assert plan(fast_server, 0.25, "auto")[0] == "dannucnet-monuseg"
    status, payload, _ = request(server, "POST", "/v1/plan", {"imageWidth": 600, "imageHeight": 400,
                                                              "imagePixelWidthMicrons": 0.5, "model": "nope"})
    assert status == 400 and "unknown model 'nope'" in payload["error"]["message"]
    # a client reading pixels itself reads them at the pixel size of the model it names
    from dannucnet.jobs.segmenters import ServerSegmenter

    segmenter = ServerSegmenter(server.grpc_address, token=TOKEN, model="auto")
    segmenter.choose_for(0.5)
    assert (segmenter.client.model, segmenter.model_mpp) == ("blind-20x", 0.5)
    assert ServerSegmenter(server.grpc_address, token=TOKEN, model="dannucnet-monuseg").model_mpp == 0.25


def test_segment_via_server_reads_a_20x_slide_for_the_20x_model(server, tmp_path, caplog):
    slide = tmp_path / "slide20.tif"
    write_synthetic_slide(slide, (320, 256), seed=5, mpp=0.5)
    out = tmp_path / "out.geojson"
    with caplog.at_level(logging.INFO):
        assert main(["segment", str(slide), "-o", str(out), "-q", "--server", server.grpc_address,
                     "--token", TOKEN]) == 0
    assert f"--model auto on {server.grpc_address}: image at 0.5 µm/px: blind-20x" in caplog.text
    assert _features(out) == []  # the blind 20× model ran; the 40× model would have found nuclei
