"""PlanRegion (POST /v1/plan and gRPC) against a real server on loopback: the plan is the pipeline's.

The QuPath script asks the server how to cut a parent into chunks instead of carrying its own
planner; these tests hold the server to the slide path's planner (``plan_slide``) and pixel-size
rule (``combine_xy``), and to clips that own exactly what the whole ROI owns.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import Polygon, box

from dannucnet.engine import Predictor
from dannucnet.engine.tiling import WindowGrid
from dannucnet.geometry.ownership import Rect
from dannucnet.model import DANNucNet, ModelCard, ModelConfig, load_model, save_model
from dannucnet.pipeline import SegmentOptions
from dannucnet.pipeline.slide import plan_slide
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service._generated.v1 import segmentation_pb2_grpc as pb_grpc
from dannucnet.service.plan import _Extent
from dannucnet.service.server import Server, ServerConfig

TOKEN = "plan-test-token-0123456789"
MODEL_MPP = 0.25
WINDOWS = WindowGrid(64, 32)  # the tiny model's 64 px windows, the predictor's default 32 px overlap


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("model") / "tiny"
    torch.manual_seed(0)
    save_model(path, DANNucNet(ModelConfig(base_filters=16, depth=2)).eval(),
               ModelCard(name="tiny", version="1", tile_size=64, mpp=MODEL_MPP))
    config = ServerConfig(host="127.0.0.1", port=0, http_port=0, token=TOKEN)
    srv = Server(Predictor(load_model(str(path)), device="cpu"), config).start()
    yield srv
    srv.stop(grace=2)


def post_plan(server, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v1/plan", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def rect(r: dict) -> Polygon:
    return box(r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"])


def wkb64(geom) -> str:
    return base64.b64encode(shapely.to_wkb(geom)).decode()


def expected_plan(width, height, mpp, roi=None, region=None, chunk_size=2048):
    plan = plan_slide(_Extent(width, height, mpp), MODEL_MPP, region, [roi] if roi is not None else None,
                      SegmentOptions(chunk_size=chunk_size, skip_background=False), WINDOWS)
    return plan, [(c.read.to_int(), c.core) for c in plan.chunks]


def as_rect(r: dict) -> Rect:
    return Rect(r.get("x", 0.0), r.get("y", 0.0), r.get("width", 0.0), r.get("height", 0.0))


def test_whole_image_plan_is_the_slide_planner_s(server):
    status, out = post_plan(server, {"imageWidth": 9000, "imageHeight": 5000, "imagePixelWidthMicrons": 0.1245,
                                     "imagePixelHeightMicrons": 0.1245, "chunkSize": 1024})
    assert status == 200, out
    plan, chunks = expected_plan(9000, 5000, 0.1245, chunk_size=1024)
    assert out["downsample"] == pytest.approx(plan.downsample) == pytest.approx(0.25 / 0.1245)
    assert out["pixelSizeMicrons"] == pytest.approx(0.1245) and out["pixelSizeProblem"] == ""
    assert out["pixelSizeSource"] == "the image's calibration" and out["modelPixelSizeMicrons"] == MODEL_MPP
    assert [(as_rect(c["read"]), as_rect(c["core"])) for c in out["chunks"]] == chunks
    assert len(chunks) == 15 and all("clipWkb" not in c or c["clipWkb"] == "" for c in out["chunks"])
    # the cores partition the image; every read is whole pixels inside the image
    cores = [rect(c["core"]) for c in out["chunks"]]
    assert sum(c.area for c in cores) == pytest.approx(9000 * 5000)
    assert shapely.union_all(cores).equals(box(0, 0, 9000, 5000))
    for c in out["chunks"]:
        r = c["read"]
        assert all(float(r.get(k, 0)).is_integer() for k in ("x", "y", "width", "height"))
        assert box(0, 0, 9000, 5000).contains(rect(r)) and rect(r).contains(rect(c["core"]))


def test_roi_plan_owns_exactly_what_the_roi_owns(server):
    roi = Polygon([(300, 200), (5200, 900), (4700, 4300), (900, 3800), (2500, 2000)])  # concave
    status, out = post_plan(server, {"imageWidth": 6000, "imageHeight": 5000, "imagePixelWidthMicrons": 0.25,
                                     "imagePixelHeightMicrons": 0.25, "roiWkb": wkb64(roi), "chunkSize": 512})
    assert status == 200, out
    plan, chunks = expected_plan(6000, 5000, 0.25, roi=roi, chunk_size=512)
    got = [(as_rect(c["read"]), as_rect(c["core"])) for c in out["chunks"]]
    assert set(got) <= set(chunks) and len(got) >= len(chunks) - 2  # only cores touching the ROI by a line may go
    rng = np.random.default_rng(0)
    points = rng.uniform([0, 0], [6000, 5000], size=(4000, 2))
    owners = np.zeros(len(points), dtype=int)
    for c in out["chunks"]:
        core = as_rect(c["core"])
        in_core = core.contains(points[:, 0], points[:, 1])
        clip = shapely.from_wkb(base64.b64decode(c["clipWkb"])) if c.get("clipWkb") else None
        if clip is None:  # no clip: the core lies inside the ROI
            assert roi.contains(core.to_polygon())
            owners += in_core
        else:
            assert clip.is_valid and clip.geom_type in ("Polygon", "MultiPolygon")
            owners += in_core & shapely.contains_xy(clip, points[:, 0], points[:, 1])
    inside = shapely.contains_xy(roi, points[:, 0], points[:, 1])
    assert np.array_equal(owners, inside.astype(int))  # every point in the ROI owned once, none outside


def test_self_intersecting_roi_is_repaired(server):
    bowtie = Polygon([(100, 100), (900, 900), (900, 100), (100, 900)])
    status, out = post_plan(server, {"imageWidth": 1000, "imageHeight": 1000, "pixelSizeMicrons": 0.25,
                                     "roiWkb": wkb64(bowtie)})
    assert status == 200, out
    assert out["pixelSizeSource"] == "the requested pixelSizeMicrons"
    clips = [shapely.from_wkb(base64.b64decode(c["clipWkb"])) for c in out["chunks"]]
    assert len(clips) == 1 and clips[0].is_valid and clips[0].area == pytest.approx(2 * 800 * 400 / 2, rel=1e-6)


@pytest.mark.parametrize(("body", "problem"), [
    ({}, "the image's calibration has no usable pixel size"),
    ({"imagePixelWidthMicrons": 352.77777, "imagePixelHeightMicrons": 352.77777}, "72 dpi"),
    ({"imagePixelWidthMicrons": 0.25, "pixelSizeMicrons": 96.0}, "requested pixelSizeMicrons says 96"),
])
def test_pixel_size_verdict(server, body, problem):
    status, out = post_plan(server, {"imageWidth": 800, "imageHeight": 600, **body})
    assert status == 200, out
    assert problem in out["pixelSizeProblem"] and out["pixelSizeProblem"].startswith("missing: ")
    assert out["pixelSizeMicrons"] == 0 and out.get("chunks", []) == []


def test_uncalibrated_override_and_odd_axes(server):
    _, out = post_plan(server, {"imageWidth": 800, "imageHeight": 600, "imagePixelWidthMicrons": 0.5,
                                "imagePixelHeightMicrons": 0.52})
    assert out["pixelSizeMicrons"] == pytest.approx(0.51) and "differ" in out["pixelSizeSource"]
    assert out["downsample"] == pytest.approx(0.25 / 0.51)  # a coarser image is read enlarged
    _, out = post_plan(server, {"imageWidth": 800, "imageHeight": 600, "pixelSizeMicrons": 0.2505})
    assert out["downsample"] == 1.0  # within 1 % of the model: read as is


def test_parent_outside_the_image_plans_nothing(server):
    status, out = post_plan(server, {"imageWidth": 800, "imageHeight": 600, "pixelSizeMicrons": 0.25,
                                     "roiWkb": wkb64(box(900, 900, 1000, 1000))})
    assert status == 200 and out.get("chunks", []) == [] and out["pixelSizeProblem"] == ""


@pytest.mark.parametrize(("body", "message"), [
    ({"imageWidth": 0, "imageHeight": 600}, "imageWidth"),
    ({"imageWidth": 800, "imageHeight": 600, "roiWkb": base64.b64encode(b"nonsense").decode()},
     "roiWkb is not valid area WKB"),  # the walk every WKB field gets (service.wkb), before shapely
    ({"imageWidth": 800, "imageHeight": 600, "roiWkb": wkb64(shapely.LineString([(0, 0), (5, 5)]))},
     "holds a LineString; send a Polygon or MultiPolygon (an area)"),
    ({"imageWidth": 800, "imageHeight": 600, "chunkSize": 64}, "chunk size"),
    ({"imageWidth": 800, "imageHeight": 600, "options": {"threshold": 2}}, "options.threshold"),
    ({"imageWidth": 800, "imageHeight": 600, "chunks": 3}, "PlanRegionRequest"),
    # a made-up size: 2**63 px a side had the server plan until it ran out of memory
    ({"imageWidth": str(2**63 - 1), "imageHeight": str(2**63 - 1)}, "1 to 2147483648"),
    # QuPath's largest size, whole: a million chunks a side, refused before one is planned
    ({"imageWidth": 2**31 - 1, "imageHeight": 2**31 - 1}, "more than the 1,000,000 one plan may hold"),
])
def test_bad_requests_get_one_clear_error(server, body, message):
    status, out = post_plan(server, {"pixelSizeMicrons": 0.25, **body})
    assert status == 400 and message in out["error"]["message"], out


def test_grpc_door_gives_the_same_plan(server):
    request = pb.PlanRegionRequest(image_width=3000, image_height=2000, pixel_size_microns=0.25,
                                   roi_wkb=shapely.to_wkb(box(100, 100, 2500, 1500)), chunk_size=512)
    channel = grpc.insecure_channel(server.grpc_address)
    try:
        stub = pb_grpc.SegmentationStub(channel)
        answer = stub.PlanRegion(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
    finally:
        channel.close()
    from google.protobuf import json_format

    _, out = post_plan(server, json.loads(json_format.MessageToJson(request)))
    assert json_format.MessageToDict(answer, always_print_fields_with_no_presence=True) == out
    assert len(answer.chunks) > 1
