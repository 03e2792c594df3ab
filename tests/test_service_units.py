"""Server building blocks on their own: batcher, auth, limits, slide roots, query mapping."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from dannucnet.errors import InputError
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service.auth import TokenChecker, check_bind_policy, is_loopback, read_token
from dannucnet.service.batcher import MicroBatcher
from dannucnet.service.calls import Call
from dannucnet.service.gateway import query_to_dict
from dannucnet.service.limits import Limits, decode_image
from dannucnet.service.slide_roots import prepare_roots, resolve_slide
from dannucnet.service.status import HTTP_STATUS, ServiceError

TOKEN = "s3cret-token-0123456789"


# ---- micro-batcher -----------------------------------------------------------
def _wait_for(condition, timeout: float = 10.0) -> None:
    """Poll until ``condition()`` holds: threads reach a state in their own time, so wait for the state."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the batcher"
        time.sleep(0.005)


def test_batcher_batches_across_threads_and_keeps_results_apart():
    sizes = []
    gate = threading.Event()

    def run(arrays):
        gate.wait(2)  # hold the first batch so the others pile up
        sizes.append(len(arrays))
        return [a * 2 for a in arrays]

    batcher = MicroBatcher(run, max_batch=4, max_queue=64)
    results = {}

    def worker(i):
        results[i] = batcher.submit(np.full((2, 2), i, dtype=np.int64))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    _wait_for(lambda: batcher.pending == 9)  # all nine submitted while the first batch is held
    gate.set()
    for t in threads:
        t.join(5)
    batcher.close()
    assert {i: int(r[0, 0]) for i, r in results.items()} == {i: 2 * i for i in range(9)}
    assert max(sizes) > 1 and max(sizes) <= 4
    assert batcher.stats.items == 9


def test_batcher_full_queue_answers_resource_exhausted():
    gate = threading.Event()
    batcher = MicroBatcher(lambda arrays: (gate.wait(5), arrays)[1], max_batch=1, max_queue=2)
    blocked = [threading.Thread(target=batcher.submit, args=(np.zeros(1),)) for _ in range(2)]
    for t in blocked:
        t.start()
    _wait_for(lambda: batcher.pending == 2)
    with pytest.raises(ServiceError) as err:
        batcher.submit(np.zeros(1))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.http_status == 429
    gate.set()
    for t in blocked:
        t.join(5)
    batcher.close()


def test_batcher_drops_work_of_cancelled_calls():
    gate, running = threading.Event(), threading.Event()
    ran = []

    def run(arrays):
        running.set()
        gate.wait(5)
        ran.extend(int(a[0]) for a in arrays)
        return arrays

    batcher = MicroBatcher(run, max_batch=1, max_queue=16)
    first = threading.Thread(target=batcher.submit, args=(np.array([0]),))
    first.start()
    assert running.wait(5)  # item 0 is in the model before the other request queues
    call = Call()
    errors = []

    def cancelled_request():
        try:
            batcher.submit_many([np.array([i]) for i in range(1, 6)], call)
        except ServiceError as exc:
            errors.append(exc.code)

    t = threading.Thread(target=cancelled_request)
    t.start()
    _wait_for(lambda: batcher.pending == 6)  # its five items queued behind item 0
    call.cancel()
    t.join(2)
    gate.set()
    first.join(2)
    batcher.close()  # drains the queue: the cancelled items are dropped unrun
    assert errors == [grpc.StatusCode.CANCELLED]
    assert ran == [0]  # none of the cancelled request's items ran
    assert batcher.stats.dropped == 5


def test_call_deadline():
    call = Call(deadline=time.monotonic() - 1)
    with pytest.raises(ServiceError) as err:
        call.check()
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.http_status == 504
    # gRPC marks a call inactive when its deadline passes: that is still the deadline
    gone = Call(deadline=time.monotonic() - 1, is_active=lambda: False)
    with pytest.raises(ServiceError) as err:
        gone.check()
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(ServiceError) as err:
        Call(deadline=time.monotonic() + 60, is_active=lambda: False).check()
    assert err.value.code == grpc.StatusCode.CANCELLED


