"""``report``'s text: an aligned table for a terminal, CSV for a spreadsheet, JSON for scripts.

Every text cell that came from outside (a model name a client chose) is made safe for where it
goes: a terminal's escapes are written out (`terminal_safe`), a spreadsheet's formulas stay text
(`spreadsheet_safe`); JSON escapes control characters itself. Amounts are exact decimal text.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from proxy.formats import decimal_text, iso_instant
from proxy.ledger.report import COUNT_FIELDS, Line, Report


def render(report: Report, fmt: str) -> str:
    """The report as ``table``, ``csv`` or ``json`` text."""
    if fmt == "json":
        return json.dumps(_json(report), indent=2)
    if fmt == "csv":
        return _csv(report)
    return _table(report)


def _cells(report: Report, line: Line) -> list[str]:
    keys = list(line.keys) or ["TOTAL", *([""] * (len(report.by) - 1))]
    return [
        *keys,
        *(str(line.counts[f]) for f in COUNT_FIELDS),
        *(decimal_text(line.costs[c]) for c in report.currencies),
    ]


def _header(report: Report) -> list[str]:
    return [*report.by, *COUNT_FIELDS, *report.currencies]


def _csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_header(report))
    text = len(report.by)
    writer.writerows(
        [*(spreadsheet_safe(c) for c in cells[:text]), *cells[text:]]
        for cells in (_cells(report, line) for line in (*report.lines, report.total))
    )
    return out.getvalue().rstrip("\n")


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """A text cell a spreadsheet will not run: one starting like a formula gets a leading
    apostrophe (OWASP's advice for CSV injection). Only text columns (team, model) pass here,
    and a client chooses the model name: ``=HYPERLINK(...)`` must stay text."""
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


def terminal_safe(cell: str) -> str:
    """A text cell with every non-printable character written as its escape (``\\x1b``),
    so a model name cannot move the cursor, recolour or clear the operator's terminal."""
    if cell.isprintable():
        return cell
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in cell)


def _table(report: Report) -> str:
    span = report.time_range
    caption = (
        f"Calls started from {_bound_text(span.since, 'the first row')} "
        f"until {_bound_text(span.until, 'the last row')} (exclusive)"
    )
    rows = [_cells(report, line) for line in (*report.lines, report.total)]
    return caption + "\n" + table(_header(report), rows, text_columns=len(report.by))


def _bound_text(instant: datetime | None, open_end: str) -> str:
    return open_end if instant is None else iso_instant(instant)


def _json(report: Report) -> dict[str, Any]:
    span = report.time_range
    return {
        "since": None if span.since is None else iso_instant(span.since),
        "until": None if span.until is None else iso_instant(span.until),
        "by": list(report.by),
        "currencies": list(report.currencies),
        "rows": [
            {**dict(zip(report.by, line.keys, strict=True)), **_json_numbers(line)}
            for line in report.lines
        ],
        "total": _json_numbers(report.total),
    }


def _json_numbers(line: Line) -> dict[str, Any]:
    return {**line.counts, "cost": {c: decimal_text(v) for c, v in line.costs.items()}}


def table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int) -> str:
    """Aligned plain-text columns: the first `text_columns` left-aligned (and made safe for a
    terminal), numbers right-aligned."""
    rows = [[*(terminal_safe(c) for c in r[:text_columns]), *r[text_columns:]] for r in rows]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i < text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join(line(r) for r in (header, *rows))
