"""Plain-text layout for the command line: one record a line, columns that fit a width.

Nothing here wraps a record over several lines: a column that does not fit is cut with an
ellipsis (identifiers never are), so a listing reads the same in a terminal, a CI log or a pipe.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence

ELLIPSIS = "…"
GAP = "  "
#: Width assumed when output is not a terminal and COLUMNS is unset (a CI log, a pipe).
PIPE_WIDTH = 120


def output_width() -> int:
    """``$COLUMNS`` if set, else the terminal's width, else :data:`PIPE_WIDTH`."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((80, 24)).columns
    return PIPE_WIDTH


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


def cut(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters (an ellipsis marks a cut)."""
    text = one_line(text)
    if len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + ELLIPSIS if width > 0 else ""


@dataclasses.dataclass
class Column:
    """A column of a listing. ``shrink`` columns may be cut down to ``min_width``, the lowest
    ``shrink_order`` first (then the rightmost); others keep their full width."""

    header: str
    values: list[str]
    shrink: bool = False
    min_width: int = 8
    shrink_order: int = 0
    #: Wraps a padded cell for display (colour), after the layout is decided.
    style: Callable[[str, str], str] | None = None


def columns(cols: Sequence[Column], width: int) -> list[str]:
    """The header line and one line per row, fitted into ``width`` where it can be."""
    widths = [max([len(c.header), *(len(one_line(v)) for v in c.values)]) for c in cols]
    excess = sum(widths) + len(GAP) * (len(cols) - 1) - width
    order = sorted(range(len(cols)), key=lambda i: (cols[i].shrink_order, -i))
    for i in order:
        if excess <= 0:
            break
        if cols[i].shrink:
            floor = min(widths[i], max(cols[i].min_width, len(cols[i].header)))
            taken = min(excess, widths[i] - floor)
            widths[i] -= taken
            excess -= taken
    rows = max((len(c.values) for c in cols), default=0)
    lines = [GAP.join(c.header.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    for r in range(rows):
        cells = []
        for c, w in zip(cols, widths, strict=True):
            value = c.values[r]
            padded = cut(value, w).ljust(w)
            cells.append(c.style(value, padded) if c.style else padded)
        lines.append(GAP.join(cells).rstrip())
    return lines


def wrapped(label: str, text: str, width: int, *, indent: int = 0, max_lines: int = 0) -> list[str]:
    """``label text`` wrapped at ``width``, continuation lines indented under the text;
    at most ``max_lines`` lines (0: all), the last one cut with an ellipsis."""
    lead = " " * indent + (f"{label} " if label else "")
    lines = textwrap.wrap(
        one_line(text) or "-",
        width=max(width, len(lead) + 20),
        initial_indent=lead,
        subsequent_indent=" " * len(lead),
        break_long_words=True,
        break_on_hyphens=False,
    )
    if max_lines and len(lines) > max_lines:
        last = lines[max_lines - 1][: max(width - 2, len(lead) + 1)]
        lines = [*lines[: max_lines - 1], f"{last} {ELLIPSIS}"]
    return lines
