"""Resume bookkeeping for ``dannucnet batch``: which images are done with which model.

The ledger is one JSON file beside the project (``dannucnet-batch.json`` next to
``project.qpproj``). Each image goes through two states:

* ``writing`` – recorded (with the path of its backup) *before* the first byte
  of the image's data is touched;
* ``done`` – recorded after QuPath saved the image, with model name + version.

A run killed between the two leaves the image in ``writing``; the next run
restores its data folder from the backup before doing anything else, so a
half-written ``data.qpdata`` is never left behind. Every write of the ledger
itself is atomic (``dannucnet.atomic``: temporary file + rename).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dannucnet.atomic import atomic_open
from dannucnet.errors import OutputError

LEDGER_NAME = "dannucnet-batch.json"
LEDGER_VERSION = 1
DONE = "done"
WRITING = "writing"
FAILED = "failed"


def ledger_path(project_file: Path) -> Path:
    """Where the ledger of a project lives: beside ``project.qpproj``."""
    project_file = Path(project_file)
    folder = project_file if project_file.is_dir() else project_file.parent
    return folder / LEDGER_NAME


def atomic_write_json(path: Path, document: Any) -> None:
    """Write JSON so a crash leaves either the old or the new file, never half of one."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=2, sort_keys=True)


class Ledger:
    """Per-image state of batch runs over one project, keyed by QuPath entry id."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.images: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                document = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise OutputError(
                    f"the batch ledger {self.path} is unreadable ({exc}); delete it to start over "
                    "(every image will then be segmented again)"
                ) from None
            self.images = dict(document.get("images", {}))

    # -- queries ------------------------------------------------------------
    def is_done(self, entry_id: str, model: str, version: str) -> bool:
        """True when the image was finished with exactly this model name and version."""
        record = self.images.get(str(entry_id))
        return bool(
            record
            and record.get("status") == DONE
            and record.get("model") == model
            and record.get("model_version") == version
        )

    def interrupted(self) -> dict[str, dict[str, Any]]:
        """Images a killed run left in ``writing``: their data must be restored from backup."""
        return {k: v for k, v in self.images.items() if v.get("status") == WRITING}

    # -- updates (each one saved atomically) ------------------------------------
    def mark_writing(
        self, entry_id: str, image_name: str, model: str, version: str, backup: Path | None, entry_path: Path | None
    ) -> None:
        self._set(
            entry_id,
            status=WRITING,
            image=image_name,
            model=model,
            model_version=version,
            backup=str(backup) if backup else None,
            entry_path=str(entry_path) if entry_path else None,
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )

    def mark_done(self, entry_id: str, image_name: str, model: str, version: str, nuclei: int, seconds: float) -> None:
        self._set(
            entry_id,
            status=DONE,
            image=image_name,
            model=model,
            model_version=version,
            nuclei=int(nuclei),
            seconds=round(float(seconds), 2),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )

    def mark_failed(self, entry_id: str, image_name: str, model: str, version: str, error: str) -> None:
        self._set(entry_id, status=FAILED, image=image_name, model=model, model_version=version, error=error)

    def mark_restored(self, entry_id: str) -> None:
        record = self.images.get(str(entry_id), {})
        record = {**record, "status": FAILED, "error": "interrupted; data restored from backup"}
        self.images[str(entry_id)] = record
        self.save()

    def _set(self, entry_id: str, **record: Any) -> None:
        self.images[str(entry_id)] = record
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path,
                          {"format": "dannucnet-batch-ledger", "version": LEDGER_VERSION, "images": self.images})
