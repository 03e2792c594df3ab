"""``dannucnet serve``: the model behind gRPC and an HTTP/JSON gateway (for QuPath)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

from dannucnet.commands._common import add_runtime_argument, batch_size, bounded

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import Any

    SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None  # signal.signal's

NAME = "serve"
HELP = "serve the model over gRPC and HTTP/JSON (QuPath scripts, dannucnet.client, remote `segment --server`)"

log = logging.getLogger(__name__)


# Unchecked, a port of 500051 served on 500051 mod 65536 without a word, --http-port 99999 was a traceback,
# and limits of 0 or less made the server refuse every request (or fall back to the default).
PORT = bounded(int, 0, 65535)
COUNT = bounded(int, 1, 2**62)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; anything else needs a token or --insecure)")
    p.add_argument("--port", type=PORT, default=50051, help="gRPC port (0 picks a free one; default 50051)")
    p.add_argument("--http-port", type=bounded(int, -1, 65535), default=8765,
                   help="HTTP/JSON gateway port (0 picks a free one, -1 turns it off; default 8765)")
    p.add_argument("--model", default="auto", metavar="NAME|PATH|auto|auto-fast",
                   help="model for requests that name none; auto (default) picks per request the installed model "
                        "whose pixel size suits the request's, auto-fast the same and then the cheapest network "
                        "(requests may name any model of `dannucnet models`, auto or auto-fast)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    add_runtime_argument(p)
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="bearer token clients must send (prefer --token-file: argv is visible to others)")
    auth.add_argument("--token-file", help="file whose first line is the bearer token")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without a token (trusted networks only)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS on both ports")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--slide-root", action="append", default=[], metavar="DIR",
                   help="folder SegmentSlide may read slides from (repeatable); without one SegmentSlide is off")
    p.add_argument("--max-batch", type=batch_size, default=None,
                   help="largest micro-batch of network windows per forward pass (default 2 on CPU; on GPU 32 of 256², "
                        "8 of 512²)")
    p.add_argument("--max-pixels", type=COUNT, default=None, help="decoded pixels allowed per request (default 4096²)")
    p.add_argument("--max-message-mb", type=bounded(float, 0.001, 2047, " MiB"), default=None,
                   help="largest request in MiB (default 64)")
    p.add_argument("--max-polygons", type=COUNT, default=None, help="most nuclei per response (default 200000)")
    p.add_argument("--max-pending", type=COUNT, default=None,
                   help="requests admitted at once before answering RESOURCE_EXHAUSTED / 429 (default 64)")
    p.add_argument("--max-connections", type=COUNT, default=None,
                   help="open HTTP connections before new ones get 503 (default 100)")
    p.add_argument("--grace", type=bounded(float, 0, 24 * 3600, " s"), default=30.0,
                   help="seconds to let running requests finish on shutdown")


def run(args: argparse.Namespace) -> int:
    """Handlers first, then everything else: a SIGTERM at any moment of start-up ends in exit 0.

    Before serving it stops start-up ("stopped before serving"); once serving it drains. The
    handlers are in place before the first line is printed and before /healthz can say SERVING,
    so a supervisor that signals as soon as it sees either never kills the process undrained.
    """
    stop = _StopSignal(args.grace)
    previous = stop.install()
    try:
        print(f"dannucnet serve: starting (pid {os.getpid()})", flush=True)
        server = _start(args, stop)
        if server is None:
            print(f"dannucnet serve: {stop.name}: stopped before serving", flush=True)
            return 0
        if not stop.is_set():
            print("dannucnet serve: ready", flush=True)
            print(server.summary(), flush=True)
        while not stop.wait(0.5):
            pass
        print(f"dannucnet serve: {stop.name}: draining (up to {args.grace:g} s)...", flush=True)
        server.stop(grace=args.grace)
        print("dannucnet serve: stopped", flush=True)
        return 0
    finally:
        _restore(previous)


def _start(args: argparse.Namespace, stop: _StopSignal):
    """Load the model and bind the ports; None when a signal came before the server started."""
    import dataclasses

    from dannucnet.engine import Predictor
    from dannucnet.model import load_model
    from dannucnet.service.auth import check_bind_policy, read_token
    from dannucnet.service.limits import Limits
    from dannucnet.service.server import Server, ServerConfig

    token = read_token(args.token, args.token_file)
    check_bind_policy(args.host, token, args.insecure)  # before the (slow) model load
    overrides = {
        "max_pixels": args.max_pixels,
        "max_message_bytes": int(args.max_message_mb * 1024 * 1024) if args.max_message_mb else None,
        "max_polygons": args.max_polygons,
        "max_pending": args.max_pending,
        "max_connections": args.max_connections,
    }
    limits = dataclasses.replace(Limits(), **{k: v for k, v in overrides.items() if v is not None})
    if stop.is_set():
        return None
    loaded = load_model(args.model)
    predictor = Predictor(loaded, device=args.device, batch_size=args.max_batch, runtime=args.runtime)
    if stop.is_set():
        return None
    config = ServerConfig(
        host=args.host,
        port=args.port,
        http_port=None if args.http_port is not None and args.http_port < 0 else args.http_port,
        token=token,
        insecure=args.insecure,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        slide_roots=args.slide_root,
        limits=limits,
        max_batch=args.max_batch,
    )
    return Server(
        predictor, config, model_source=getattr(loaded, "source", ""),
        model_factory=lambda name: Predictor(load_model(name), device=args.device, batch_size=args.max_batch,
                                             runtime=args.runtime),
        default_model=args.model or "",
    ).start()


class _StopSignal:
    """SIGTERM / SIGINT set one event; a second Ctrl-C more than 1 s later stops at once."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._event = threading.Event()
        self._first = 0.0
        self.name = ""

    def install(self) -> dict[int, SignalHandler]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal.signal only works there (run() called from a worker thread)
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._event.is_set():
            # Process managers and `timeout` signal the whole group: a duplicate within a second is ignored.
            if time.monotonic() - self._first > 1.0:
                raise KeyboardInterrupt
            return
        self._first = time.monotonic()
        self.name = signal.Signals(signum).name  # printed by the main flow: print() is not re-entrant
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


def _restore(previous: dict[int, SignalHandler]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
