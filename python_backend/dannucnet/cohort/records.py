"""Small JSON records beside each output: what made it (for resuming) or why it failed.

Why a sidecar rather than the GeoJSON's own metadata: the model name and
version live in each feature's metadata, so a slide without nuclei would carry
none, and reading a 10^6-feature file to find them would cost more than a
skip should. Records are written atomically (temp file + rename), after the
output itself, so a record never vouches for a file that is not complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dannucnet.atomic import write_text

DONE_SUFFIX = ".done.json"
FAILED_SUFFIX = ".failed.json"


@dataclass
class DoneRecord:
    input: str
    output: str
    model: str
    model_version: str
    nuclei: int
    seconds: float
    finished: float  # unix time


def _sidecar(output: Path, suffix: str) -> Path:
    return output.with_name(output.name + suffix)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=1))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_done(output: Path, record: DoneRecord) -> None:
    output = Path(output)
    _write_json_atomic(_sidecar(output, DONE_SUFFIX), asdict(record))
    _sidecar(output, FAILED_SUFFIX).unlink(missing_ok=True)


def read_done(output: Path) -> DoneRecord | None:
    data = _read_json(_sidecar(Path(output), DONE_SUFFIX))
    if data is None:
        return None
    try:
        return DoneRecord(**{k: data[k] for k in DoneRecord.__dataclass_fields__})
    except (KeyError, TypeError):
        return None


def is_done(output: Path, model: str, model_version: str) -> bool:
    """True when ``output`` exists and was made by this model name and version."""
    output = Path(output)
    record = read_done(output)
    return (
        output.is_file()
        and record is not None
        and record.model == model
        and str(record.model_version) == str(model_version)
    )


def write_failure(output: Path, input_path: str, error: str, message: str, attempts: int) -> Path:
    path = _sidecar(Path(output), FAILED_SUFFIX)
    _write_json_atomic(path, {"input": str(input_path), "error": error, "message": message,
                              "attempts": attempts, "finished": time.time()})
    return path


def read_failure(output: Path) -> dict[str, Any] | None:
    return _read_json(_sidecar(Path(output), FAILED_SUFFIX))
