"""Regions and slides → nuclei: the engine, geometry and slide reading put together.

The value types (:class:`Nucleus`, :class:`SegmentOptions`) live in torch-free modules
(``pipeline.types``, ``pipeline.options``); the runners (``segment_region``,
``segment_slide``, ...) need the engine and therefore torch. The names below are
re-exported lazily (PEP 562 ``__getattr__``) so that importing a value type, or this
package, does not load torch: ``dannucnet --help`` took 2.0 s with torch, 0.6 s without.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dannucnet.pipeline.options import SegmentOptions
    from dannucnet.pipeline.region import RegionResult, segment_region
    from dannucnet.pipeline.slide import SlidePlan, plan_slide, segment_slide
    from dannucnet.pipeline.types import Nucleus

#: public name → the submodule that defines it
_EXPORTS = {
    "Nucleus": "types",
    "SegmentOptions": "options",
    "RegionResult": "region",
    "segment_region": "region",
    "SlidePlan": "slide",
    "plan_slide": "slide",
    "segment_slide": "slide",
}

__all__ = ["Nucleus", "RegionResult", "SegmentOptions", "SlidePlan", "plan_slide", "segment_region", "segment_slide"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
