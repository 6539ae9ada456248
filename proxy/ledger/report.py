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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from types import MappingProxyType
from zoneinfo import ZoneInfo

from proxy.formats import ZERO
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
