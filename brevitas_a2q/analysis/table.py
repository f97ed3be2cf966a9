"""Plain-text tables of the accumulator reports."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["cell", "text_table"]


def cell(value: object, verdict: bool = False) -> str:
    """``-`` for None, ``yes``/``no`` for booleans (``yes``/``NO`` for a ``verdict``), else str."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ("NO" if verdict else "no")
    return str(value)


def text_table(titles: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, with a dashed line under the titles."""
    rows = [list(titles), *map(list, rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(titles))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
