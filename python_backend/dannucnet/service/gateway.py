"""HTTP/JSON gateway: the same RPCs as gRPC, for clients without gRPC (QuPath's Groovy).

Requests map onto the proto messages generically (``google.protobuf.json_format``,
proto3 JSON names): a JSON body *is* the request message, and query parameters
name its scalar fields (``originX``, dotted paths such as ``core.x``, plus the
short aliases of docs/DESIGN.md such as ``coreX`` and ``threshold``). An image
body (``image/png|jpeg|tiff``) fills the request's ``image.encoded``. Only the
SegmentRegion response has a bespoke rendering — a QuPath GeoJSON
FeatureCollection that ``GsonTools.parseObjectsFromGeoJSON`` reads as is — and
``?alt=json`` returns the proto JSON mapping instead. SegmentSlide streams one
JSON message per line (NDJSON). See docs/http-api.md.
"""

from __future__ import annotations

import io
import json
import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from dannucnet import __version__
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service.auth import TokenChecker
from dannucnet.service.calls import Call
from dannucnet.service.limits import MAX_TIMEOUT_SECONDS
from dannucnet.service.servicer import RegionOutcome, SegmentationService
from dannucnet.service.status import ServiceError, from_exception, invalid

log = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["Segmentation"]
IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff")
JSON_TYPE = "application/json"
# DESIGN.md's flat query names for nested fields of SegmentRegionRequest.
QUERY_ALIASES = {
    "coreX": "core.x",
    "coreY": "core.y",
    "coreWidth": "core.width",
    "coreHeight": "core.height",
    "threshold": "options.threshold",
    "minAreaMicrons2": "options.minAreaMicrons2",
    "cellExpansionMicrons": "options.cellExpansionMicrons",
}
RESERVED_QUERY = ("alt",)


@dataclass(frozen=True)
class Route:
    """One HTTP endpoint bound to one RPC of the proto service."""

    method: str
    path: str
    rpc: str
    render: str = "proto"  # "proto" | "geojson" | "ndjson"

    @property
    def request_class(self) -> type[Message]:
        return getattr(pb, _SERVICE.methods_by_name[self.rpc].input_type.name)


ROUTES = (
    Route("GET", "/v1/model", "GetModelInfo"),
    Route("GET", "/v1/models", "ListModels"),
    Route("POST", "/v1/segment", "SegmentRegion", render="geojson"),
    Route("POST", "/v1/slide", "SegmentSlide", render="ndjson"),
    Route("POST", "/v1/plan", "PlanRegion"),
)


def query_to_dict(descriptor: Descriptor, params: dict[str, list[str]]) -> dict[str, Any]:
    """Map query parameters onto a JSON dict of ``descriptor``'s fields (scalars only)."""
    out: dict[str, Any] = {}
    for name, values in params.items():
        if name in RESERVED_QUERY:
            continue
        path = _resolve(descriptor, QUERY_ALIASES.get(name, name)) or _resolve(descriptor, name)
        if path is None:
            known = sorted(
                [f.json_name for f in descriptor.fields if f.type != FieldDescriptor.TYPE_MESSAGE]
                + [a for a, p in QUERY_ALIASES.items() if _resolve(descriptor, p)]
            )
            raise invalid(f"unknown query parameter {name!r}; this endpoint accepts {', '.join(known) or 'none'}")
        if len(values) != 1:
            raise invalid(f"query parameter {name!r} is given {len(values)} times; give it once")
        target = out
        for field in path[:-1]:
            target = target.setdefault(field.json_name, {})
        leaf = path[-1]
        value: Any = values[0]
        if leaf.type == FieldDescriptor.TYPE_BOOL:
            if value.lower() not in ("true", "false"):
                raise invalid(f"query parameter {name!r} is {value!r}; use true or false")
            value = value.lower() == "true"
        target[leaf.json_name] = value
    return out


