"""Torch stays at the edge: the doors that only hand nuclei around do not load it.

Each check runs in a fresh interpreter, because this test process has long imported torch.
Loading torch costs ~1.5 s (``dannucnet --help`` took 2.0 s with it, 0.6 s without).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BACKEND = Path(__file__).resolve().parents[1] / "python_backend"


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BACKEND), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def _torch_after(statements: str) -> str:
    """``statements`` run in a fresh interpreter; returns what it printed: whether torch got loaded."""
    result = _run(f"import sys\n{statements}\nprint('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "statements",
    [
        "import dannucnet.client",
        "from dannucnet.catalogue import choose_model, possible_choices",
        "import dannucnet.formats",
        "import dannucnet.formats.geojson",
        "import dannucnet.formats.geoparquet",
        "import dannucnet.qupath",
        "import dannucnet.qupath.batch",
        "from dannucnet.pipeline import Nucleus, SegmentOptions",
        "from dannucnet.cli import build_parser; build_parser()",
    ],
)
def test_light_doors_do_not_import_torch(statements: str) -> None:
    assert _torch_after(statements) == "False", f"{statements!r} imported torch"


def test_the_runners_still_load_lazily_from_the_package() -> None:
    """``from dannucnet.pipeline import segment_slide`` keeps working; it is what loads torch."""
    assert _torch_after("from dannucnet.pipeline import segment_slide, segment_region, plan_slide") == "True"
    result = _run("import dannucnet.pipeline as p; p.no_such_name")
    assert result.returncode != 0 and "has no attribute 'no_such_name'" in result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["segment", "--help"]])
def test_help_answers_without_torch(argv: list[str]) -> None:
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['dannucnet', *{argv!r}]\n"
        "try:\n"
        "    runpy.run_module('dannucnet', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print('torch' in sys.modules)"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "usage: dannucnet" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(("setting", "expected"), [(None, "False"), ("1", "True"), ("0", "False")])
def test_numpy_huge_pages_are_off_unless_the_environment_asks(setting, expected):
    """dannucnet turns numpy's huge pages off (1.24× end to end on a 20× slide here) unless the user set them."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if setting is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = setting
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BACKEND), os.environ.get("PYTHONPATH")]))
    code = "import dannucnet, numpy; print(bool(numpy._core.multiarray._get_madvise_hugepage()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
