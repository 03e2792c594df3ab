"""What counts as a number where a file a user wrote (a model card, dataset.json) needs one.

JSON hands Python ``True`` (an int to Python), strings, NaN and infinities (Python's json reads
``NaN`` and ``Infinity``) and integers of any size (``10**400`` is valid JSON, and ``float()`` of it
overflows). Every check of such a value goes through these two, so none of them forgets a case.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite_float", "is_number"]


def is_number(value: Any) -> bool:
    """A finite number: an int of any size or a finite float; not a bool, not a string.

    Whole numbers too large for a float count; compare them with their bounds before ``float()``.
    """
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is no number or too large for one."""
    if not is_number(value):
        return None
    try:
        return float(value)
    except OverflowError:
        return None
