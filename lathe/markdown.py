"""Markdown text shared by Lathe's reports: one helper for pipe tables.

Nothing here imports anything heavy; the callers format and escape their own cells.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Delimiter-row cell per alignment; "" (or no `align` at all) leaves the column unaligned.
_RULES = {"": "---", "left": ":---", "center": ":---:", "right": "---:"}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured pipe table, one line per row, ending in a newline.

    Every cell is written as `str(cell)` between "| " and " |": escaping `|` and newlines is the
    caller's job (they know which cells hold code spans or already escaped text). `align` holds one
    of "", "left", "center", "right" per column. ValueError on no columns, an unknown alignment, or
    a row or `align` whose length differs from `headers`.

    >>> print(markdown_table(["stage", "seconds"], [["a", "1.0"]], align=["", "right"]), end="")
    | stage | seconds |
    |---|---:|
    | a | 1.0 |
    """
    if not headers:
        raise ValueError("a markdown table needs at least one column")
    if align is None:
        align = [""] * len(headers)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    unknown = [a for a in align if a not in _RULES]
    if unknown:
        raise ValueError(f"unknown alignment {unknown[0]!r}; expected one of {sorted(_RULES)}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "".join(f"{_RULES[a]}|" for a in align)]
    for number, row in enumerate(rows, 1):
        if len(row) != len(headers):
            raise ValueError(f"row {number} has {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"
