"""The one way dannucnet writes a file: into a temporary file beside it, then renamed over it.

A reader (QuPath, a resumed cohort, a second process) therefore sees either
the old file or the complete new one, never half of one, and a run that fails,
is cancelled, interrupted (SIGINT) or terminated (SIGTERM: the CLI turns it
into the same ``KeyboardInterrupt``) leaves nothing behind.

The temporary file is ``.<name>.<8 hex>.part`` in the target's real folder
(symlinks followed, so the rename never crosses a file system and a link to
the output stays a link). It is created with ``O_EXCL``, so it can never
replace an existing file, not even one named like it, and with mode 0o666
filtered by the process umask, like any ``open(path, "w")``: under the usual
umask 022 results are readable by the group and others of a shared project
folder (``tempfile.mkstemp`` would make every output 0600). The data is
fsynced before the rename and the folder after it, so a power cut cannot
leave an empty file where the old one was.

Torch-free and dependency-free: every writer (GeoJSON, GeoParquet, overlay
PNG, TIFF, safetensors, JSON records) uses it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dannucnet.errors import OutputError

PART_SUFFIX = ".part"
#: Room kept for the ``.`` prefix and ``.<8 hex>.part`` suffix within a 255-byte file name.
_MAX_STEM = 200
_ATTEMPTS = 100


# Temporary files of this process not yet renamed or removed. A signal can strike between any two
# bytecodes, e.g. after os.open returned but before the writer holding the file was assigned, where
# no ``finally`` knows the file yet; so every one is registered *before* it is created, and
# remove_pending() (called by the CLI after an interrupt, and at exit) removes what is left.
_pending: set[Path] = set()
_pending_lock = threading.Lock()


def _register(tmp: Path) -> None:
    with _pending_lock:
        _pending.add(tmp)


def _forget(tmp: Path) -> None:
    with _pending_lock:
        _pending.discard(tmp)


def remove_pending() -> int:
    """Remove every temporary file this process created and has not committed; returns how many."""
    with _pending_lock:
        leftovers = list(_pending)
        _pending.clear()
    removed = 0
    for tmp in leftovers:
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


atexit.register(remove_pending)
if hasattr(os, "register_at_fork"):  # a forked child must never remove its parent's files
    os.register_at_fork(after_in_child=_pending.clear)


def _create_beside(destination: Path) -> tuple[Path, int]:
    """A new, empty temporary file next to ``destination`` and its descriptor."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    stem = destination.name[:_MAX_STEM]
    for _ in range(_ATTEMPTS):
        tmp = destination.with_name(f".{stem}.{secrets.token_hex(4)}{PART_SUFFIX}")
        _register(tmp)  # before it exists: see _pending
        try:
            return tmp, os.open(tmp, flags, 0o666)  # the kernel applies the umask to 0o666
        except FileExistsError:
            _forget(tmp)  # someone else's file: never ours to remove
            continue
        except OSError:
            _forget(tmp)
            raise
    raise FileExistsError(f"no free temporary name beside {destination} after {_ATTEMPTS} tries")


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; some file systems (and Windows) cannot open a folder, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _error(target: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {target}: {exc.strerror or exc}")


class AtomicFile:
    """A temporary file beside ``target`` that becomes ``target`` on :meth:`commit` or vanishes on :meth:`abort`.

    Write through :meth:`open` (a file object), or let a library write to :attr:`tmp` by name
    (tifffile, safetensors, pyarrow, torch.save): it truncates the file and keeps its mode.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        self.destination = Path(os.path.realpath(self.target))
        try:
            self.tmp, self._fd = _create_beside(self.destination)
        except OSError as exc:
            raise _error(self.target, exc) from None
        self._handle: IO[Any] | None = None
        self.done = False

    def open(self, mode: str = "wb", **kwargs: Any) -> IO[Any]:
        """A file object on the temporary file (closing it is optional; :meth:`commit` flushes it)."""
        self._handle = os.fdopen(self._fd, mode, closefd=False, **kwargs)
        return self._handle

    def commit(self) -> Path:
        """Flush, fsync and rename over the target; on failure the temporary file is removed."""
        try:
            if self._handle is not None and not self._handle.closed:
                self._handle.flush()
            os.fsync(self._fd)
            self._close()
            os.replace(self.tmp, self.destination)
            _forget(self.tmp)
        except OSError as exc:
            self.abort()
            raise _error(self.target, exc) from None
        except BaseException:
            self.abort()
            raise
        self.done = True
        _fsync_folder(self.destination.parent)
        return self.target

    def abort(self) -> None:
        """Drop the temporary file; the target is left as it was. Safe to call twice."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError, ValueError):
            self._close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
        _forget(self.tmp)

    def _close(self) -> None:
        handle, self._handle = self._handle, None
        fd, self._fd = self._fd, -1
        try:
            if handle is not None and not handle.closed:
                handle.close()  # closefd=False: the descriptor stays ours
        finally:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """All or nothing: commit if the block succeeded, else remove the file; an ``OSError`` in the
        block becomes one :class:`OutputError` naming the target."""
        if exc_type is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, OSError):
            raise _error(self.target, exc) from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: library.save(tmp)``: ``p`` appears only if the block succeeds.

    An ``OSError`` in the block becomes one :class:`OutputError` naming ``target``.
    """
    with AtomicFile(target) as file:
        yield file.tmp


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """``with atomic_open(p, "w", encoding="utf-8") as fh: ...``: like ``open`` but all-or-nothing."""
    with AtomicFile(target) as file:
        yield file.open(mode, **kwargs)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_open(target, "wb") as fh:
        fh.write(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    with atomic_open(target, "w", encoding=encoding, newline="") as fh:
        fh.write(text)
    return Path(target)
