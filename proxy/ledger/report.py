"""Spend and tokens from the ledger, grouped and summed exactly (``python -m proxy report``).

The ledger, SQLite or PostgreSQL, is read with plain queries (`proxy.ledger.queries`), never
through a store: opening the SQLite store recovers ``in_flight`` rows, which would mark a
running proxy's live calls ``interrupted``. Costs are summed exactly by the database (SQLite's
`decimal_sum` over decimal text, PostgreSQL's ``sum`` over ``numeric``), then as `Decimal`,
never as floats, so the total is exactly the sum of the lines in every format, and the same
text from either ledger. Lines are sorted here, by code point, not by the database (whose
collation may differ).

A line counts every row dispatched in the range, ``in_flight`` ones included (DeepSeek saw those
calls); rows with no token counts add 0 tokens and show up in `unpriced` instead.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

from proxy.formats import ZERO, decimal_text, iso_instant
from proxy.ledger.queries import Queries
from proxy.ledger.rows import BILLABLE_SQL

GROUP_COLUMNS: Mapping[str, str] = MappingProxyType(
    {
        "team": "team",
        "model": "model_requested",
        "day": "billing_day",
    }
)
"""``--by`` key -> usage column. The only names ever put into report SQL."""
DEFAULT_GROUPS = ("team", "model")
TOKEN_FIELDS = ("cache_hit", "cache_miss", "output", "reasoning")
COUNT_FIELDS = ("requests", *TOKEN_FIELDS, "unpriced", "estimated")

# One SQL expression per COUNT_FIELDS entry, in the same order, valid in both ledgers (``priced``
# is an integer in SQLite, a boolean in PostgreSQL: ``NOT priced`` reads both). NULL token counts
# (unknown usage, calls still in flight) add nothing; such rows are counted by `unpriced`.
_COUNT_SQL = (
    "COUNT(*)",
    "SUM(COALESCE(cache_hit_tokens, 0))",
    "SUM(COALESCE(cache_miss_tokens, 0))",
    "SUM(COALESCE(output_tokens, 0))",
    "SUM(COALESCE(reasoning_tokens, 0))",
    f"COUNT(*) FILTER (WHERE NOT priced AND {BILLABLE_SQL})",
    "COUNT(*) FILTER (WHERE usage_source = 'estimated')",
)


def parse_bound(text: str) -> date:
    """An ISO date (a billing day) or an ISO instant with offset, for ``--since``/``--until``.

    A date stays a `date` until the billing timezone is known (`bound_instant`), because the
    config that names the timezone is read after the arguments.
    """
    if len(text) == 10:
        return date.fromisoformat(text)
    instant = datetime.fromisoformat(text)
    if instant.tzinfo is None:
        raise ValueError(f"{text!r} has no timezone offset; add Z (UTC) or e.g. +08:00 (Beijing)")
    return instant


def bound_instant(value: date, timezone: ZoneInfo) -> datetime:
    """The instant a bound stands for: a date means 00:00 of that day in the billing timezone."""
    if isinstance(value, datetime):
        return value
    return datetime.combine(value, time(), tzinfo=timezone)


@dataclass(frozen=True, slots=True)
class TimeRange:
    """Rows whose `started_at` is in ``[since, until)``; a missing bound is open."""

    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> tuple[str, list[datetime]]:
        """A SQL condition on ``started_at`` and its parameters, instants that each ledger
        binds as it stores them (SQLite: fixed-width UTC text, whose order is time's)."""
        clauses = ["TRUE"]
        params: list[datetime] = []
        for condition, bound in (("started_at >= ?", self.since), ("started_at < ?", self.until)):
            if bound is not None:
                clauses.append(condition)
                params.append(bound)
        return " AND ".join(clauses), params


@dataclass(frozen=True, slots=True)
class Line:
    """One group of rows (or the total, whose `keys` are empty)."""

    keys: tuple[str, ...]
    counts: Mapping[str, int]
    """`COUNT_FIELDS` -> sum."""
    costs: Mapping[str, Decimal]
    """Currency -> exact sum; 0 for a currency the group never spent in."""


@dataclass(frozen=True, slots=True)
class Report:
    time_range: TimeRange
    by: tuple[str, ...]
    currencies: tuple[str, ...]
    lines: tuple[Line, ...]
    total: Line


def ledger_currencies(queries: Queries) -> tuple[str, ...]:
    """Every currency the ledger holds a cost in, sorted."""
    rows = queries.execute("SELECT DISTINCT currency FROM usage_cost")
    return tuple(sorted(str(r[0]) for r in rows))


def build_report(
    queries: Queries, time_range: TimeRange, by: Sequence[str], currencies: Sequence[str]
) -> Report:
    """Sum the ledger's rows in `time_range`, grouped by the `by` keys (sorted by them)."""
    keys = ", ".join(GROUP_COLUMNS[k] for k in by)  # KeyError on any name not in the table
    where, params = time_range.where()
    money = queries.money_sum("amount")
    # The interpolated names come from GROUP_COLUMNS, _COUNT_SQL and the ledger's exact sum
    # only; values are parameters.
    count_rows = queries.execute(
        f"SELECT {keys}, {', '.join(_COUNT_SQL)} FROM usage WHERE {where} "  # noqa: S608
        f"GROUP BY {keys}",
        params,
    )
    cost_rows = queries.execute(
        f"SELECT {keys}, currency, {money} FROM usage "  # noqa: S608
        f"JOIN usage_cost USING (request_id) WHERE {where} GROUP BY {keys}, currency",
        params,
    )
    width = len(by)
    costs: dict[tuple[str, ...], dict[str, Decimal]] = {}
    for row in cost_rows:
        group = tuple(str(k) for k in row[:width])  # a day is a `date` in PostgreSQL
        costs.setdefault(group, {})[row[width]] = Decimal(row[width + 1])
    lines = []
    for row in sorted(count_rows, key=lambda r: tuple(str(k) for k in r[:width])):
        group = tuple(str(k) for k in row[:width])
        spent = costs.get(group, {})
        lines.append(
            Line(
                group,
                dict(zip(COUNT_FIELDS, (int(v) for v in row[width:]), strict=True)),
                {c: spent.get(c, ZERO) for c in currencies},
            )
        )
    return Report(time_range, tuple(by), tuple(currencies), tuple(lines), _total(lines, currencies))


def _total(lines: Sequence[Line], currencies: Sequence[str]) -> Line:
    counts = {f: sum(line.counts[f] for line in lines) for f in COUNT_FIELDS}
    costs = {c: sum((line.costs[c] for line in lines), ZERO) for c in currencies}
    return Line((), counts, costs)


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
