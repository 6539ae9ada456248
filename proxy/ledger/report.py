"""Spend and tokens from the ledger, grouped and summed exactly (``python -m proxy report``).

The ledger, SQLite or PostgreSQL, is read with plain queries (`proxy.ledger.queries`), never
through a store: opening the SQLite store recovers ``in_flight`` rows, which would mark a
running proxy's live calls ``interrupted``. Costs are summed exactly by the database (SQLite's
`decimal_sum` over decimal text, PostgreSQL's ``sum`` over ``numeric``), then as `Decimal`,
never as floats, so the total is exactly the sum of the lines in every format, and the same
text from either ledger. Lines are sorted here, by code point, not by the database (whose
collation may differ). What a ``--by`` key groups by is `proxy.ledger.report_groups`.

A line counts every row dispatched in the range as a request, ``in_flight`` ones included
(DeepSeek saw those calls), and as `billable` those DeepSeek may bill: all but the calls it
refused or never received (`proxy.records.billable`), which cost nothing and are not priced.
Billable rows with no price (unknown usage, a model or instant the book lacks) add 0 tokens
and show up in `unpriced`, never as free. Costs are in every currency of the price book
(`report_currencies`), 0 where a group spent nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from zoneinfo import ZoneInfo

from proxy.formats import ZERO
from proxy.ledger.queries import Queries
from proxy.ledger.report_groups import group
from proxy.ledger.rows import BILLABLE_SQL

TOKEN_FIELDS = ("cache_hit", "cache_miss", "output", "reasoning")
COUNT_FIELDS = ("requests", "billable", *TOKEN_FIELDS, "unpriced", "estimated")

# One SQL expression per COUNT_FIELDS entry, in the same order, valid in both ledgers (``priced``
# is an integer in SQLite, a boolean in PostgreSQL: ``NOT priced`` reads both). NULL token counts
# (unknown usage, calls still in flight) add nothing; such rows are counted by `unpriced`.
_COUNT_SQL = (
    "COUNT(*)",
    f"COUNT(*) FILTER (WHERE {BILLABLE_SQL})",
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

    keys: tuple[str | None, ...]
    """The group's labels, one per ``--by`` key; None where the row has none (the tier of an
    unpriced call)."""
    counts: Mapping[str, int]
    """`COUNT_FIELDS` -> sum."""
    costs: Mapping[str, Decimal]
    """Currency -> exact sum; 0 for a currency the group never spent in."""
    savings: Mapping[str, Decimal]
    """Currency -> what cache hits saved against cache-miss prices, exactly."""


@dataclass(frozen=True, slots=True)
class Report:
    time_range: TimeRange
    timezone: ZoneInfo
    """The billing timezone, in which days, weeks and months are counted and bounds shown."""
    team: str | None
    """The only team summed, or None for all."""
    by: tuple[str, ...]
    currencies: tuple[str, ...]
    lines: tuple[Line, ...]
    total: Line


def ledger_currencies(queries: Queries) -> tuple[str, ...]:
    """Every currency the ledger holds a cost in, sorted."""
    rows = queries.execute("SELECT DISTINCT currency FROM usage_cost")
    return tuple(sorted(str(r[0]) for r in rows))


def report_currencies(book: Sequence[str], ledger: Sequence[str]) -> tuple[str, ...]:
    """The price book's currencies in its order, then any other the ledger holds costs in
    (from an older book), sorted: a currency never vanishes from a report because a period
    holds only unpriced calls."""
    return (*book, *sorted(set(ledger) - set(book)))


def build_report(
    queries: Queries,
    time_range: TimeRange,
    by: Sequence[str],
    currencies: Sequence[str],
    timezone: ZoneInfo,
    team: str | None = None,
) -> Report:
    """Sum the ledger's rows in `time_range` (of `team` only, if given), grouped by the `by`
    keys (`proxy.ledger.report_groups`; at least one), sorted by them."""
    groups = [group(k) for k in by]  # KeyError on a key that names none
    keys = ", ".join(g.sql(queries.dialect) for g in groups)
    positions = ", ".join(str(n) for n in range(1, len(groups) + 1))
    where, bounds = time_range.where()
    if team is not None:
        where += " AND team = ?"
    params = [*(p for g in groups for p in g.params), *bounds, *([] if team is None else [team])]
    money = f"{queries.money_sum('amount')}, {queries.money_sum('cache_savings')}"
    # The interpolated SQL comes from report_groups, _COUNT_SQL, TimeRange.where and the
    # ledger's exact sum only; values are parameters.
    count_rows = queries.execute(
        f"SELECT {keys}, {', '.join(_COUNT_SQL)} FROM usage WHERE {where} "  # noqa: S608
        f"GROUP BY {positions}",
        params,
    )
    cost_rows = queries.execute(
        f"SELECT {keys}, currency, {money} FROM usage "  # noqa: S608
        f"JOIN usage_cost USING (request_id) WHERE {where} GROUP BY {positions}, currency",
        params,
    )
    width = len(by)
    costs: dict[tuple[str | None, ...], dict[str, tuple[Decimal, Decimal]]] = {}
    for row in cost_rows:
        costs.setdefault(_labels(row[:width]), {})[row[width]] = (
            Decimal(row[width + 1]),
            Decimal(row[width + 2]),
        )
    lines = []
    for row in count_rows:
        labels = _labels(row[:width])
        spent = costs.get(labels, {})
        lines.append(
            Line(
                labels,
                dict(zip(COUNT_FIELDS, (int(v) for v in row[width:]), strict=True)),
                {c: spent.get(c, (ZERO, ZERO))[0] for c in currencies},
                {c: spent.get(c, (ZERO, ZERO))[1] for c in currencies},
            )
        )
    lines.sort(key=lambda line: sort_key(line.keys))
    return Report(
        time_range,
        timezone,
        team,
        tuple(by),
        tuple(currencies),
        tuple(lines),
        total(lines, currencies),
    )


def _labels(values: Sequence[object]) -> tuple[str | None, ...]:
    return tuple(None if v is None else str(v) for v in values)


def sort_key(labels: Sequence[str | None]) -> tuple[tuple[bool, str], ...]:
    """Labels in code-point order, a missing one after every other."""
    return tuple((label is None, label or "") for label in labels)


def total(lines: Sequence[Line], currencies: Sequence[str]) -> Line:
    """The exact sum of `lines`."""
    counts = {f: sum(line.counts[f] for line in lines) for f in COUNT_FIELDS}
    costs = {c: sum((line.costs[c] for line in lines), ZERO) for c in currencies}
    savings = {c: sum((line.savings[c] for line in lines), ZERO) for c in currencies}
    return Line((), counts, costs, savings)
