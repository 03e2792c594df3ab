"""Command line: argument parsing only; every command lives in ``dannucnet.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Keeping commands in their own modules lets each door of
the pipeline (segment, serve, batch, ...) grow without touching the others.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

from dannucnet import __version__
from dannucnet.atomic import remove_pending
from dannucnet.errors import DanNucNetError

COMMAND_MODULES = (
    "demo",
    "segment",
    "serve",
    "train",
    "evaluate",
    "export_training",
    "batch",
    "import_geojson",
    "batch_slides",
    "synth",
    "models",
)


#: Commands that install their own SIGTERM handling (``serve`` drains its requests first).
OWN_SIGTERM_HANDLING = frozenset({"serve"})
#: Exit status after SIGTERM: 128 + 15, as a shell reports a process the signal ended.
TERMINATED_EXIT = 128 + signal.SIGTERM
INTERRUPTED_EXIT = 128 + signal.SIGINT  # 130, the shell's code for Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM (a supervisor, ``kill``, a job scheduler), delivered exactly like Ctrl-C.

    Raising it in the main thread unwinds the same ``with``/``finally`` blocks as SIGINT, so the
    atomic writers remove their ``.part`` files and workers are shut down; without it SIGTERM
    killed the process on the spot and left them behind.
    """


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated`; the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load_commands() -> list[ModuleType]:
    modules = []
    for name in COMMAND_MODULES:
        try:
            modules.append(importlib.import_module(f"dannucnet.commands.{name}"))
        except ModuleNotFoundError as exc:  # a command not built yet during development
            if exc.name != f"dannucnet.commands.{name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dannucnet",
        description="DAN-NucNet nuclei segmentation for H&E images, whole slides and QuPath projects.",
    )
    parser.add_argument("--version", action="version", version=f"dannucnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _load_commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    signals = contextlib.nullcontext() if args.command in OWN_SIGTERM_HANDLING else sigterm_as_interrupt()
    try:
        with signals:
            return int(args._run(args) or 0)
    except DanNucNetError as exc:
        print(f"dannucnet {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        remove_pending()  # a temporary file the signal caught before any ``finally`` knew of it
        print(f"dannucnet {args.command}: terminated (SIGTERM); partial outputs removed", file=sys.stderr)
        return TERMINATED_EXIT
    except KeyboardInterrupt:
        remove_pending()
        print(f"dannucnet {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


def entry() -> None:
    """The process entry (the ``dannucnet`` command and ``python -m dannucnet``): :func:`main`, then exit.

    After Ctrl-C the outputs are already cleaned up (:func:`main`), so the process leaves at once with
    130. A normal exit would first wait for worker threads still inside a read or a forward pass, and
    the interpreter's shutdown then sometimes ended the process by SIGINT itself (exit -2, not 130):
    5 of 20 interrupted runs on OpenVINO, 1 of 12 on PyTorch; 0 of 25 with this.
    """
    code = main()
    if code == INTERRUPTED_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
