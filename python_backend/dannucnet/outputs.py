"""No command may destroy its input: the one rule every command that writes files checks first.

``refuse_clobbering(inputs, outputs, replaced)`` runs before any work and
raises :class:`~dannucnet.errors.InputError` (one line, exit 2) when

* an output is the same file or folder as an input, or as another output;
* an input lies inside a folder the command deletes or replaces wholesale
  (``export-training -o DIR`` and its ``DIR.partial``, a QuPath project's
  ``data/`` and backup folders).

``refuse_inside(folders, outputs)`` refuses an output that is, or lies inside,
a folder another program owns (``export-training -o`` in a QuPath project).

"The same" means what the operating system means, not the spelling: both
paths resolved (``realpath``: ``..``, symlinks, and the case of the name on a
case-insensitive file system via ``normcase``), and for files that exist also
their device and inode, which catches hard links and case-insensitive file
systems where ``normcase`` is a no-op (macOS). The temporary ``.part`` files
beside an output need no check: :mod:`dannucnet.atomic` creates them with
``O_EXCL`` under a fresh random name, so they cannot replace anything.

Each path comes with the label the user typed (``-o``, ``--overlay``,
``input``...), so the message says which two arguments collide. Cost: one
``realpath`` and one ``stat`` per path, and dictionary look-ups: a 10,000-slide
``batch-slides`` (10,000 inputs, 30,000 outputs and records) took 0.55-0.72 s
on the 2-core build machine under load.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Union

from dannucnet.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]
#: (label shown to the user, path); a ``None`` path (an option not given) is skipped.
Named = tuple[str, PathLike | None]
Given = tuple[str, PathLike]  # a Named whose path was given
#: What a model folder holds (``model.card.CARD_FILE``, ``WEIGHTS_FILE``, ``train.loop.CHECKPOINT``;
#: spelled out because importing those modules imports torch, 2-4 s before a refusal could be printed).
MODEL_FILES = ("model_card.json", "weights.safetensors", "checkpoint.pt")


def _real(path: PathLike) -> str:
    return os.path.normcase(os.path.realpath(os.path.abspath(os.fspath(path))))


def _inode(path: PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if st.st_ino else None  # st_ino is 0 where the platform has none


def _identity(path: PathLike) -> tuple[str, tuple[int, int] | None]:
    return _real(path), _inode(path)


class _Known:
    """Paths seen so far, found again by resolved name or by inode."""

    def __init__(self) -> None:
        self.by_name: dict[str, Given] = {}
        self.by_inode: dict[tuple[int, int], Given] = {}

    def find(self, identity: tuple[str, tuple[int, int] | None]) -> Given | None:
        name, inode = identity
        hit = self.by_name.get(name)
        if hit is None and inode is not None:
            hit = self.by_inode.get(inode)
        return hit

    def add(self, label: str, path: PathLike, identity: tuple[str, tuple[int, int] | None] | None = None) -> None:
        name, inode = identity or _identity(path)
        self.by_name.setdefault(name, (label, path))
        if inode is not None:
            self.by_inode.setdefault(inode, (label, path))


def _given(paths: Iterable[Named]) -> list[Given]:
    return [(label, path) for label, path in paths if path is not None and os.fspath(path) != ""]


def refuse_clobbering(
    inputs: Iterable[Named], outputs: Iterable[Named], replaced: Iterable[Named] = ()
) -> None:
    """Raise ``InputError`` if writing ``outputs`` (or replacing the ``replaced`` folders) would touch an input."""
    known_inputs = _Known()
    for label, path in _given(inputs):
        known_inputs.add(label, path)
    known_outputs = _Known()
    for label, path in _given(outputs):
        identity = _identity(path)
        hit = known_inputs.find(identity)
        if hit is not None:
            raise InputError(
                f"{label} {os.fspath(path)} resolves to {hit[0]} {os.fspath(hit[1])}: writing it would destroy "
                f"that input; choose another output (nothing was written)"
            )
        hit = known_outputs.find(identity)
        if hit is not None:
            raise InputError(
                f"{label} {os.fspath(path)} resolves to {hit[0]} {os.fspath(hit[1])}: one output would "
                f"overwrite the other; give them different names (nothing was written)"
            )
        known_outputs.add(label, path, identity)
    folders = _Known()
    for label, path in _given(replaced):
        folders.add(label, path)
    if not folders.by_name:
        return
    for label, path in _given(inputs):
        hit = _enclosing(folders, path)
        if hit is not None:
            raise InputError(
                f"{hit[0]} {os.fspath(hit[1])} would be replaced, and it holds {label} {os.fspath(path)}; "
                f"choose another output folder (nothing was written)"
            )


def refuse_inside(folders: Iterable[Named], outputs: Iterable[Named]) -> None:
    """Raise ``InputError`` if an output is one of ``folders`` or lies inside one.

    For folders another program owns as a whole (a QuPath project folder): writing or replacing
    anything in there, e.g. its ``data/``, would destroy what that program keeps.
    """
    known = _Known()
    for label, path in _given(folders):
        known.add(label, path)
    for label, path in _given(outputs):
        hit = _enclosing(known, path)
        if hit is not None:
            raise InputError(
                f"{label} {os.fspath(path)} would write into {hit[0]} {os.fspath(hit[1])} and could destroy "
                f"what is there; choose an output folder outside it (nothing was written)"
            )


def _enclosing(folders: _Known, path: PathLike) -> Given | None:
    """The first of ``folders`` that is ``path`` or holds it (label, path), else None."""
    for ancestor in (Path(_real(path)), *Path(_real(path)).parents):
        hit = folders.find(_identity(ancestor))
        if hit is not None:
            return hit
    return None


def model_inputs(model: str | None, label: str = "--model") -> list[Named]:
    """The files of a ``--model`` given as a folder (or its card): inputs no output may replace.

    A model given by name lives in ``models/`` or ``DANNUCNET_MODELS``; resolving names needs torch
    (``dannucnet.model``), so only paths are covered here, which is where a user types an output.
    """
    if not model:
        return []
    path = Path(model).expanduser()
    folder = path if path.is_dir() else path.parent if path.name == MODEL_FILES[0] else None
    if folder is None:
        return []
    return [(label, folder), *((label, folder / name) for name in MODEL_FILES)]
