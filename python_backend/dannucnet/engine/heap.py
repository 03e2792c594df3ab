"""Keep glibc's heap from growing with slide size.

The pipeline frees every chunk's arrays once its nuclei are out, yet peak RSS
still crept up from slide to slide (909 → 1234 → 1105 MB over three passes of
one 8192² slide; 822 → 831 MB with two arenas): glibc gives each thread that
allocates its own malloc arena (up to 8 × cores) and large freed blocks stay in
those arenas. Fewer arenas plus an occasional ``malloc_trim`` hand the memory
back, so the working set is set by the queue sizes, not by how long a slide
runs. Elsewhere (macOS, Windows, musl) these calls are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["limit_arenas", "trim"]

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # mallopt parameter number in glibc's malloc.h
_libc: ctypes.CDLL | None = None
_limited = False


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim"):
                _libc = lib
        except OSError:
            _libc = None
    return _libc


def limit_arenas(count: int = 2) -> bool:
    """Cap glibc malloc arenas for threads created from now on; True when applied (once per process)."""
    global _limited
    lib = _glibc()
    if lib is None or _limited:
        return _limited
    _limited = bool(lib.mallopt(_M_ARENA_MAX, int(count)))
    if not _limited:
        log.debug("mallopt(M_ARENA_MAX, %d) was refused", count)
    return _limited


def trim() -> None:
    """Return free heap pages to the OS (cheap: milliseconds, called once per chunk)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)