# ---- auth --------------------------------------------------------------------
def test_token_checker():
    checker = TokenChecker(TOKEN)
    assert checker.problem(f"Bearer {TOKEN}") is None
    assert checker.problem(f"bearer {TOKEN}") is None
    assert "missing" in checker.problem(None)
    assert "malformed" in checker.problem(TOKEN)
    assert checker.problem("Bearer wrong") == "invalid token"
    assert TOKEN not in checker.problem("Bearer " + TOKEN[:-1])
    assert TokenChecker(None).problem(None) is None


def test_bind_policy():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_bind_policy("127.0.0.1", None, False)
    check_bind_policy("0.0.0.0", TOKEN, False)
    check_bind_policy("0.0.0.0", None, True)
    with pytest.raises(InputError, match="token"):
        check_bind_policy("0.0.0.0", None, False)


def test_read_token(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert read_token(None, str(f)) == TOKEN
    with pytest.raises(InputError, match="shorter"):
        read_token("short", None)
    (tmp_path / "empty").write_text("")
    with pytest.raises(InputError, match="empty"):
        read_token(None, str(tmp_path / "empty"))
    with pytest.raises(InputError, match="cannot read"):
        read_token(None, str(tmp_path / "missing"))


# ---- limits and decoding -----------------------------------------------------
def _encoded(fmt: str, size=(32, 24)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width×height but which carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_decode_formats(fmt):
    rgb = decode_image(pb.Image(encoded=_encoded(fmt)), Limits())
    assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8


def test_decode_refuses_bombs_before_decoding():
    limits = Limits(max_pixels=1000 * 1000)
    t = time.perf_counter()
    for w, h in [(100_000, 100_000), (2000, 2000)]:
        with pytest.raises(ServiceError, match="split the region"):
            decode_image(pb.Image(encoded=png_header_only(w, h)), limits)
    assert time.perf_counter() - t < 0.5
    raw = pb.Image(raw=pb.RawImage(width=100_000, height=100_000, data=b"\0" * 30))
    with pytest.raises(ServiceError, match="more than this server's limit"):
        decode_image(raw, limits)


def test_decode_raw_size_mismatch():
    with pytest.raises(ServiceError, match="needs"):
        decode_image(pb.Image(raw=pb.RawImage(width=16, height=16, data=b"\0" * 10)), Limits())


def test_http_mapping_covers_every_code():
    assert set(HTTP_STATUS) == set(grpc.StatusCode)


# ---- slide roots -------------------------------------------------------------
def test_slide_roots(tmp_path):
    root = tmp_path / "slides"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.tif").write_bytes(b"x")
    outside = tmp_path / "secret.tif"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.tif")
    os.symlink(tmp_path, root / "dirlink")
    roots = prepare_roots([root])
    assert resolve_slide("sub/a.tif", roots) == (root / "sub" / "a.tif").resolve()
    assert resolve_slide(str(root / "sub" / "a.tif"), roots) == (root / "sub" / "a.tif").resolve()
    for bad in ["../secret.tif", "sub/../../secret.tif", "link.tif", "dirlink/secret.tif", str(outside), "/etc/passwd"]:
        with pytest.raises(ServiceError) as err:
            resolve_slide(bad, roots)
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED, bad
    with pytest.raises(ServiceError) as err:
        resolve_slide("sub/missing.tif", roots)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ServiceError) as err:
        resolve_slide("sub/a.tif", [])
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


# ---- gateway query mapping ---------------------------------------------------
def test_query_mapping_generic_and_aliases():
    d = query_to_dict(
        pb.SegmentRegionRequest.DESCRIPTOR,
        {"originX": ["5"], "coreX": ["1"], "core.width": ["9"], "threshold": ["0.4"], "alt": ["json"]},
    )
    assert d == {"originX": "5", "core": {"x": "1", "width": "9"}, "options": {"threshold": "0.4"}}
    with pytest.raises(ServiceError, match="unknown query parameter 'bogus'"):
        query_to_dict(pb.SegmentRegionRequest.DESCRIPTOR, {"bogus": ["1"]})
    with pytest.raises(ServiceError, match="given 2 times"):
        query_to_dict(pb.SegmentRegionRequest.DESCRIPTOR, {"originX": ["1", "2"]})
