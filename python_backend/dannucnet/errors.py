"""User-facing errors.

Every failure a user can cause (a missing file, an image without pixel size,
an unknown model...) is raised as a :class:`DanNucNetError` whose message says
what to do. The CLI prints it as one line and exits non-zero; the server maps
it to a status code. Anything else escaping is a bug.
"""

from __future__ import annotations


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message as one line of ours: its first line (its type's name when it says nothing),
    cut to ``limit`` characters when given."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if limit is None else line[:limit]


class DanNucNetError(Exception):
    """Base class: a problem the user can fix, with a message saying how."""

    exit_code = 2


class InputError(DanNucNetError):
    """The input image, region or parameters cannot be used as given."""


class ModelError(DanNucNetError):
    """The model cannot be found, loaded or does not match its card."""


class OutputError(DanNucNetError):
    """The output cannot be written."""


class CancelledError(DanNucNetError):
    """The work was cancelled by the user or the client."""

    exit_code = 130
