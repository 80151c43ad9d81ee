"""The one table renderer: Markdown tables for parity reports, benchmarks and CLI output."""

from __future__ import annotations

from typing import Any, Sequence


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """Renders ``rows`` under ``head`` as an aligned Markdown table.

    Args:
        head: column titles.
        rows: one sequence of cells per row (each cell is ``str()``-ed);
            every row has ``len(head)`` cells.
        align: one character per column, ``"l"`` or ``"r"`` (default: all
            left). Right-aligned columns get a ``---:`` separator.

    Returns:
        The table as text, one line per row, without a trailing newline.

    Raises:
        ValueError: a row's length or ``align`` does not match ``head``.
    """
    align = align or "l" * len(head)
    if len(align) != len(head) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} must be one 'l' or 'r' per column ({len(head)} columns)")
    cells = [[str(c) for c in head]]
    for i, r in enumerate(rows):
        if len(r) != len(head):
            raise ValueError(f"table row {i} has {len(r)} cells, expected {len(head)}")
        cells.append([str(c) for c in r])
    widths = [max(3, *(len(r[j]) for r in cells)) for j in range(len(head))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
