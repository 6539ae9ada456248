"""A team's monthly statement (``python -m proxy statement``): its figures, and the sections
both renderings show.

A statement is several `proxy.ledger.report` reports of one team over one month of the billing
timezone, each grouped another way (by tier, model, key, each tag the team's calls carried,
day, outcome, unpriced reason), so
every figure in it is the figure ``report --team T --since <month> --until <next month>
--by <key>`` prints, summed by the same code. Its sections (`sections`) are the cells, as
text, that the text rendering (`proxy.ledger.statement_text`) and the HTML page
(`proxy.ledger.statement_html`) both lay out: the two can only differ in layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from proxy.attribution import TAG_KEY
from proxy.formats import ZERO, decimal_text
from proxy.ledger.queries import Queries
from proxy.ledger.report import (
    COUNT_FIELDS,
    Line,
    Report,
    TimeRange,
    bound_instant,
    build_report,
    sort_key,
)
from proxy.ledger.report import total as sum_lines
from proxy.ledger.report_render import MISSING, figure_cells, figure_header, period_text
from proxy.periods import period_end

TOP_KEYS = 10
"""Keys shown by name by default; the others are summed in one line."""


@dataclass(frozen=True, slots=True)
class Statement:
    team: str
    month: date
    """The month's first day."""
    timezone: ZoneInfo
    time_range: TimeRange
    currencies: tuple[str, ...]
    by_tier: Report
    by_model: Report
    by_day: Report
    by_key: Report
    by_outcome: Report
    by_unpriced_reason: Report
    top: int
    """How many keys (and values of each tag) are shown by name."""
    by_tags: tuple[tuple[str, Report], ...] = ()
    """For each tag key the team's calls carried this month, the month's report
    ``--by tag:NAME``, in name order."""

    @property
    def total(self) -> Line:
        """The month's total (every report of the statement has the same)."""
        return self.by_day.total

    def top_keys(self) -> tuple[Line, ...]:
        """The `top` keys that spent most (in the first currency, then most requests), and,
        if there are more keys, one line summing the rest."""
        return self.top_lines(self.by_key.lines, "key")

    def top_lines(self, lines: Sequence[Line], noun: str) -> tuple[Line, ...]:
        """The `top` lines that spent most (in the first currency, then most requests), and,
        if there are more, one line summing the rest (``(N other <noun>s)``)."""
        first = self.currencies[:1]
        ranked = sorted(
            lines,
            key=lambda line: (
                *(-line.costs[c] for c in first),
                -line.counts["requests"],
                sort_key(line.keys),
            ),
        )
        shown, rest = ranked[: self.top], ranked[self.top :]
        if not rest:
            return tuple(shown)
        others = sum_lines(rest, self.currencies)
        label = f"({len(rest)} other {noun}{'s' if len(rest) > 1 else ''})"
        return (*shown, Line((label,), others.counts, others.costs, others.savings))

    def day_costs(self, currency: str) -> tuple[tuple[date, Decimal], ...]:
        """Every day of the month and what it cost in `currency` (0 for a day without calls)."""
        spent = {line.keys[0]: line.costs[currency] for line in self.by_day.lines}
        count = (period_end(self.month, "month") - self.month).days
        days = (self.month + timedelta(days=n) for n in range(count))
        return tuple((day, spent.get(day.isoformat(), ZERO)) for day in days)


def month_range(month: date, timezone: ZoneInfo) -> TimeRange:
    """From 00:00 of the month's first day to 00:00 of the next month's, in `timezone`."""
    return TimeRange(
        bound_instant(month, timezone), bound_instant(period_end(month, "month"), timezone)
    )


def build_statement(
    queries: Queries,
    team: str,
    month: date,
    timezone: ZoneInfo,
    currencies: Sequence[str],
    top: int = TOP_KEYS,
) -> Statement:
    """`team`'s statement for the month whose first day is `month`."""
    span = month_range(month, timezone)

    def by(key: str) -> Report:
        return build_report(queries, span, (key,), currencies, timezone, team)

    tags = tuple((name, by(f"tag:{name}")) for name in tag_names(queries, span, team))

    return Statement(
        team,
        month,
        timezone,
        span,
        tuple(currencies),
        by("tier"),
        by("model"),
        by("day"),
        by("key"),
        by("outcome"),
        by("unpriced_reason"),
        top,
        tags,
    )


