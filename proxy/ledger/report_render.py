"""``report``'s text: an aligned table for a terminal, CSV for a spreadsheet, JSON for scripts.

Every text cell that came from outside (a model name a client chose) is made safe for where it
goes: a terminal's escapes are written out (`terminal_safe`), a spreadsheet's formulas stay text
(`spreadsheet_safe`); JSON escapes control characters itself. Amounts are exact decimal text.

The period is shown in the billing timezone (``--since 2026-12-01`` is
``2026-12-01T00:00:00+08:00`` in Asia/Shanghai), as the bounds were given. CSV is for
spreadsheets: a header and one row per group, no caption and no total row unless asked
(`render`'s `csv_total`), since a total row is counted again by a pivot table; a group without a
label (the tier of an unpriced call) is an empty cell there, ``-`` in the table, ``null`` in JSON.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from proxy.formats import decimal_text
from proxy.ledger.report import COUNT_FIELDS, Line, Report, TimeRange

MISSING = "-"
"""A missing label (an unpriced call's tier or billed model) in a table."""


def render(report: Report, fmt: str, *, csv_total: bool = False) -> str:
    """The report as ``table``, ``csv`` or ``json`` text; `csv_total` adds the TOTAL row to
    CSV (the table always has it, JSON has it apart from the rows)."""
    if fmt == "json":
        return json.dumps(_json(report), indent=2)
    if fmt == "csv":
        return _csv(report, csv_total)
    return _table(report)


def figure_header(currencies: Sequence[str]) -> list[str]:
    """The headings of `figure_cells`."""
    return [*COUNT_FIELDS, *currencies]


def figure_cells(line: Line, currencies: Sequence[str]) -> list[str]:
    """A line's counts and costs as text, in `figure_header`'s order."""
    return [
        *(str(line.counts[f]) for f in COUNT_FIELDS),
        *(decimal_text(line.costs[c]) for c in currencies),
    ]


def _cells(report: Report, line: Line, missing: str) -> list[str]:
    keys = [missing if k is None else k for k in line.keys] or [
        "TOTAL",
        *([""] * (len(report.by) - 1)),
    ]
    return [*keys, *figure_cells(line, report.currencies)]


def _header(report: Report) -> list[str]:
    return [*report.by, *figure_header(report.currencies)]


def _csv(report: Report, with_total: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_header(report))
    text = len(report.by)
    lines = (*report.lines, report.total) if with_total else report.lines
    writer.writerows(
        [*(spreadsheet_safe(c) for c in cells[:text]), *cells[text:]]
        for cells in (_cells(report, line, "") for line in lines)
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
    rows = [_cells(report, line, MISSING) for line in (*report.lines, report.total)]
    caption = terminal_safe(period_text(report.time_range, report.timezone, report.team))
    return caption + "\n" + table(_header(report), rows, text_columns=len(report.by))


def local_instant(instant: datetime, timezone: ZoneInfo) -> str:
    """An instant as ISO 8601 in the billing timezone, with its offset."""
    return instant.astimezone(timezone).isoformat()


def period_text(span: TimeRange, timezone: ZoneInfo, team: str | None = None) -> str:
    """The calls a report sums, in a sentence."""
    since = "the first row" if span.since is None else local_instant(span.since, timezone)
    until = "the last row" if span.until is None else local_instant(span.until, timezone)
    calls = "Calls" if team is None else f"Calls of team {team}"
    return (
        f"{calls} started from {since} until {until} (exclusive); billing timezone {timezone.key}"
    )


def _json(report: Report) -> dict[str, Any]:
    span, tz = report.time_range, report.timezone
    return {
        "since": None if span.since is None else local_instant(span.since, tz),
        "until": None if span.until is None else local_instant(span.until, tz),
        "timezone": tz.key,
        "team": report.team,
        "by": list(report.by),
        "currencies": list(report.currencies),
        "rows": [
            {**dict(zip(report.by, line.keys, strict=True)), **json_figures(line)}
            for line in report.lines
        ],
        "total": json_figures(report.total),
    }


def json_figures(line: Line) -> dict[str, Any]:
    """A line's counts, costs and cache savings as JSON (amounts as exact decimal text)."""
    return {
        **line.counts,
        "cost": {c: decimal_text(v) for c, v in line.costs.items()},
        "cache_savings": {c: decimal_text(v) for c, v in line.savings.items()},
    }


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
