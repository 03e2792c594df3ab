"""Issue 21, server half: hostile requests and lifecycle events, each one a regression test.

The WKB bomb and the start-up SIGTERMs run ``dannucnet serve`` in a subprocess,
so a crash there fails the test instead of killing the suite; everything else
runs against a real server on loopback in this process.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import statistics
import struct
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import shapely

from dannucnet.errors import InputError
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service._generated.v1 import segmentation_pb2_grpc as pb_grpc
from dannucnet.service.auth import TokenChecker, read_token
from dannucnet.service.limits import Limits
from dannucnet.service.status import ServiceError
from dannucnet.service.wkb import check_area_wkb
from dannucnet.slides.synthetic import make_synthetic_he, write_synthetic_slide
from test_service_server import MPP, TOKEN, model_dir, png, predictor, request, start_server  # noqa: F401

AUTH = (("authorization", f"Bearer {TOKEN}"),)
SMALL_PNG = png(make_synthetic_he(64, 64, seed=7).rgb)
GOOD = {"image": {"encoded": base64.b64encode(SMALL_PNG).decode()}, "pixelSizeMicrons": MPP}


def nested_collection(depth: int) -> bytes:
    """A square wrapped in ``depth`` GeometryCollections (20,000 levels ≈ 180 kB crashed GEOS)."""
    data = shapely.to_wkb(shapely.box(0, 0, 60, 60))
    return struct.pack("<BII", 1, 7, 1) * depth + data


def body(**fields) -> dict:
    out = json.loads(json.dumps(GOOD))
    out.update(fields)
    return out


@pytest.fixture(scope="module")
def server(predictor):  # noqa: F811 - the fixture imported above
    srv = start_server(predictor, limits=Limits(max_message_bytes=4 * 1024 * 1024, max_pixels=1024 * 1024,
                                                request_read_seconds=2.5, max_connections=24))
    yield srv
    srv.stop(grace=2)


# ---- BROKEN 1: WKB that crashes GEOS -------------------------------------------------------------
WKB_REFUSED = [
    ("nested 20,000 deep", nested_collection(20_000), "GeometryCollection"),
    ("nested 2 deep", nested_collection(2), "GeometryCollection"),
    ("truncated", shapely.to_wkb(shapely.box(0, 0, 9, 9))[:-5], "truncated"),
    ("trailing bytes", shapely.to_wkb(shapely.box(0, 0, 9, 9)) + b"\0", "follow"),
    ("2^32-1 rings", struct.pack("<BII", 1, 3, 0xFFFFFFFF), "declares"),
    ("NaN vertex", struct.pack("<BIII8d", 1, 3, 1, 4, 0, 0, 9, 0, 9, float("nan"), 0, 0), "NaN"),
    ("beyond 2^31", shapely.to_wkb(shapely.box(0, 0, 1e17, 9)), "beyond"),
    ("bad byte order", b"\x07" + shapely.to_wkb(shapely.box(0, 0, 9, 9))[1:], "byte-order"),
    ("multipolygon of lines", struct.pack("<BII", 1, 6, 1) + shapely.to_wkb(shapely.LineString([(0, 0), (1, 1)])),
     "LineString"),
    ("unknown type", struct.pack("<BI", 1, 99), "type"),
]


@pytest.mark.parametrize("case", WKB_REFUSED, ids=[c[0] for c in WKB_REFUSED])
def test_wkb_walk_refuses_before_any_parser(case):
    _, data, words = case
    with pytest.raises(ServiceError) as err:
        check_area_wkb(data, "clipWkb")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.message, err.value.message


@pytest.mark.parametrize("geom", [
    shapely.box(0, 0, 9, 9),
    shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)]),
    shapely.Polygon([(0, 0, 1), (9, 0, 1), (9, 9, 1), (0, 0, 1)]),
    shapely.box(0, 0, 9, 9).difference(shapely.box(2, 2, 3, 3)),  # a hole
], ids=["polygon", "multipolygon", "polygon z", "with hole"])
@pytest.mark.parametrize("flavor", [{}, {"byte_order": 0}, {"flavor": "extended", "include_srid": True}],
                         ids=["iso-le", "big-endian", "ewkb-srid"])
def test_wkb_walk_accepts_what_jts_and_shapely_write(geom, flavor):
    check_area_wkb(shapely.to_wkb(shapely.set_srid(geom, 4326), **flavor), "clipWkb")


def _serve(args, model, tmp_path):
    return subprocess.Popen(
        [sys.executable, "-m", "dannucnet", "serve", "--model", str(model), "--device", "cpu", "--port", "0",
         "--http-port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )


def _read_until(proc, prefix: str, timeout: float = 90) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    pytest.fail(f"no line starting {prefix!r}: {''.join(lines)}")


def test_wkb_bomb_is_refused_and_the_server_lives_on(model_dir, tmp_path):  # noqa: F811
    """Before: the 20,000-deep GeometryCollection segfaulted the server (rc -11), losing every request."""
    root = tmp_path / "slides"
    root.mkdir()
    write_synthetic_slide(root / "s.tif", (256, 256), seed=1)
    proc = _serve(["--slide-root", str(root)], model_dir, tmp_path)
    try:
        lines = _read_until(proc, "limits")
        grpc_address = next(line.split()[1] for line in lines if line.startswith("gRPC"))
        http_port = int(next(line.split()[1] for line in lines if line.startswith("HTTP")).rsplit(":", 1)[1])
        bomb = nested_collection(20_000)
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        conn.request("POST", "/v1/segment", json.dumps(body(clipWkb=base64.b64encode(bomb).decode())),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == 400 and "GeometryCollection" in payload["error"]["message"], payload
        # PlanRegion (the QuPath script's first call) carries the parent's ROI as WKB too
        conn.request("POST", "/v1/plan", json.dumps({"imageWidth": 256, "imageHeight": 256,
                                                      "imagePixelWidthMicrons": 0.25, "imagePixelHeightMicrons": 0.25,
                                                      "roiWkb": base64.b64encode(bomb).decode()}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == 400 and "roiWkb" in payload["error"]["message"], payload
        with grpc.insecure_channel(grpc_address) as channel:
            stub = pb_grpc.SegmentationStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.SegmentSlide(pb.SegmentSlideRequest(path="s.tif", roi_wkb=[bomb]), timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "roiWkb[0]" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.PlanRegion(pb.PlanRegionRequest(image_width=256, image_height=256, pixel_size_microns=0.25,
                                                     roi_wkb=bomb), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "roiWkb" in err.value.details()
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).name == "darkness"
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200 and proc.poll() is None
        conn.close()
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- BROKEN 3: SIGTERM during start-up -----------------------------------------------------------
@pytest.mark.parametrize("moment", ["starting", "ready"])
def test_sigterm_at_any_moment_of_start_up_exits_0(model_dir, tmp_path, moment):  # noqa: F811
    """Before: the banner came before the handlers; a SIGTERM on seeing it gave rc -15 (7 of 10 tries)."""
    proc = _serve([], model_dir, tmp_path)
    try:
        _read_until(proc, f"dannucnet serve: {moment}")
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert ("stopped before serving" in out) if moment == "starting" else ("draining" in out and "stopped" in out)
    assert "Traceback" not in out, out


def test_port_in_use_is_one_line_and_exit_2(model_dir, capsys):  # noqa: F811
    from dannucnet.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flags in (["--port", str(port), "--http-port", "0"], ["--port", "0", "--http-port", str(port)]):
            assert main(["serve", "--model", str(model_dir), "--device", "cpu", *flags]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f":{port}" in err[0] and "choose another" in err[0], err


# ---- WEAK: numbers and work --------------------------------------------------------------------
NUMBER_CASES = [
    ("minAreaMicrons2 1e308", body(options={"minAreaMicrons2": 1e308}), "minAreaMicrons2"),
    ("originX 1e308", body(originX=1e308), "originX"),
    ("originX 1e17", body(originX=1e17), "originX"),
    ("originY past 2^31 with the image", body(originY=2**31 - 10), "originY + height"),
    ("downsample 1e-300", body(downsample=1e-300), "downsample"),
    ("downsample 1e6", body(downsample=1e6), "downsample"),
    ("core x 1e300", body(core={"x": 1e300, "y": 0, "width": 10, "height": 10}), "core.x"),
    ("core width 1e300", body(core={"x": 0, "y": 0, "width": 1e300, "height": 10}), "core.width"),
    ("threshold 1e308", body(options={"threshold": 1e308}), "threshold"),
    ("pixel size 1e308", body(pixelSizeMicrons=1e308), "pixelSizeMicrons"),
    ("16 x 65,536 strip", {"image": {"encoded": base64.b64encode(png(np.full((16, 65536, 3), 200, np.uint8))).decode()},
                           "pixelSizeMicrons": MPP}, "aspect ratio"),
    ("128 x 8,192: too many windows", {"image": {"encoded": base64.b64encode(
        png(np.full((128, 8192, 3), 200, np.uint8))).decode()}, "pixelSizeMicrons": MPP}, "windows"),
]


@pytest.mark.parametrize("case", NUMBER_CASES, ids=[c[0] for c in NUMBER_CASES])
def test_out_of_range_numbers_are_400_not_500(server, case):
    _, payload, words = case
    status, answer, _ = request(server, "POST", "/v1/segment", payload)
    assert status == 400 and words in answer["error"]["message"], answer


def test_grpc_numbers_out_of_range_are_invalid_argument(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        for req, words in [
            (pb.SegmentRegionRequest(pixel_size_microns=MPP, origin_x=1e308, image=pb.Image(encoded=SMALL_PNG)),
             "originX"),
            (pb.SegmentRegionRequest(pixel_size_microns=MPP, image=pb.Image(encoded=SMALL_PNG),
                                     options=pb.SegmentOptions(min_area_microns2=1e308)), "minAreaMicrons2"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.SegmentRegion(req, metadata=AUTH, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_slide_path_and_numbers_with_a_slide_root(predictor, tmp_path):  # noqa: F811
    write_synthetic_slide(tmp_path / "s.tif", (128, 128), seed=3)
    srv = start_server(predictor, slide_roots=[str(tmp_path)])
    try:
        with grpc.insecure_channel(srv.grpc_address) as channel:
            stub = pb_grpc.SegmentationStub(channel)
            for req, words in [
                (pb.SegmentSlideRequest(path="a" * 10_000), "bytes long"),
                (pb.SegmentSlideRequest(path="s.tif", options=pb.SegmentOptions(min_area_microns2=1e308)), "minArea"),
                (pb.SegmentSlideRequest(path="s.tif", region=pb.Rect(x=1e300, y=0, width=5, height=5)), "region.x"),
                (pb.SegmentSlideRequest(path="s.tif", roi_wkb=[b"\x01"] * 10_001), "roiWkb"),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.SegmentSlide(req, metadata=AUTH, timeout=30))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), (
                    err.value.details())
    finally:
        srv.stop(grace=2)


# ---- WEAK: slow clients, connections, admission ----------------------------------------------------
def _raw(server, data: bytes = b"", timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=timeout)
    if data:
        sock.sendall(data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _trickle(sock: socket.socket, data: bytes, every: float, until: float) -> None:
    """Send one byte every ``every`` s until ``until``; stop as soon as the server answers or closes."""
    for byte in data:
        if time.monotonic() > until:
            return
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return
        if select.select([sock], [], [], every)[0]:
            return


def test_trickled_body_meets_the_whole_request_deadline(server):
    """Before: the 120 s timeout was per read, so one byte every 20 s kept a request open for ever."""
    head = (f"POST /v1/segment?pixelSizeMicrons={MPP} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {len(SMALL_PNG)}\r\n\r\n").encode()
    sock = _raw(server, head)
    started = time.monotonic()
    _trickle(sock, SMALL_PNG, 0.1, started + 6.0)  # 2.5 s allowed; the trickle would take 100+ s
    reply = _read_all(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"DEADLINE_EXCEEDED" in reply, reply[:300]
    assert time.monotonic() - started < 9


def test_trickled_headers_meet_the_whole_request_deadline(server):
    sock = _raw(server, b"GET /v1/model HTTP/1.1\r\n")
    started = time.monotonic()
    _trickle(sock, b"X-Slow: " + b"a" * 200, 0.1, started + 6.0)
    assert _read_all(sock) == b""  # closed without a word (nothing of the request was understood)
    sock.close()
    assert time.monotonic() - started < 9


def test_open_connections_are_capped(predictor):  # noqa: F811
    srv = start_server(predictor, limits=Limits(max_connections=3, max_pixels=1024 * 1024))
    try:
        idle = [_raw(srv) for _ in range(3)]
        deadline = time.monotonic() + 10
        while srv.gateway.open_connections < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        extra = _raw(srv)
        reply = _read_all(extra)
        extra.close()
        assert reply.startswith(b"HTTP/1.1 503") and b"open connections" in reply, reply
        idle.pop().close()
        deadline = time.monotonic() + 10
        while srv.gateway.open_connections > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert request(srv, "GET", "/v1/model")[0] == 200
        for sock in idle:
            sock.close()
    finally:
        srv.stop(grace=2)


def test_admission_comes_before_the_body_is_buffered(predictor):  # noqa: F811
    """Before: bodies were read first (8 × 48 MB uploads → +336 MB) and only then refused as busy."""
    srv = start_server(predictor, limits=Limits(max_pending=1, max_pixels=1024 * 1024))
    try:
        size = 3 * 1024 * 1024
        head = (f"POST /v1/segment?pixelSizeMicrons={MPP} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: image/png\r\nContent-Length: {size}\r\n\r\n").encode()
        holder = _raw(srv, head + b"\x89PNG")  # admitted, still uploading
        deadline = time.monotonic() + 10
        while srv.service.active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = _raw(srv, head)  # announces 3 MB, sends none of it
        reply = _read_all(second)
        second.close()
        holder.close()
        assert reply.startswith(b"HTTP/1.1 429") and b"RESOURCE_EXHAUSTED" in reply, reply[:300]
    finally:
        srv.stop(grace=2)


# ---- WEAK: HTTP details ----------------------------------------------------------------------
def test_keep_alive_replies_do_not_wait_for_delayed_acks(server):
    """Before: headers and body went out in two writes; each keep-alive reply waited ~40 ms for an ACK."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    times = []
    for _ in range(25):
        started = time.perf_counter()
        conn.request("GET", "/v1/model", headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        resp.read()
        times.append(time.perf_counter() - started)
        assert resp.status == 200
    conn.close()
    assert statistics.median(times) < 0.030, times  # a delayed ACK alone is 40 ms


SMUGGLING = [
    ("two Content-Length", "Content-Length: 4\r\nContent-Length: 4\r\n"),
    ("two different Content-Length", "Content-Length: 4\r\nContent-Length: 40\r\n"),
    ("Content-Length and Transfer-Encoding", "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n"),
    ("Content-Length 0_4", "Content-Length: 0_4\r\n"),
    ("Content-Length +4", "Content-Length: +4\r\n"),
]


@pytest.mark.parametrize("case", SMUGGLING, ids=[c[0] for c in SMUGGLING])
def test_ambiguous_framing_is_refused_and_closed(server, case):
    _, framing = case
    sock = _raw(server, (f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Type: application/json\r\n{framing}\r\n{{}}\r\n").encode())
    reply = _read_all(sock)  # the server closes: no second request can hide in the body
    sock.close()
    assert reply.startswith(b"HTTP/1.1 400") and b"INVALID_ARGUMENT" in reply, reply[:300]


@pytest.mark.parametrize("method", ["PATCH", "OPTIONS", "FOO", "PUT"])
def test_any_method_gets_the_json_error_shape(server, method):
    status, payload, resp = request(server, method, "/v1/segment", b"{}", {"Content-Type": "application/json"})
    assert status == 405 and payload["error"]["status"] == "UNIMPLEMENTED" and "POST" in payload["error"]["message"]


def test_head_and_malformed_requests_answer_json(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    conn.request("HEAD", "/v1/model", headers={"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    assert resp.status == 405 and resp.read() == b""  # no body after HEAD, and the connection stays usable
    conn.request("GET", "/v1/model", headers={"Authorization": f"Bearer {TOKEN}"})
    assert conn.getresponse().status == 200
    conn.close()
    sock = _raw(server, b"GARBAGE\r\n\r\n")
    reply = _read_all(sock)
    sock.close()
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(rest)["error"]["status"] == "INVALID_ARGUMENT", reply


def test_token_padding_is_stripped_on_both_sides():
    """Before: --token ' short-token   ' passed the 16-character check with its padding."""
    with pytest.raises(InputError, match="shorter than 16"):
        read_token("   short-token   ", None)
    with pytest.raises(InputError, match="spaces"):
        read_token("0123456789 abcdef0123", None)
    assert read_token(f"  {TOKEN}\t", None) == TOKEN
    checker = TokenChecker(read_token(f" {TOKEN} ", None))
    assert checker.problem(f"Bearer {TOKEN}") is None and checker.problem(f"Bearer   {TOKEN}  ") is None
    assert checker.problem(f"Bearer {TOKEN}x") == "invalid token"