def tag_names(queries: Queries, span: TimeRange, team: str) -> tuple[str, ...]:
    """Every tag key on `team`'s calls in `span`, sorted: the keys the ledger holds, which may
    differ from today's config (a key since removed still has its calls)."""
    where, params = span.where()
    if queries.dialect == "sqlite":
        sql = (
            "SELECT DISTINCT j.key FROM usage, json_each(usage.tags) AS j "  # noqa: S608
            f"WHERE team = ? AND {where}"
        )
    else:
        sql = f"SELECT DISTINCT jsonb_object_keys(tags) FROM usage WHERE team = ? AND {where}"  # noqa: S608
    names = {str(row[0]) for row in queries.execute(sql, [team, *params])}
    # Only keys a config could allow: a spill file edited by hand may hold any string.
    return tuple(sorted(name for name in names if TAG_KEY.fullmatch(name)))


@dataclass(frozen=True, slots=True)
class Section:
    """A titled table of a statement, as text cells; `slug` names it in the HTML page."""

    slug: str
    title: str
    note: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    text_columns: int
    """How many leading columns are labels (the rest are figures)."""
    total: bool = True
    """Whether the last row is the total of those above."""


def title(statement: Statement) -> str:
    return f"Statement of team {statement.team} for {statement.month:%Y-%m}"


def period(statement: Statement) -> str:
    return period_text(statement.time_range, statement.timezone)


def sections(statement: Statement) -> tuple[Section, ...]:
    """The statement's tables, in order; every figure from its reports."""
    total = statement.total
    currencies = statement.currencies
    ranked_in = f" in {currencies[0]}" if currencies else ""
    return (
        Section(
            "totals",
            "Totals",
            "What the month's priced calls cost, and what cache hits saved against "
            "cache-miss prices (already taken off the cost).",
            ("", *currencies),
            (
                ("cost", *(decimal_text(total.costs[c]) for c in currencies)),
                ("cache savings", *(decimal_text(total.savings[c]) for c in currencies)),
            ),
            1,
            total=False,
        ),
        Section(
            "calls",
            "Calls and tokens",
            "requests: every call sent to DeepSeek; billable: those DeepSeek may bill (all but "
            "the calls it refused or never received); unpriced and estimated: see below.",
            COUNT_FIELDS,
            (tuple(str(total.counts[f]) for f in COUNT_FIELDS),),
            0,
            total=False,
        ),
        _figures(
            "tiers",
            "Peak and off-peak",
            f"The price tier each call was billed at (peak, off_peak, ...); {MISSING} for "
            "calls with no price.",
            "tier",
            statement.by_tier.lines,
            statement,
        ),
        _figures(
            "models",
            "By model",
            "The model each call asked for.",
            "model",
            statement.by_model.lines,
            statement,
        ),
        _figures(
            "keys",
            "Top keys",
            f"Keys by spend{ranked_in}: at most {statement.top} by name, the rest summed in one "
            f"line; {len(statement.by_key.lines)} had calls this month.",
            "key",
            statement.top_keys(),
            statement,
        ),
        *(
            _figures(
                f"tag-{name}",
                f"Top values of tag {name}",
                f"The x-proxy-tags value of {name}{ranked_in}: at most {statement.top} by name, "
                f"the rest summed in one line; {MISSING}: calls without this tag.",
                name,
                statement.top_lines(report.lines, "value"),
                statement,
            )
            for name, report in statement.by_tags
        ),
        _figures(
            "days",
            "Per day",
            f"Billing days in {statement.timezone.key}.",
            "day",
            statement.by_day.lines,
            statement,
        ),
        _called_out(
            "unpriced",
            "Unpriced calls",
            "Billable calls with no price, so in no cost above, by reason. Once the price book "
            "has their price, python -m proxy reprice prices them.",
            statement.by_unpriced_reason,
            "unpriced",
        ),
        _called_out(
            "estimated",
            "Estimated usage",
            "Calls whose usage DeepSeek never sent (the answer ended early), by how they "
            "ended: their tokens are estimated from what was sent and relayed, and priced so.",
            statement.by_outcome,
            "estimated",
        ),
    )


def _label(line: Line) -> str:
    return MISSING if line.keys[0] is None else line.keys[0]


def _figures(
    slug: str, name: str, note: str, heading: str, lines: Sequence[Line], statement: Statement
) -> Section:
    """A table of lines of one key, with every count and cost, and the month's total."""
    currencies = statement.currencies
    rows = [(_label(line), *figure_cells(line, currencies)) for line in lines]
    rows.append(("TOTAL", *figure_cells(statement.total, currencies)))
    return Section(slug, name, note, (heading, *figure_header(currencies)), tuple(rows), 1)


def _called_out(slug: str, name: str, note: str, report: Report, count: str) -> Section:
    """The groups of `report` that hold calls counted by `count`, and how many each."""
    rows = [(_label(line), str(line.counts[count])) for line in report.lines if line.counts[count]]
    rows.append(("TOTAL", str(report.total.counts[count])))
    return Section(slug, name, note, (report.by[0], "calls"), tuple(rows), 1)
