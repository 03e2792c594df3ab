"""Assemble and run the server: model + batcher + servicer, gRPC and HTTP, drain on exit."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from dannucnet.service.auth import TokenChecker, check_bind_policy
from dannucnet.service.batched_predictor import BatchedPredictor
from dannucnet.service.gateway import GatewayServer, build_gateway
from dannucnet.service.grpc_server import SERVICE_NAME, build_grpc_server
from dannucnet.service.limits import Limits
from dannucnet.service.servicer import SegmentationService
from dannucnet.service.slide_roots import prepare_roots

if TYPE_CHECKING:
    from dannucnet.engine.pool import PredictorPool
    from dannucnet.engine.predictor import Predictor as EnginePredictor

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # gRPC; 0 picks a free port
    http_port: int | None = 8765  # None: no HTTP gateway; 0 picks a free port
    token: str | None = None
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    slide_roots: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    max_batch: int | None = None
    max_workers: int = 32


class Server:
    """The running service; ``start()`` binds both transports, ``stop()`` drains them."""

    def __init__(
        self, predictor: EnginePredictor, config: ServerConfig, model_source: str = "",
        model_factory: Callable[[str | None], EnginePredictor] | None = None, default_model: str = "",
    ) -> None:
        """``model_factory(name)`` builds the engine predictor of another installed model: given it,
        requests may name any installed model (or "auto"), loaded on first use, each with its own
        micro-batcher. ``default_model`` is what a request without a model gets ("" = ``predictor``)."""
        check_bind_policy(config.host, config.token, config.insecure)
        self.config = config
        self.batched = BatchedPredictor(predictor, max_batch=config.max_batch)
        self.models: PredictorPool[BatchedPredictor] | None = None
        if model_factory is not None:
            from dannucnet.engine.pool import PredictorPool

            self.models = PredictorPool(
                lambda name: BatchedPredictor(model_factory(name), max_batch=config.max_batch), default=default_model
            )
            self.models.add(model_source or None, self.batched)
        self.service = SegmentationService(
            self.batched,
            limits=config.limits,
            slide_roots=prepare_roots(config.slide_roots),
            model_source=model_source,
            models=self.models,
            default_model=default_model,
        )
        self.checker = TokenChecker(config.token)
        self.grpc_server, self.health = build_grpc_server(self.service, self.checker, max_workers=config.max_workers)
        self.gateway: GatewayServer | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._http_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    # ---- lifecycle ------------------------------------------------------
    def start(self) -> Server:
        cfg = self.config
        address = _join(cfg.host, cfg.port)
        try:
            if cfg.tls_cert or cfg.tls_key:
                cert, key = _read_tls(cfg.tls_cert, cfg.tls_key)
                self.grpc_port = self.grpc_server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                self.grpc_port = self.grpc_server.add_insecure_port(address)
        except RuntimeError:  # grpcio ≥ 1.55 raises instead of returning port 0
            self.grpc_port = 0
        if not self.grpc_port:
            raise _cannot_listen("gRPC", address, "--port")
        self.grpc_server.start()
        if cfg.http_port is not None:
            ctx = None
            if cfg.tls_cert:
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            try:
                # tags every GeoJSON object dannucnet:<model>@<version> (what a rerun replaces)
                card = self.batched.card
                self.gateway = build_gateway(cfg.host, cfg.http_port, self.service, self.checker, ssl_context=ctx,
                                             geojson_metadata={"model": card.name, "model_version": card.version})
            except OSError as exc:
                self.grpc_server.stop(0)
                raise _cannot_listen("HTTP", _join(cfg.host, cfg.http_port), "--http-port", exc) from None
            self.http_port = self.gateway.server_address[1]
            self._http_thread = threading.Thread(
                target=self.gateway.serve_forever, kwargs={"poll_interval": 0.2}, name="dannucnet-http", daemon=True
            )
            self._http_thread.start()
        return self

    def stop(self, grace: float = 30.0) -> None:
        """Graceful drain: refuse new calls, let running ones finish (up to ``grace`` s)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        grpc_done = self.grpc_server.stop(grace)
        if self.gateway is not None:
            self.gateway.draining = True
            deadline = time.monotonic() + grace
            while self.gateway.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            self.gateway.shutdown()
            self.gateway.server_close()
        grpc_done.wait(grace)
        for batched in self.models.loaded() if self.models is not None else [self.batched]:
            batched.close()

    def wait(self) -> None:
        self._stopped.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=5.0)

    # ---- reporting ------------------------------------------------------
    @property
    def grpc_address(self) -> str:
        return _join(_connect_host(self.config.host), self.grpc_port or 0)

    @property
    def http_url(self) -> str | None:
        if self.http_port is None:
            return None
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{_join(_connect_host(self.config.host), self.http_port)}"

    def summary(self) -> str:
        card = self.batched.card
        limits = self.config.limits
        trained = "trained" if card.trained else "UNTRAINED: output is meaningless"
        device = self.batched.description
        lines = [
            f"model   {card.name} {card.version} ({trained}), "
            f"{card.mpp} µm/px, windows {self.batched.tile}², threshold {card.threshold}",
            f"device  {device}, micro-batches of up to {self.batched.max_batch} tiles",
            *([f"models  a request may name any installed model (GET /v1/models); without one: "
               f"{self.service.default_model or card.name}"] if self.models is not None else []),
            f"gRPC    {self.grpc_address}" + (" (TLS)" if self.config.tls_cert else ""),
            f"HTTP    {self.http_url}" if self.http_url else "HTTP    off",
            f"auth    {'bearer token required' if self.checker.enabled else 'none (loopback or --insecure)'}",
            "slides  "
            + (", ".join(str(r) for r in self.service.slide_roots) or "SegmentSlide disabled (no --slide-root)"),
            f"limits  {limits.max_pixels:,} px/request, {limits.max_message_bytes:,} bytes/message, "
            f"{limits.max_polygons:,} nuclei/response, {limits.max_pending} pending requests, "
            f"{limits.max_connections} HTTP connections, {limits.request_read_seconds:g} s/request upload",
        ]
        return "\n".join(lines)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _connect_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _cannot_listen(what: str, address: str, flag: str, exc: OSError | None = None) -> Exception:
    from dannucnet.errors import InputError

    why = (exc.strerror if exc is not None and exc.strerror
           else "the port is in use or the address is not this machine's")
    return InputError(f"cannot listen for {what} on {address}: {why}; choose another {flag} (0 picks a free one)")


def _read_tls(cert: str | None, key: str | None) -> tuple[bytes, bytes]:
    from dannucnet.errors import InputError

    if not (cert and key):
        raise InputError("TLS needs both --tls-cert and --tls-key")
    try:
        pem = Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    # gRPC reports a file that is no PEM as a failed bind ("port in use"), which sends the user the wrong way
    for path, data, kind in ((cert, pem[0], b"CERTIFICATE-----"), (key, pem[1], b"PRIVATE KEY-----")):
        if b"-----BEGIN " not in data or kind not in data:
            raise InputError(f"{path} holds no PEM {kind[:-5].decode().lower()} (-----BEGIN ...{kind.decode()}): "
                             "give --tls-cert a PEM certificate chain and --tls-key its PEM private key")
    return pem
