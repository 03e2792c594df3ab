"""``dannucnet serve``: the model behind gRPC and an HTTP/JSON gateway (for QuPath)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

NAME = "serve"
HELP = "serve the model over gRPC and HTTP/JSON (QuPath scripts, dannucnet.client, remote `segment --server`)"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; anything else needs a token or --insecure)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one; default 50051)")
    p.add_argument("--http-port", type=int, default=8765,
                   help="HTTP/JSON gateway port (0 picks a free one, -1 turns it off; default 8765)")
    p.add_argument("--model", default="auto", metavar="NAME|PATH|auto",
                   help="model for requests that name none; auto (default) picks per request the installed model "
                        "whose pixel size suits the request's (requests may name any model of `dannucnet models`)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="bearer token clients must send (prefer --token-file: argv is visible to others)")
    auth.add_argument("--token-file", help="file whose first line is the bearer token")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without a token (trusted networks only)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS on both ports")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--slide-root", action="append", default=[], metavar="DIR",
                   help="folder SegmentSlide may read slides from (repeatable); without one SegmentSlide is off")
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest micro-batch of 256² tiles per forward pass (default 2 on CPU, 32 on GPU)")
    p.add_argument("--max-pixels", type=int, default=None, help="decoded pixels allowed per request (default 4096²)")
    p.add_argument("--max-message-mb", type=float, default=None, help="largest request in MiB (default 64)")
    p.add_argument("--max-polygons", type=int, default=None, help="most nuclei per response (default 200000)")
    p.add_argument("--max-pending", type=int, default=None,
                   help="requests admitted at once before answering RESOURCE_EXHAUSTED / 429 (default 64)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to let running requests finish on shutdown")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from dannucnet.engine import Predictor
    from dannucnet.model import load_model
    from dannucnet.service.auth import check_bind_policy, read_token
    from dannucnet.service.limits import Limits
    from dannucnet.service.server import Server, ServerConfig

    token = read_token(args.token, args.token_file)
    check_bind_policy(args.host, token, args.insecure)  # before the (slow) model load
    limits = Limits()
    overrides = {
        "max_pixels": args.max_pixels,
        "max_message_bytes": int(args.max_message_mb * 1024 * 1024) if args.max_message_mb else None,
        "max_polygons": args.max_polygons,
        "max_pending": args.max_pending,
    }
    limits = dataclasses.replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    loaded = load_model(args.model)
    predictor = Predictor(loaded, device=args.device, batch_size=args.max_batch)
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
    server = Server(
        predictor, config, model_source=getattr(loaded, "source", ""),
        model_factory=lambda name: Predictor(load_model(name), device=args.device, batch_size=args.max_batch),
        default_model=args.model or "",
    ).start()
    print("dannucnet serve: ready", flush=True)
    print(server.summary(), flush=True)

    stop = threading.Event()
    first_signal: list[float] = []

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            # A second Ctrl-C stops at once; a duplicate of the first (process managers and
            # `timeout` signal the whole group) arriving within a second does not.
            if time.monotonic() - first_signal[0] > 1.0:
                raise KeyboardInterrupt
            return
        first_signal.append(time.monotonic())
        print(f"dannucnet serve: {signal.Signals(signum).name}: draining (up to {args.grace:g} s)...", flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        pass
    server.stop(grace=args.grace)
    print("dannucnet serve: stopped", flush=True)
    return 0
