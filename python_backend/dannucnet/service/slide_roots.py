"""Which files ``SegmentSlide`` may open: only those under the configured slide roots.

Paths are resolved (symlinks followed) *before* the containment check, so
neither ``..`` nor a symlink pointing outside a root can reach other files, and
the refusal message is the same whether or not the outside file exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import grpc

from dannucnet.errors import InputError
from dannucnet.service.limits import MAX_NAME_BYTES, MAX_PATH_BYTES
from dannucnet.service.status import ServiceError, invalid


def prepare_roots(roots: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Resolve and check the --slide-root folders at start-up."""
    resolved = []
    for root in roots:
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise InputError(f"--slide-root {root} is not a folder")
        resolved.append(path)
    return resolved


def resolve_slide(path: str, roots: Sequence[Path]) -> Path:
    """The real path of ``path`` if it names a file inside one of ``roots``."""
    if not roots:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "SegmentSlide is disabled on this server: start it with --slide-root DIR to allow reading slides",
        )
    if not path:
        raise invalid("path is empty: give the slide's path relative to a slide root")
    if "\x00" in path:
        raise invalid("path contains a NUL character")
    _check_length(path)
    requested = Path(path)
    if ".." in requested.parts:
        raise _outside(path)
    candidates = [requested] if requested.is_absolute() else [root / requested for root in roots]
    for candidate in candidates:
        try:
            real = candidate.resolve(strict=False)
        except (OSError, RuntimeError):  # symlink loops
            continue
        if not any(real.is_relative_to(root) for root in roots):
            continue
        try:
            if real.is_file():
                return real
        except OSError:  # ENAMETOOLONG after symlinks, EACCES, ...
            continue
    if requested.is_absolute() and not any(
        _safe_resolve(requested).is_relative_to(root) for root in roots
    ):
        raise _outside(path)
    if not requested.is_absolute() and all(
        not _safe_resolve(root / requested).is_relative_to(root) for root in roots
    ):
        raise _outside(path)
    raise ServiceError(grpc.StatusCode.NOT_FOUND, f"slide {path!r} not found under the server's slide roots")


def _check_length(path: str) -> None:
    encoded = path.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_PATH_BYTES:
        raise invalid(f"path is {len(encoded):,} bytes long, more than {MAX_PATH_BYTES:,} (the system's limit)")
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in path.split("/")), default=0)
    if longest > MAX_NAME_BYTES:
        raise invalid(
            f"path has a {longest:,}-byte file or folder name, more than {MAX_NAME_BYTES} (the system's limit)"
        )


def _safe_resolve(path: Path) -> Path:
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError):
        return path


def _outside(path: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED,
        f"slide path {path!r} is outside the server's slide roots (no '..', no links leading out); "
        "give a path inside a --slide-root folder",
    )