def _resolve(descriptor: Descriptor, dotted: str) -> list[FieldDescriptor] | None:
    fields = []
    current: Descriptor | None = descriptor
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if current is None:
            return None
        by_json = {f.json_name: f for f in current.fields}
        field = by_json.get(part) or current.fields_by_name.get(part)
        if field is None or field.is_repeated:
            return None
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if (i < len(parts) - 1) != is_message:
            return None
        fields.append(field)
        current = field.message_type if is_message else None
    return fields


def _peer_alive(sock: socket.socket) -> bool:
    """False once the client has closed its connection (it gave up waiting)."""
    if isinstance(sock, ssl.SSLSocket):
        return True  # MSG_PEEK is not available on TLS sockets
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True
        return bool(sock.recv(1, socket.MSG_PEEK))
    except (OSError, ValueError):
        return False


class _DeadlineIO(socket.SocketIO):
    """Socket reads that end at a deadline for the whole request, not per read.

    Each ``recv`` waits at most until ``deadline`` (and at most ``idle`` s), so a
    client trickling one byte every 20 s cannot keep a request open beyond it.
    """

    def __init__(self, sock: socket.socket, idle: float) -> None:
        super().__init__(sock, "rb")
        self.sock = sock
        self.idle = idle
        self.deadline: float | None = None

    def readinto(self, b: Any) -> int | None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request was not received in time")
            self.sock.settimeout(min(left, self.idle))
        return super().readinto(b)


class GatewayServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address, service: SegmentationService, checker: TokenChecker, geojson_metadata=None) -> None:
        self.service = service
        self.checker = checker
        self.geojson_metadata = geojson_metadata or {}
        self.in_flight = 0
        self.open_connections = 0  # one handler thread each; capped at limits.max_connections
        self.refused_connections = 0
        self._lock = threading.Lock()
        self.draining = False
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, GatewayHandler)

    def track(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta

    def process_request(self, request, client_address) -> None:
        """Start a handler thread, unless ``max_connections`` are open: then answer 503 and close."""
        with self._lock:
            full = self.open_connections >= self.service.limits.max_connections
            if full:
                self.refused_connections += 1
            else:
                self.open_connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed_one()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed_one()

    def _closed_one(self) -> None:
        with self._lock:
            self.open_connections -= 1

    def _refuse(self, request: socket.socket) -> None:
        """Answer from the accept loop without reading (no thread, never blocks: 1 s send timeout)."""
        limit = self.service.limits.max_connections
        if not isinstance(request, ssl.SSLSocket):  # no handshake on the accept loop
            body = json.dumps({"error": {"code": 503, "status": "UNAVAILABLE", "message": (
                f"the server has {limit} open connections, its limit: close idle ones or retry in a moment")}}).encode()
            head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
                    f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
            try:
                request.settimeout(1.0)
                request.sendall(head + body)
            except OSError:
                pass
        self.shutdown_request(request)


class GatewayHandler(BaseHTTPRequestHandler):
    server: GatewayServer
    protocol_version = "HTTP/1.1"
    server_version = f"dannucnet/{__version__}"
    timeout = 120  # seconds one read or write may wait; limits.request_read_seconds bounds a whole request
    disable_nagle_algorithm = True  # TCP_NODELAY: keep-alive replies must not wait for a delayed ACK (40 ms)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # stdlib's reader, replaced by one that honours the request deadline
        self._reader = _DeadlineIO(self.connection, float(self.timeout))
        self.rfile = io.BufferedReader(self._reader)
        self._body_read = True

    def handle_one_request(self) -> None:
        """One request: from waiting for its first line to its last body byte within ``request_read_seconds``."""
        self._reader.deadline = time.monotonic() + self.server.service.limits.request_read_seconds
        self._body_read = False
        try:
            super().handle_one_request()
        finally:
            self._done_reading()

    def _done_reading(self) -> None:
        """The request is in: stop the read deadline and give writes the normal per-call timeout."""
        self._reader.deadline = None
        try:
            self.connection.settimeout(self.timeout)
        except OSError:
            pass

    def __getattr__(self, name: str):
        """Any other method (PATCH, OPTIONS, HEAD, FOO...) gets the JSON error shape, not stdlib's HTML."""
        if name.startswith("do_"):
            return lambda: self._handle(name[3:])
        raise AttributeError(name)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """stdlib's own refusals (malformed request line, headers too long, ...) as JSON too."""
        self.close_connection = True
        self.request_version = self.protocol_version  # never answer in HTTP/0.9 (no status line, no headers)
        status = {400: grpc.StatusCode.INVALID_ARGUMENT, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
                  501: grpc.StatusCode.UNIMPLEMENTED, 505: grpc.StatusCode.UNIMPLEMENTED}.get(
            code, grpc.StatusCode.INVALID_ARGUMENT)
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._body_read = True  # nothing of this request can be trusted: the connection closes
        self._send_error(ServiceError(status, f"{message or phrase}: {explain or 'malformed HTTP request'}",
                                      http_status=code))

    # ---- plumbing -------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)  # request line only: no headers, no token

    def handle_expect_100(self) -> bool:
        """Answer 413 instead of "100 Continue" when the announced body is over the limit."""
        try:
            self._content_length()
        except ServiceError as exc:
            self._send_error(exc)
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        self.server.track(+1)
        try:
            self.connection.settimeout(self.timeout)  # body reads still end at the request deadline
            self._dispatch(method)
        except ServiceError as exc:
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug must not kill the connection thread silently
            log.exception("HTTP %s %s failed", method, self.path)
            self._send_error(from_exception(exc))
        finally:
            if not self._body_read:
                self._drain_body()  # a GET with a body: keep the keep-alive connection in step
            self.server.track(-1)

    def _send_json(self, status: int, payload: Any, extra_headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra_headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Head and body in one send (plus TCP_NODELAY): two small writes per keep-alive reply met
        # the client's delayed ACK, 40 ms each (keep-alive was 9× slower than new connections).
        head = b"".join(getattr(self, "_headers_buffer", [])) + b"\r\n"
        self._headers_buffer: list[bytes] = []  # BaseHTTPRequestHandler's header buffer: sent above
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def _send_error(self, exc: ServiceError, extra_headers: dict[str, str] | None = None) -> None:
        if not self._body_read:
            self._drain_body()  # keep a keep-alive connection in step (or close it)
        self._done_reading()
        payload = {"error": {"code": exc.http_status, "status": exc.status_name, "message": exc.message}}
        headers = dict(extra_headers or {})
        if exc.code == grpc.StatusCode.UNAUTHENTICATED:
            headers["WWW-Authenticate"] = 'Bearer realm="dannucnet"'
        if exc.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
            headers["Retry-After"] = "1"
        try:
            self._send_json(exc.http_status, payload, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ---- routing --------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        params = parse_qs(url.query, keep_blank_values=True)
        if url.path == "/healthz":
            if method != "GET":
                raise ServiceError(grpc.StatusCode.UNIMPLEMENTED, "use GET /healthz", http_status=405)
            status = "NOT_SERVING" if self.server.draining else "SERVING"
            self._send_json(200 if status == "SERVING" else 503, {"status": status})
            return
        routes = [r for r in ROUTES if r.path == url.path.rstrip("/")]
        if not routes:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"no endpoint {url.path}; endpoints: GET /healthz, "
                + ", ".join(f"{r.method} {r.path}" for r in ROUTES),
            )
        route = next((r for r in routes if r.method == method), None)
        if route is None:
            self._drain_body()
            allowed = ", ".join(r.method for r in routes)
            raise ServiceError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{method} is not allowed on {url.path}; use {allowed}",
                http_status=HTTPStatus.METHOD_NOT_ALLOWED,
            )
        problem = self.server.checker.problem(self.headers.get("Authorization"))
        if problem is not None:
            self._drain_body()
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, problem)
        if self.server.draining:
            self._drain_body()
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another server")
        alt = params.get("alt", ["geojson" if route.render == "geojson" else "json"])[-1]
        if alt not in ("json", "geojson") or (alt == "geojson" and route.render != "geojson"):
            also = " or alt=geojson" if route.render == "geojson" else ""
            raise invalid(f"alt={alt!r} is not supported here; use alt=json{also}")
        call = Call(deadline=self._deadline(), is_active=lambda: _peer_alive(self.connection))
        service = self.server.service
        if route.rpc == "GetModelInfo":
            self._send_json(200, _to_json(service.model_info(self._read_request(route, params))))
            return
        if route.rpc == "ListModels":
            self._send_json(200, _to_json(service.list_models(self._read_request(route, params))))
            return
        self._content_length()  # refuse a bad or oversized announcement before taking a slot
        with service.admit(call):  # before the body is read: refused uploads are never buffered
            self._run(route, alt, self._read_request(route, params), call)

    def _run(self, route: Route, alt: str, request: Message, call: Call) -> None:
        service = self.server.service
        if route.rpc == "SegmentRegion":
            outcome = service.segment_region(request, call)
            if alt == "geojson":
                self._send_json(200, self._geojson(outcome))
            else:
                self._send_json(200, _to_json(outcome.to_proto()))
        elif route.rpc == "SegmentSlide":
            self._stream(service.segment_slide(request, call))
        elif route.rpc == "PlanRegion":
            self._send_json(200, _to_json(service.plan_region(request, call)))
        else:  # pragma: no cover - ROUTES and this dispatch are edited together
            raise ServiceError(grpc.StatusCode.UNIMPLEMENTED, f"{route.rpc} has no HTTP binding")

    # ---- requests -------------------------------------------------------
    def _content_length(self) -> int:
        """The body's length, from exactly one Content-Length of ASCII digits and no Transfer-Encoding.

        Anything else is refused and the connection closed: a proxy in front may read the
        framing differently (request smuggling).
        """
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1 or (lengths and self.headers.get("Transfer-Encoding") is not None):
            self.close_connection = True
            self._body_read = True  # its framing is ambiguous: never read it
            raise invalid("the request has more than one Content-Length, or Content-Length with "
                          "Transfer-Encoding: send exactly one Content-Length")
        raw = lengths[0] if lengths else None
        if raw is None:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "chunked request bodies are not supported: send Content-Length",
                    http_status=HTTPStatus.LENGTH_REQUIRED,
                )
            return 0
        digits = raw.strip()
        length = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 18 else -1
        if length < 0:
            self.close_connection = True
            self._body_read = True
            raise invalid(f"Content-Length {raw[:40]!r} is not a byte count")
        limit = self.server.service.limits.max_message_bytes
        if length > limit:
            self.close_connection = True  # do not read a body we refuse
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request body is {length:,} bytes, more than this server's limit of {limit:,}: "
                "send a smaller region (PNG-encode it, or split it into chunks)",
                http_status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        return length

    def _drain_body(self) -> None:
        """Read a small refused body so keep-alive connections stay in sync; drop big ones."""
        if self._body_read:
            return
        self._body_read = True
        try:
            length = self._content_length()
        except ServiceError:
            return
        if length > 1024 * 1024:
            self.close_connection = True
        elif length:
            try:
                if len(self.rfile.read(length)) != length:
                    self.close_connection = True
            except OSError:  # includes the request deadline
                self.close_connection = True

    def _read_body(self) -> bytes:
        length = self._content_length()
        self._body_read = True
        try:
            data = self.rfile.read(length) if length else b""
        except TimeoutError:
            self.close_connection = True
            limit = self.server.service.limits.request_read_seconds
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request body did not arrive within {limit:g} s (this server's limit for receiving a request)",
                http_status=HTTPStatus.REQUEST_TIMEOUT,
            ) from None
        finally:
            self._done_reading()
        if len(data) != length:
            self.close_connection = True
            raise invalid(f"request body ended after {len(data):,} of {length:,} bytes")
        return data

    def _read_request(self, route: Route, params: dict[str, list[str]]) -> Message:
        request = route.request_class()
        descriptor = request.DESCRIPTOR
        body = self._read_body() if route.method == "POST" else b""
        if route.method == "POST":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype == JSON_TYPE:
                if not body.strip():
                    raise invalid("the request body is empty: send the request message as JSON")
                _parse_json(body, request)
            elif ctype in IMAGE_TYPES and "image" in descriptor.fields_by_name:
                if not body:
                    raise invalid(f"the request body is empty: send the {ctype} file as the body")
                request.image.encoded = body
            else:
                accepted = [JSON_TYPE] + (list(IMAGE_TYPES) if "image" in descriptor.fields_by_name else [])
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Content-Type {ctype or '(none)'!r} is not accepted here; use {', '.join(accepted)}",
                    http_status=HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                )
        query = query_to_dict(descriptor, params)
        if query:
            try:
                json_format.ParseDict(query, request)
            except json_format.ParseError as exc:
                raise invalid(f"bad query parameter: {exc}") from None
        return request

    def _deadline(self) -> float | None:
        raw = self.headers.get("X-Timeout-Seconds")
        if raw is None:
            return None
        try:
            seconds = float(raw)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds <= MAX_TIMEOUT_SECONDS:
            raise invalid(
                f"X-Timeout-Seconds {raw[:40]!r} must be a number of seconds between 0 and {MAX_TIMEOUT_SECONDS:g}"
            )
        return time.monotonic() + seconds

    # ---- responses ------------------------------------------------------
    def _geojson(self, outcome: RegionOutcome) -> dict[str, Any]:
        from dannucnet.formats.geojson import nucleus_feature

        metadata = dict(self.server.geojson_metadata)
        if outcome.model:  # the tag names the model that ran, which a request may choose
            metadata.update(model=outcome.model, model_version=outcome.model_version)
        return {
            "type": "FeatureCollection",
            "features": [nucleus_feature(n, metadata) for n in outcome.nuclei],
            "summary": {"nuclei": len(outcome.nuclei), "timingsMs": outcome.timings_ms},
        }

    def _stream(self, messages) -> None:
        """NDJSON over chunked transfer: one proto JSON message per line, errors as a last line."""
        iterator = iter(messages)
        first = next(iterator, None)  # validation errors surface here, as a normal error response
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if first is not None:
                self._chunk(_to_json(first))
                for message in iterator:
                    self._chunk(_to_json(message))
        except ServiceError as exc:
            self._chunk({"error": {"code": exc.http_status, "status": exc.status_name, "message": exc.message}})
        except (BrokenPipeError, ConnectionResetError):
            close = getattr(iterator, "close", None)
            if close:
                close()  # the client went away: stop the slide now
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, payload: Any) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8") + b"\n"
        self.wfile.write(f"{len(data):X}\r\n".encode("ascii") + data + b"\r\n")
        self.wfile.flush()


def _parse_json(body: bytes, request: Message) -> None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("the request body is not UTF-8 text; send JSON") from None
    try:
        json_format.Parse(text, request, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise invalid(f"the JSON body does not match {request.DESCRIPTOR.name}: {exc}") from None
    except RecursionError:
        raise invalid("the JSON body is nested too deeply") from None


def _to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def build_gateway(
    host: str,
    port: int,
    service: SegmentationService,
    checker: TokenChecker,
    *,
    ssl_context: ssl.SSLContext | None = None,
    geojson_metadata: dict[str, str] | None = None,
) -> GatewayServer:
    server = GatewayServer((host, port), service, checker, geojson_metadata)
    if ssl_context is not None:
        # Handshake in the handler thread, not in the accept loop.
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server
