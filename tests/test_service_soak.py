"""Soak: mixed valid and hostile requests on both transports for a bounded time.

Afterwards the server must still answer, and its process must hold no more
threads or file descriptors than before and roughly the same memory. 12 s by
default (CI); ``DANNUCNET_SOAK_SECONDS=60`` gives the review's full minute.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import threading
import time
from collections import Counter

import grpc
import pytest
import shapely

from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service._generated.v1 import segmentation_pb2_grpc as pb_grpc
from dannucnet.service.limits import Limits
from dannucnet.slides.synthetic import make_synthetic_he
from test_service_server import MPP, TOKEN, model_dir, png, predictor, start_server  # noqa: F401

SECONDS = float(os.environ.get("DANNUCNET_SOAK_SECONDS", "12"))
AUTH = (("authorization", f"Bearer {TOKEN}"),)
IMAGE = png(make_synthetic_he(96, 96, seed=5).rgb)
BOMB = struct.pack("<BII", 1, 7, 1) * 20_000 + shapely.to_wkb(shapely.box(0, 0, 50, 50))
GOOD = {"image": {"encoded": base64.b64encode(IMAGE).decode()}, "pixelSizeMicrons": MPP}
OK_CODES = {200, 400, 401, 404, 405, 408, 413, 415, 429}


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _http(port: int, method: str, path: str, body: bytes | dict | None, headers: dict, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hdrs = {"Authorization": f"Bearer {TOKEN}", **headers}
    if isinstance(body, dict):
        body, hdrs["Content-Type"] = json.dumps(body).encode(), "application/json"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    if own or resp.getheader("Connection") == "close":
        conn.close()
    return resp.status, data


def _http_mix(port: int, i: int, conn: http.client.HTTPConnection) -> int:
    kind = i % 9
    if kind == 0:
        return _http(port, "POST", f"/v1/segment?pixelSizeMicrons={MPP}", IMAGE, {"Content-Type": "image/png"}, conn)[0]
    if kind == 1:
        return _http(port, "POST", "/v1/segment", {**GOOD, "clipWkb": base64.b64encode(BOMB).decode()}, {})[0]
    if kind == 2:
        return _http(port, "POST", "/v1/segment", {**GOOD, "originX": 1e308}, {}, conn)[0]
    if kind == 3:
        return _http(port, "POST", "/v1/segment", b'{"image": ', {"Content-Type": "application/json"}, conn)[0]
    if kind == 4:
        return _http(port, "PATCH", "/v1/segment", b"{}", {"Content-Type": "application/json"}, conn)[0]
    if kind == 5:
        return _http(port, "GET", "/v1/model", None, {"Authorization": "Bearer wrong-token-0123456789"}, conn)[0]
    if kind == 6:  # gives up half-way through its upload
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall((f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Type: image/png\r\nContent-Length: {len(IMAGE)}\r\n\r\n").encode() + IMAGE[:100])
        sock.close()
        return 200
    if kind == 7:
        return _http(port, "POST", "/v1/segment", b"x", {"Content-Type": "image/png", "Content-Length": "1, 1"})[0]
    return _http(port, "GET", "/v1/model", None, {}, conn)[0]


def _grpc_mix(stub, i: int) -> str:
    kind = i % 4
    try:
        if kind == 0:
            stub.SegmentRegion(pb.SegmentRegionRequest(pixel_size_microns=MPP, image=pb.Image(encoded=IMAGE)),
                               metadata=AUTH, timeout=30)
        elif kind == 1:
            stub.SegmentRegion(pb.SegmentRegionRequest(pixel_size_microns=MPP, image=pb.Image(encoded=IMAGE),
                                                       clip_wkb=BOMB), metadata=AUTH, timeout=30)
        elif kind == 2:
            stub.SegmentRegion(pb.SegmentRegionRequest(pixel_size_microns=MPP, image=pb.Image(encoded=IMAGE[:50])),
                               metadata=AUTH, timeout=30)
        else:
            stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=30)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def _drive(server, seconds: float, workers: int = 4) -> tuple[Counter, list[str]]:
    outcomes: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.SegmentationStub(channel)
            i = k
            while time.monotonic() < stop_at:
                try:
                    got = _grpc_mix(stub, i) if k % 2 else _http_mix(server.http_port, i, conn)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    got = f"client error {type(exc).__name__}"
                with lock:
                    outcomes[got] += 1
                    if got not in OK_CODES and got not in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
                        errors.append(f"worker {k} request {i}: {got}")
                i += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, errors


def _settle(server, baseline_threads: int, timeout: float = 15) -> None:
    """Wait (bounded) until the handler threads of closed connections have exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        server.gateway.open_connections or threading.active_count() > baseline_threads
    ):
        time.sleep(0.05)


@pytest.mark.slow
def test_soak_mixed_requests_leave_no_leaks(predictor):  # noqa: F811
    srv = start_server(predictor, limits=Limits(max_message_bytes=4 * 1024 * 1024, max_pixels=1024 * 1024,
                                                request_read_seconds=5))
    try:
        _drive(srv, 2.0)  # warm-up: code paths, allocator pools, gRPC's own threads
        _settle(srv, 0, timeout=3)
        threads, fds, rss = threading.active_count(), _fds(), _rss_mb()
        outcomes, errors = _drive(srv, SECONDS)
        _settle(srv, threads)
        grown = _rss_mb() - rss
        print(f"soak {SECONDS:g} s: {sum(outcomes.values())} requests {dict(outcomes)}; "
              f"threads {threads} → {threading.active_count()}, fds {fds} → {_fds()}, RSS {rss:.0f} MB +{grown:.1f} MB")
        assert errors == [], errors[:10]
        assert outcomes[200] + outcomes["OK"] > 20 and outcomes[400] and outcomes["INVALID_ARGUMENT"]
        assert threading.active_count() <= threads + 1 and _fds() <= fds + 4
        assert grown < 64, f"RSS grew {grown:.0f} MB"
        assert _http(srv.http_port, "GET", "/healthz", None, {})[0] == 200
    finally:
        srv.stop(grace=2)
