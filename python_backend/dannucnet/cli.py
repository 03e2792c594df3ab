"""Command line: argument parsing only; every command lives in ``dannucnet.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Keeping commands in their own modules lets each door of
the pipeline (segment, serve, batch, ...) grow without touching the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import ModuleType

from dannucnet import __version__
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
    try:
        return int(args._run(args) or 0)
    except DanNucNetError as exc:
        print(f"dannucnet {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"dannucnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
