"""The one plain-text table every summary prints (export, batch, batch-slides, models, evaluate, the benchmarks).

Markdown tables (the evaluation report) are a document format, not this; they live with the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_table"]

GAP = "  "  # between columns: two spaces, so a one-space value ("time (s)") still reads as one cell


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], *, rule: bool = True, align: str | None = None
) -> str:
    """Columns padded to their widest cell; long cells are kept whole (logs are read, not laid out).

    ``align`` holds one ``<`` (left) or ``>`` (right) per column; by default a column whose values are
    all numbers is right-aligned, any other left. ``rule`` draws a dashed line under the header.
    ``None`` prints as an empty cell; trailing blanks are dropped.
    """
    cells = [[str(h) for h in header]] + [["" if v is None else str(v) for v in row] for row in rows]
    if align is None:
        align = "".join(
            ">" if rows and all(isinstance(row[i], (int, float)) for row in rows) else "<" for i in range(len(header))
        )
    if len(align) != len(header) or set(align) - {"<", ">"}:
        raise ValueError(f"align must hold one '<' or '>' per column ({len(header)}), not {align!r}")
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return GAP.join(c.rjust(w) if a == ">" else c.ljust(w) for c, w, a in zip(row, widths, align)).rstrip()

    out = [line(cells[0])]
    if rule:
        out.append(GAP.join("-" * w for w in widths))
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)
