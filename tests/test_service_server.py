"""The server end to end: real gRPC and HTTP servers on loopback, started and stopped here.

The model is a tiny DAN-NucNet whose weights are set by hand so that it
answers "is this pixel dark?" (probability = sigmoid(40·(darkness − 0.4))): it
runs in milliseconds on a CPU, finds the nuclei of the synthetic H&E images,
and — being pixel-local — gives the same probability wherever a window falls,
so "chunked equals single request" can be checked exactly.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import shapely
import shapely.geometry
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from dannucnet.client import DanNucNetClient, ServerError, segment_image_via_server, segment_large_region
from dannucnet.engine import Predictor
from dannucnet.engine.tiling import WindowGrid
from dannucnet.errors import CancelledError, InputError
from dannucnet.geometry.ownership import Rect
from dannucnet.model import DANNucNet, ModelCard, ModelConfig, load_model, save_model
from dannucnet.pipeline import SegmentOptions, segment_region, segment_slide
from dannucnet.pipeline.remote import ServerStep
from dannucnet.pipeline.slide import InProcessStep
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service._generated.v1 import segmentation_pb2_grpc as pb_grpc
from dannucnet.service.limits import Limits
from dannucnet.service.server import Server, ServerConfig
from dannucnet.slides import open_image
from dannucnet.slides.synthetic import make_synthetic_he, write_synthetic_slide

TOKEN = "test-token-0123456789abcdef"
MPP = 0.25
TILE, OVERLAP = 64, 16  # window stride 48


# ---- fixtures ------------------------------------------------------------------
def darkness_network(level: float = 0.4, gain: float = 40.0, depth: int = 2) -> DANNucNet:
    """A DAN-NucNet whose only live path computes sigmoid(gain·(1 − mean(rgb) − level)) per pixel."""
    net = DANNucNet(ModelConfig(base_filters=16, depth=depth)).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.zero_()
                m.bias.zero_()
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1)
        f = net.config.base_filters
        enc = net.encoders[0]
        enc.shortcut[0].weight[0, :, 0, 0] = -1 / 3  # darkness = 1 - mean(rgb)
        enc.shortcut[0].bias[0] = 1.0
        enc.fuse.weight[0, f, 1, 1] = 1.0
        dec = net.decoders[-1]
        dec.spatial_e.spread.bias.fill_(20.0)  # attention gates open (sigmoid(20) ≈ 1)
        dec.channel_out.bias.fill_(20.0)
        dec.fuse[0].weight[0, 0, 1, 1] = 1.0
        net.head[0].weight[0, 0, 1, 1] = 1.0
        net.head[2].weight[0, 0, 0, 0] = gain
        net.head[2].bias[0] = -gain * level
    return net


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)  # 2 shared cores: one intra-op thread is much faster under load
    path = tmp_path_factory.mktemp("model") / "darkness"
    save_model(path, darkness_network(), ModelCard(name="darkness", version="test", tile_size=TILE, mpp=MPP))
    return path


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor(load_model(str(model_dir)), device="cpu", overlap=OVERLAP)


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(root / "small.tif", (640, 512), seed=4)
    (root / "notes.txt").write_text("not an image")
    secret = root.parent / "secret.tif"
    shutil.copy(root / "small.tif", secret)
    (root / "escape.tif").symlink_to(secret)
    return root


def start_server(predictor, **overrides) -> Server:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        http_port=0,
        token=TOKEN,
        limits=Limits(max_message_bytes=4 * 1024 * 1024, max_pixels=1024 * 1024),
        max_batch=8,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return Server(predictor, config).start()


@pytest.fixture(scope="module")
def server(predictor, slide_root):
    srv = start_server(predictor, slide_roots=[str(slide_root)])
    yield srv
    srv.stop(grace=2)


@pytest.fixture(scope="module")
def client(server):
    with DanNucNetClient(server.grpc_address, token=TOKEN, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_address)
    yield pb_grpc.SegmentationStub(channel)
    channel.close()


AUTH = (("authorization", f"Bearer {TOKEN}"),)


# ---- helpers ---------------------------------------------------------------------
def request(server, method, path, body=None, headers=None, token=TOKEN, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)
    hdrs = dict(headers or {})
    if token:
        hdrs.setdefault("Authorization", f"Bearer {token}")
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        payload = json.loads(data) if data else None
    except json.JSONDecodeError:
        payload = data
    return resp.status, payload, resp


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def tiff(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="TIFF")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def signature(nuclei) -> list[tuple[float, float, float]]:
    """Order-free comparable form: (centroid x, centroid y, area), rounded like GeoJSON output."""
    out = []
    for n in nuclei:
        c = n.polygon.centroid
        out.append((round(c.x, 1), round(c.y, 1), round(n.polygon.area, 0)))
    return sorted(out)


def geojson_signature(collection) -> list[tuple[float, float, float]]:
    out = []
    for f in collection["features"]:
        poly = shapely.geometry.shape(f["geometry"])
        out.append((round(poly.centroid.x, 1), round(poly.centroid.y, 1), round(poly.area, 0)))
    return sorted(out)


@pytest.fixture(scope="module")
def image():
    return make_synthetic_he(240, 176, seed=2, density=6000).rgb


# ---- model info, health ------------------------------------------------------------
def test_model_info_and_health_on_both_transports(server, client):
    info = client.model_info()
    assert (info.name, info.api_version, info.tile_size, info.pixel_size_microns) == ("darkness", "v1", TILE, MPP)
    assert info.slide_segmentation_enabled and info.max_pixels == 1024 * 1024 and info.window_overlap == OVERLAP
    status, body, _ = request(server, "GET", "/v1/model")
    assert status == 200 and body["name"] == "darkness" and body["apiVersion"] == "v1"
    assert body["windowOverlap"] == OVERLAP
    assert body["pixelSizeMicrons"] == MPP and body["trained"] is False and "serverVersion" in body
    assert request(server, "GET", "/healthz", token=None)[:2] == (200, {"status": "SERVING"})
    with grpc.insecure_channel(server.grpc_address) as channel:  # health needs no token
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="dannucnet.v1.Segmentation"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            metadata=AUTH)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "dannucnet.v1.Segmentation" in names and "grpc.health.v1.Health" in names


# ---- round trip -------------------------------------------------------------------
def test_round_trip_grpc_http_in_process_agree(server, client, predictor, image):
    origin, ds, mpp = (1000.0, 2000.0), 2.0, MPP / 2  # region pixels at 0.25 µm/px: no resampling
    local = segment_region(predictor, image, origin=origin, downsample=ds, mpp=mpp).nuclei
    assert len(local) >= 5
    expected = signature(local)
    assert signature(client.segment_region(image, origin=origin, downsample=ds, mpp=mpp)) == expected
    assert signature(client.segment_region(png(image), origin=origin, downsample=ds, mpp=mpp)) == expected
    body = {"image": {"encoded": b64(png(image))}, "originX": 1000, "originY": 2000, "downsample": 2,
            "pixelSizeMicrons": mpp}
    status, fc, _ = request(server, "POST", "/v1/segment", body)
    assert status == 200, fc
    assert fc["type"] == "FeatureCollection" and fc["summary"]["nuclei"] == len(local)
    assert geojson_signature(fc) == expected
    props = fc["features"][0]["properties"]
    assert props["objectType"] == "detection" and props["classification"]["name"] == "Nucleus"
    assert isinstance(props["measurements"], dict)
    status, fc2, _ = request(server, "POST",
                             f"/v1/segment?originX=1000&originY=2000&downsample=2&pixelSizeMicrons={mpp}",
                             tiff(image), {"Content-Type": "image/tiff"})
    assert status == 200 and geojson_signature(fc2) == expected
    raw = {"image": {"raw": {"data": b64(image.tobytes()), "width": 240, "height": 176}}, "originX": 1000,
           "originY": 2000, "downsample": 2, "pixelSizeMicrons": mpp}
    status, proto_json, _ = request(server, "POST", "/v1/segment?alt=json", raw)
    assert status == 200 and proto_json["nucleusCount"] == len(local)
    polys = [shapely.from_wkb(base64.b64decode(n["polygonWkb"])) for n in proto_json["nuclei"]]
    assert sorted((round(p.centroid.x, 1), round(p.centroid.y, 1), round(p.area, 0)) for p in polys) == expected


def test_cells_and_stains_on_both_transports(server, client, predictor, image):
    from dannucnet.geometry.qupath_stains import parse_stains

    stains = parse_stains('{"Hematoxylin": [0.6, 0.7, 0.3], "Eosin": [0.1, 0.9, 0.3], "Background": [250, 250, 250]}')
    options = SegmentOptions(cell_expansion_um=3.0, stains=stains)
    local = segment_region(predictor, image, mpp=MPP, options=options).nuclei
    assert len(local) >= 5 and all(n.cell is not None and n.cell.covers(n.polygon) for n in local)

    def cells(nuclei):
        return sorted((round(n.polygon.centroid.x, 2), round(n.polygon.centroid.y, 2), round(n.cell.area, 2),
                       round(n.measurements["Cytoplasm: Eosin OD mean"], 5)) for n in nuclei)

    assert cells(client.segment_region(image, mpp=MPP, options=options)) == cells(local)
    body = {"image": {"encoded": b64(png(image))}, "pixelSizeMicrons": MPP,
            "options": {"cellExpansionMicrons": 3,
                        "stains": {"name": "mine", "stains": [{"name": "Hematoxylin", "r": 0.6, "g": 0.7, "b": 0.3},
                                                              {"name": "Eosin", "r": 0.1, "g": 0.9, "b": 0.3}],
                                   "maxRed": 250, "maxGreen": 250, "maxBlue": 250}}}
    status, fc, _ = request(server, "POST", "/v1/segment", body)
    assert status == 200, fc
    assert len(fc["features"]) == len(local)
    for f in fc["features"]:
        assert f["properties"]["objectType"] == "cell" and f["properties"]["name"] == "dannucnet:darkness@test"
        assert shapely.geometry.shape(f["geometry"]).covers(shapely.geometry.shape(f["nucleusGeometry"]))
    by_centroid = {(round(n.polygon.centroid.x, 2), round(n.polygon.centroid.y, 2)): n for n in local}
    for f in fc["features"]:
        c = shapely.geometry.shape(f["nucleusGeometry"]).centroid
        n = by_centroid[(round(c.x, 2), round(c.y, 2))]
        assert f["properties"]["measurements"]["Cell: Hematoxylin OD mean"] == pytest.approx(
            n.measurements["Cell: Hematoxylin OD mean"])
    status, plain, _ = request(server, "POST", "/v1/segment", {k: v for k, v in body.items() if k != "options"})
    assert status == 200 and all(f["properties"]["objectType"] == "detection" for f in plain["features"])
    for bad, word in (({"cellExpansionMicrons": 30}, "cellExpansionMicrons"),
                      ({"stains": {"stains": [{"name": "H", "r": 1}]}}, "stains")):
        status, err, _ = request(server, "POST", "/v1/segment", {**body, "options": bad})
        assert status == 400 and word in json.dumps(err), err


def test_core_and_clip_select_by_centroid(client, image):
    everything = client.segment_region(image, mpp=MPP)
    core = Rect(0, 0, 120, 176)
    left = client.segment_region(image, mpp=MPP, core=core)
    assert 0 < len(left) < len(everything)
    assert all(core.contains(*n.centroid) for n in left)
    clip = shapely.box(120, 0, 240, 176)
    right = client.segment_region(image, mpp=MPP, clip=clip)
    assert len(left) + len(right) == len(everything)


def test_chunked_client_equals_single_request(client):
    rgb = make_synthetic_he(496, 112, seed=5, density=4000).rgb  # 496 = 64 + 9·48, so window grids line up
    origin = (3000.0, 500.0)
    single = client.segment_region(rgb, origin=origin, mpp=MPP)
    chunked = segment_large_region(client, rgb, origin=origin, mpp=MPP, chunk_size=248, margin=56, concurrency=2)
    assert len(single) >= 8
    assert signature(chunked) == signature(single)
    assert len({n.centroid for n in chunked}) == len(chunked)  # no duplicates


def test_segment_image_via_server_equals_standalone(client, predictor, slide_root):
    options = SegmentOptions(chunk_size=256, margin=64)
    with open_image(slide_root / "small.tif") as source:
        local = [n for batch in segment_slide(predictor, source, options=options) for n in batch]
        seen = []
        remote = [
            n for batch in segment_image_via_server(client, source, options=options, progress=lambda *a: seen.append(a))
            for n in batch
        ]
    assert len(local) > 10 and signature(remote) == signature(local)
    assert seen[-1][0] == seen[-1][1] > 1
    # the client plans its chunks on the server's windows, as the in-process step does on its own
    assert ServerStep(client).windows == InProcessStep(predictor).windows == WindowGrid(TILE, OVERLAP)


# ---- SegmentSlide -------------------------------------------------------------------
def test_segment_slide_streams_on_both_transports(server, client, predictor, slide_root):
    with open_image(slide_root / "small.tif") as source:
        local = [n for batch in segment_slide(predictor, source) for n in batch]
    progress = []
    remote = [n for batch in client.segment_slide("small.tif", progress=lambda *a: progress.append(a)) for n in batch]
    assert signature(remote) == signature(local) and progress[-1][0] == progress[-1][1]
    status, lines, resp = None, None, None
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("POST", "/v1/slide", body=json.dumps({"path": "small.tif"}),
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    status = resp.status
    lines = [json.loads(line) for line in resp.read().decode().splitlines()]
    conn.close()
    assert status == 200 and resp.headers["Content-Type"] == "application/x-ndjson"
    assert "slide" in lines[0] and "summary" in lines[-1]
    assert int(lines[-1]["summary"]["nucleusCount"]) == len(local)
    assert sum(len(line["nuclei"]["nuclei"]) for line in lines if "nuclei" in line) == len(local)


def test_cancelled_segment_slide_stops_within_a_second(server, slide_root):
    write_synthetic_slide(slide_root / "big.tif", 1536, seed=6)  # one 1536² chunk: ~1000 windows, tens of seconds
    stats = server.batched.batcher.stats
    with DanNucNetClient(server.grpc_address, token=TOKEN) as c:
        stream = c.segment_slide("big.tif")
        started = stats.items
        worker = threading.Thread(target=lambda: _try(lambda: next(stream, None)), daemon=True)
        worker.start()
        deadline = time.monotonic() + 30
        while stats.items < started + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats.items >= started + 8, "the slide never started"
        stream.cancel()  # from another thread than the one reading it
        cancelled_at = time.monotonic()
    time.sleep(1.0)
    after_one_second = stats.items
    time.sleep(1.5)
    assert stats.items == after_one_second, "tiles still being computed more than a second after cancel"
    assert time.monotonic() - cancelled_at < 10
    deadline = time.monotonic() + 5
    while server.service.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.service.active == 0
    assert request(server, "GET", "/v1/model")[0] == 200


# ---- bad inputs ------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


SMALL = make_synthetic_he(64, 64, seed=7).rgb
SMALL_PNG = png(SMALL)
SMALL_TIFF = tiff(SMALL)
GOOD = {"image": {"encoded": b64(SMALL_PNG)}, "pixelSizeMicrons": MPP}
BOWTIE = shapely.Polygon([(0, 0), (60, 60), (60, 0), (0, 60)])


def with_(**fields):
    body = json.loads(json.dumps(GOOD))
    for key, value in fields.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


# (name, method, path, body, headers, token, expected HTTP status, words the message must contain)
HTTP_CASES = [
    ("empty png body", "POST", "/v1/segment?pixelSizeMicrons=0.25", b"", {"Content-Type": "image/png"}, TOKEN, 400,
     "empty"),
    ("empty json body", "POST", "/v1/segment", b"", {"Content-Type": "application/json"}, TOKEN, 400, "empty"),
    ("corrupt png", "POST", "/v1/segment?pixelSizeMicrons=0.25", SMALL_PNG[:8] + b"garbage" * 20,
     {"Content-Type": "image/png"}, TOKEN, 400, "PNG"),
    ("truncated png", "POST", "/v1/segment?pixelSizeMicrons=0.25", SMALL_PNG[: len(SMALL_PNG) // 2],
     {"Content-Type": "image/png"}, TOKEN, 400, "truncated"),
    ("truncated tiff", "POST", "/v1/segment?pixelSizeMicrons=0.25", SMALL_TIFF[: len(SMALL_TIFF) // 2],
     {"Content-Type": "image/tiff"}, TOKEN, 400, "TIFF"),
    ("1x1 png", "POST", "/v1/segment?pixelSizeMicrons=0.25", png(SMALL[:1, :1]), {"Content-Type": "image/png"},
     TOKEN, 400, "1×1"),
    ("0x0 raw", "POST", "/v1/segment", with_(image={"raw": {"data": "", "width": 0, "height": 0}}), None, TOKEN, 400,
     "must be positive"),
    ("raw declares 100k x 100k", "POST", "/v1/segment",
     with_(image={"raw": {"data": b64(b"\0" * 30), "width": 100000, "height": 100000}}), None, TOKEN, 400, "limit"),
    ("png header declares 100k x 100k", "POST", "/v1/segment?pixelSizeMicrons=0.25", _png_header(100000, 100000),
     {"Content-Type": "image/png"}, TOKEN, 400, "split the region"),
    ("raw size mismatch", "POST", "/v1/segment",
     with_(image={"raw": {"data": b64(b"\0" * 100), "width": 64, "height": 64}}), None, TOKEN, 400, "needs"),
    ("negative origin", "POST", "/v1/segment", with_(originX=-5), None, TOKEN, 400, "originX"),
    ("NaN origin", "POST", "/v1/segment", with_(originY="NaN"), None, TOKEN, 400, "finite"),
    ("infinite downsample", "POST", "/v1/segment", with_(downsample="Infinity"), None, TOKEN, 400, "downsample"),
    ("zero downsample", "POST", "/v1/segment", with_(downsample=0), None, TOKEN, 400, "greater than 0"),
    ("negative pixel size", "POST", "/v1/segment", with_(pixelSizeMicrons=-0.25), None, TOKEN, 400, "pixelSizeMicrons"),
    ("72 dpi pixel size", "POST", "/v1/segment", with_(pixelSizeMicrons=352.8), None, TOKEN, 400, "dpi"),
    ("missing pixel size", "POST", "/v1/segment", with_(pixelSizeMicrons=None), None, TOKEN, 400, "missing"),
    ("missing image", "POST", "/v1/segment", {"pixelSizeMicrons": 0.25}, None, TOKEN, 400, "image is missing"),
    ("clip not WKB", "POST", "/v1/segment", with_(clipWkb=b64(b"not a geometry")), None, TOKEN, 400, "WKB"),
    ("clip self-intersecting", "POST", "/v1/segment", with_(clipWkb=b64(shapely.to_wkb(BOWTIE))), None, TOKEN, 400,
     "not a valid polygon"),
    ("clip elsewhere", "POST", "/v1/segment", with_(clipWkb=b64(shapely.to_wkb(shapely.box(5000, 5000, 5100, 5100)))),
     None, TOKEN, 400, "does not overlap"),
    ("clip is a line", "POST", "/v1/segment", with_(clipWkb=b64(shapely.to_wkb(shapely.LineString([(0, 0), (9, 9)])))),
     None, TOKEN, 400, "LineString"),
    ("core elsewhere", "POST", "/v1/segment", with_(core={"x": 900, "y": 900, "width": 10, "height": 10}), None, TOKEN,
     400, "does not overlap"),
    ("core negative width", "POST", "/v1/segment", with_(core={"x": 0, "y": 0, "width": -10, "height": 10}), None,
     TOKEN, 400, "positive"),
    ("threshold above 1", "POST", "/v1/segment", with_(options={"threshold": 1.5}), None, TOKEN, 400, "threshold"),
    ("negative min area", "POST", "/v1/segment", with_(options={"minAreaMicrons2": -1}), None, TOKEN, 400, "minArea"),
    ("unknown json field", "POST", "/v1/segment", with_(colour="blue"), None, TOKEN, 400, "colour"),
    ("unknown query parameter", "POST", "/v1/segment?pixelSize=0.25", SMALL_PNG, {"Content-Type": "image/png"}, TOKEN,
     400, "pixelSize"),
    ("non-numeric query", "POST", "/v1/segment?pixelSizeMicrons=abc", SMALL_PNG, {"Content-Type": "image/png"}, TOKEN,
     400, "abc"),
    ("wrong content type", "POST", "/v1/segment", b"hello", {"Content-Type": "text/plain"}, TOKEN, 415, "Content-Type"),
    ("malformed json", "POST", "/v1/segment", b'{"image": ', {"Content-Type": "application/json"}, TOKEN, 400, "JSON"),
    ("json array", "POST", "/v1/segment", b"[1, 2]", {"Content-Type": "application/json"}, TOKEN, 400, "JSON"),
    ("non-utf8 json", "POST", "/v1/segment", b"\xff\xfe{", {"Content-Type": "application/json"}, TOKEN, 400, "UTF-8"),
    ("missing token", "POST", "/v1/segment", GOOD, None, None, 401, "missing token"),
    ("wrong token", "POST", "/v1/segment", GOOD, None, "x" * 26, 401, "invalid token"),
    ("basic auth", "GET", "/v1/model", None, {"Authorization": "Basic dXNlcjpwYXNz"}, None, 401, "Bearer"),
    ("unknown path", "GET", "/v2/model", None, None, TOKEN, 404, "endpoints"),
    ("wrong method", "GET", "/v1/segment", None, None, TOKEN, 405, "POST"),
    ("bad timeout header", "POST", "/v1/segment", GOOD, {"X-Timeout-Seconds": "soon"}, TOKEN, 400, "X-Timeout-Seconds"),
    ("bad alt", "POST", "/v1/segment?alt=xml", GOOD, None, TOKEN, 400, "alt"),
    ("slide path traversal", "POST", "/v1/slide", {"path": "../secret.tif"}, None, TOKEN, 403, "outside"),
    ("slide symlink escape", "POST", "/v1/slide", {"path": "escape.tif"}, None, TOKEN, 403, "outside"),
    ("slide absolute path", "POST", "/v1/slide", {"path": "/etc/passwd"}, None, TOKEN, 403, "outside"),
    ("slide missing", "POST", "/v1/slide", {"path": "nope.tif"}, None, TOKEN, 404, "not found"),
    ("slide not an image", "POST", "/v1/slide", {"path": "notes.txt"}, None, TOKEN, 400, "notes.txt"),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_http_input(server, case):
    name, method, path, body, headers, token, expected, words = case
    status, payload, resp = request(server, method, path, body, headers, token)
    assert status == expected, payload
    error = payload["error"]
    assert error["code"] == expected and error["status"] and words.lower() in error["message"].lower(), error
    if token and TOKEN in json.dumps(payload):
        pytest.fail("the token leaked into a response")
    assert request(server, "GET", "/v1/model")[0] == 200  # still answering


def test_http_oversized_body_refused_unread(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    conn.putrequest("POST", "/v1/segment")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and "limit" in payload["error"]["message"]
    assert request(server, "GET", "/v1/model")[0] == 200


def test_http_expect_continue_oversized_gets_413_before_upload(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    conn.putrequest("POST", "/v1/segment")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(5 * 1024 * 1024))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["status"] == "RESOURCE_EXHAUSTED"
    conn.close()


def _raw_request(rgb, **fields):
    req = pb.SegmentRegionRequest(pixel_size_microns=MPP, **fields)
    req.image.raw.data = rgb.tobytes()
    req.image.raw.width, req.image.raw.height = rgb.shape[1], rgb.shape[0]
    return req


GRPC_CASES = [
    ("empty request", pb.SegmentRegionRequest(), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "pixelSizeMicrons"),
    ("no image", pb.SegmentRegionRequest(pixel_size_microns=MPP), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "image"),
    ("corrupt jpeg",
     pb.SegmentRegionRequest(pixel_size_microns=MPP, image=pb.Image(encoded=b"\xff\xd8\xff" + b"x" * 50)), AUTH,
     grpc.StatusCode.INVALID_ARGUMENT, "JPEG"),
    ("0x0 raw", pb.SegmentRegionRequest(pixel_size_microns=MPP, image=pb.Image(raw=pb.RawImage())), AUTH,
     grpc.StatusCode.INVALID_ARGUMENT, "positive"),
    ("negative origin", _raw_request(SMALL, origin_y=-1), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "originY"),
    ("infinite origin", _raw_request(SMALL, origin_x=float("inf")), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "finite"),
    ("NaN pixel size", pb.SegmentRegionRequest(pixel_size_microns=float("nan"), image=pb.Image(encoded=SMALL_PNG)),
     AUTH, grpc.StatusCode.INVALID_ARGUMENT, "finite"),
    ("coarse pixels blow up", _raw_request(SMALL, downsample=64.0), AUTH, grpc.StatusCode.INVALID_ARGUMENT,
     "resampled"),
    ("missing token", _raw_request(SMALL), (), grpc.StatusCode.UNAUTHENTICATED, "missing token"),
    ("wrong token", _raw_request(SMALL), (("authorization", "Bearer " + "y" * 26),), grpc.StatusCode.UNAUTHENTICATED,
     "invalid token"),
    ("oversized message", _raw_request(np.zeros((1100, 1300, 3), np.uint8)), AUTH, grpc.StatusCode.RESOURCE_EXHAUSTED,
     "larger than"),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_bad_grpc_input(stub, client, case):
    name, request, metadata, code, words = case
    with pytest.raises(grpc.RpcError) as err:
        stub.SegmentRegion(request, metadata=metadata, timeout=30)
    assert err.value.code() == code and words.lower() in err.value.details().lower(), err.value.details()
    assert client.model_info().name == "darkness"


SLIDE_CASES = [
    ("traversal", "../secret.tif", grpc.StatusCode.PERMISSION_DENIED),
    ("symlink escape", "escape.tif", grpc.StatusCode.PERMISSION_DENIED),
    ("absolute outside", "/etc/hostname", grpc.StatusCode.PERMISSION_DENIED),
    ("missing", "missing.tif", grpc.StatusCode.NOT_FOUND),
    ("empty path", "", grpc.StatusCode.INVALID_ARGUMENT),
    ("not an image", "notes.txt", grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("case", SLIDE_CASES, ids=[c[0] for c in SLIDE_CASES])
def test_bad_slide_paths_grpc(stub, client, case):
    _, path, code = case
    with pytest.raises(grpc.RpcError) as err:
        list(stub.SegmentSlide(pb.SegmentSlideRequest(path=path), metadata=AUTH, timeout=30))
    assert err.value.code() == code, err.value.details()
    assert client.model_info().name == "darkness"


def test_grpc_deadline_stops_the_work(server, client):
    rgb = make_synthetic_he(1000, 1000, seed=8).rgb  # 21 × 21 = 441 windows
    stats = server.batched.batcher.stats
    before = stats.items
    with pytest.raises(ServerError) as err:
        client.segment_region(rgb, mpp=MPP, timeout=0.3)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.0)
    settled = stats.items
    time.sleep(1.0)
    assert stats.items == settled and settled - before < 441  # the work stopped with the deadline


def test_http_client_disconnect_stops_the_work(server):
    import socket

    body = png(make_synthetic_he(1000, 1000, seed=11).rgb)  # 441 windows
    stats = server.batched.batcher.stats
    before = stats.items
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    head = (f"POST /v1/segment?pixelSizeMicrons={MPP} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    deadline = time.monotonic() + 30
    while stats.items < before + 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close()  # the client gives up
    time.sleep(1.0)
    settled = stats.items
    time.sleep(1.0)
    assert stats.items == settled and settled - before < 441
    assert request(server, "GET", "/v1/model")[0] == 200


def test_client_turns_refusals_into_readable_errors(client):
    with pytest.raises(InputError, match="pixelSizeMicrons"):
        client.segment_region(SMALL, mpp=400.0)
    with pytest.raises(ServerError, match="cannot reach"):
        DanNucNetClient("127.0.0.1:1", retries=0).model_info(timeout=2)


# ---- load and back-pressure ----------------------------------------------------------
def test_load_16_clients_x_20_requests(server, predictor):
    images = [make_synthetic_he(64, 64, seed=100 + i).rgb for i in range(4)]
    expected = [signature(segment_region(predictor, im, mpp=MPP).nuclei) for im in images]
    errors: list[str] = []

    def grpc_worker(k):
        with DanNucNetClient(server.grpc_address, token=TOKEN, retries=0) as c:
            for i in range(20):
                j = (k + i) % 4
                got = signature(c.segment_region(images[j], mpp=MPP))
                if got != expected[j]:
                    errors.append(f"grpc client {k} request {i}: wrong nuclei")

    def http_worker(k):
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)  # keep-alive
        for i in range(20):
            j = (k + i) % 4
            conn.request("POST", f"/v1/segment?pixelSizeMicrons={MPP}", body=png(images[j]),
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            if resp.status != 200 or geojson_signature(body) != expected[j]:
                errors.append(f"http client {k} request {i}: {resp.status}")
        conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(grpc_worker if k % 2 else http_worker, k) for k in range(16)]
        for f in futures:
            f.result()
    elapsed = time.perf_counter() - started
    assert errors == []
    assert server.batched.batcher.stats.largest_batch > 1  # tiles of different requests shared a batch
    print(f"320 requests in {elapsed:.1f} s")


def test_full_queue_gives_back_pressure_not_a_crash(predictor):
    srv = start_server(predictor, limits=Limits(max_pending=2, max_pixels=1024 * 1024))
    try:
        rgb = make_synthetic_he(256, 256, seed=9).rgb
        body = png(rgb)

        def one(_):
            return request(srv, "POST", f"/v1/segment?pixelSizeMicrons={MPP}", body, {"Content-Type": "image/png"})

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(10)))
        statuses = sorted(r[0] for r in results)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        busy = next(r for r in results if r[0] == 429)
        assert busy[1]["error"]["status"] == "RESOURCE_EXHAUSTED" and busy[2].headers["Retry-After"] == "1"
        with DanNucNetClient(srv.grpc_address, token=TOKEN, retries=0) as c:
            with ThreadPoolExecutor(6) as pool:
                outcomes = list(pool.map(lambda _: _try(lambda: c.segment_region(rgb, mpp=MPP)), range(6)))
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes and "ok" in outcomes
            assert len(c.segment_region(rgb, mpp=MPP)) > 0  # and it recovers
    finally:
        srv.stop(grace=2)


def _try(fn):
    try:
        fn()
        return "ok"
    except (ServerError, CancelledError) as exc:
        return getattr(exc, "code", "cancelled")


# ---- security and lifecycle -------------------------------------------------------
def test_non_loopback_bind_needs_a_token(predictor):
    with pytest.raises(InputError, match="token"):
        Server(predictor, ServerConfig(host="0.0.0.0", port=0, http_port=0))
    from dannucnet.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--http-port", "0"]) == 2


def test_slide_segmentation_disabled_without_root(predictor):
    srv = start_server(predictor)
    try:
        with DanNucNetClient(srv.grpc_address, token=TOKEN) as c:
            assert not c.model_info().slide_segmentation_enabled
            with pytest.raises(ServerError) as err:
                list(c.segment_slide("small.tif"))
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--slide-root" in str(err.value)
        status, payload, _ = request(srv, "POST", "/v1/slide", {"path": "small.tif"})
        assert status == 400 and "--slide-root" in payload["error"]["message"]
    finally:
        srv.stop(grace=2)


def test_graceful_stop_finishes_running_requests(predictor):
    srv = start_server(predictor)
    rgb = make_synthetic_he(400, 400, seed=10).rgb
    result = {}

    def slow():
        result["status"] = request(srv, "POST", f"/v1/segment?pixelSizeMicrons={MPP}", png(rgb),
                                {"Content-Type": "image/png"})[0]
        with DanNucNetClient(srv.grpc_address, token=TOKEN, retries=0):
            pass

    def slow_grpc():
        with DanNucNetClient(srv.grpc_address, token=TOKEN, retries=0) as c:
            result["grpc"] = len(c.segment_region(rgb, mpp=MPP))

    threads = [threading.Thread(target=slow), threading.Thread(target=slow_grpc)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while srv.service.active < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    srv.stop(grace=30)
    for t in threads:
        t.join(30)
    assert result == {"status": 200, "grpc": result["grpc"]} and result["grpc"] > 0
    with pytest.raises(OSError):
        request(srv, "GET", "/healthz", timeout=2)


def test_tls_on_both_transports(predictor, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not found: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    srv = start_server(predictor, tls_cert=str(cert), tls_key=str(key))
    try:
        with DanNucNetClient(f"localhost:{srv.grpc_port}", token=TOKEN, root_certificates=cert.read_bytes()) as c:
            assert c.model_info().name == "darkness"
        import ssl

        ctx = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("localhost", srv.http_port, context=ctx, timeout=10)
        conn.request("GET", "/v1/model", headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["name"] == "darkness"
        conn.close()
    finally:
        srv.stop(grace=2)


def test_serve_command_starts_answers_and_drains_on_sigterm(model_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dannucnet", "serve", "--model", str(model_dir), "--device", "cpu", "--port", "0",
         "--http-port", "0", "--token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("limits"):
                break
        text = "".join(lines)
        assert "darkness" in text and "bearer token required" in text, text
        assert TOKEN not in text
        url = next(line.split()[1] for line in lines if line.startswith("HTTP"))
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        # Not flaky any more: the handlers are installed before the first line is printed, so
        # this SIGTERM (sent as soon as /healthz answers) always drains (issue 21).
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "SIGTERM: draining" in out and "stopped" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
