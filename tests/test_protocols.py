"""The shared shapes (``dannucnet.protocols``) and the table formatter stay on the ground floor: no torch."""

from __future__ import annotations

import pytest

from test_imports import _torch_after


@pytest.mark.parametrize("module", ["dannucnet.protocols", "dannucnet.tables"])
def test_shared_pieces_do_not_import_torch(module: str) -> None:
    assert _torch_after(f"import {module}") == "False", f"importing {module} loaded torch"

