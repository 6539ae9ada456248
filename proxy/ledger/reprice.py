"""Re-pricing stored rows with the current price book (``python -m proxy reprice``).

When the book is corrected (a rate was misquoted, a holiday calendar arrives, a change's start
instant becomes known), the rows it priced are priced again from their stored tokens at the
instant that priced them the first time. `plan_reprice` computes what would change, without
writing; `apply_plan` writes it. The command runs both inside one transaction
(`Queries.transaction`: SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's under the ledger commands'
lock), so the rows it read are the rows it rewrites and no one sees half a re-pricing. Both
ledgers are read and written by the same code, through `proxy.ledger.queries`.

Only the pricing outcome is compared (priced or not and why, billed model, versions, tier,
amounts, savings and the engine's flags), never the book's digest: a row the new book prices
identically keeps the digest of the book that priced it, so running the same book twice changes
nothing. Every replaced amount goes to ``cost_history`` first, so no past figure is lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

from proxy.formats import ZERO, decimal_text
from proxy.ledger.queries import Queries, record_values
from proxy.ledger.report import TimeRange
from proxy.ledger.report_render import table
from proxy.ledger.rows import RECORD_COLUMNS
from proxy.pricing import PriceBook, Pricer, Pricing
from proxy.pricing.engine import (
    FLAG_ENDPOINT_FALLBACK,
    FLAG_NO_HOLIDAY_CALENDAR,
    FLAG_PROVISIONAL_HOLIDAY,
    FLAG_REASONING_EXCEEDS_OUTPUT,
    FLAG_UNKNOWN_TOOL,
)
from proxy.records import UsageRecord
from proxy.usage import TokenUsage

# Rows that have tokens to price. `in_flight` rows never do; the state test says so explicitly.
_REPRICEABLE = (
    "state = 'final' AND usage_source IN ('reported', 'estimated') "
    "AND cache_hit_tokens IS NOT NULL AND cache_miss_tokens IS NOT NULL "
    "AND output_tokens IS NOT NULL AND reasoning_tokens IS NOT NULL"
)
# Every stored field of the record but its key: a changed row is written whole, from a record
# that differs from the stored one only in what a pricing decides.
_UPDATE_ROW = (
    f"UPDATE usage SET ({', '.join(RECORD_COLUMNS[1:])}) = "  # noqa: S608
    f"({', '.join('?' * (len(RECORD_COLUMNS) - 1))}) WHERE request_id = ?"
)


@dataclass(frozen=True, slots=True)
class Change:
    """A stored record (`old`, priced at `old.priced_at`) and the same priced by the current
    book (`new`), with the billing day its spend counts on."""

    old: UsageRecord
    new: UsageRecord
    day: date


@dataclass(slots=True)
class GroupDiff:
    """Old and new totals of one (team, model) over the rows re-priced."""

    team: str
    model: str
    rows: int = 0
    changed: int = 0
    now_priced: int = 0
    """Rows unpriced before and priced by the current book."""
    now_unpriced: int = 0
    """Rows priced before that the current book cannot price."""
    old: dict[str, Decimal] = field(default_factory=dict)
    new: dict[str, Decimal] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    book_digest: str
    currencies: tuple[str, ...]
    rows: int
    changes: tuple[Change, ...]
    groups: tuple[GroupDiff, ...]


_PRICE_FLAGS = (
    FLAG_ENDPOINT_FALLBACK,
    FLAG_NO_HOLIDAY_CALENDAR,
    FLAG_PROVISIONAL_HOLIDAY,
    FLAG_REASONING_EXCEEDS_OUTPUT,
)


def is_price_flag(flag: str) -> bool:
    """Flags the pricing engine sets; re-pricing replaces these and keeps the usage flags."""
    return flag in _PRICE_FLAGS or flag.startswith(FLAG_UNKNOWN_TOOL)


def plan_reprice(queries: Queries, book: PriceBook, time_range: TimeRange) -> Plan:
    """What re-pricing the rows in `time_range` with `book` would change. Reads only."""
    rows = load_rows(queries, time_range)
    pricer = Pricer(book)  # one memo for the run: most rows share a model and an hour
    changes = []
    groups: dict[tuple[str, str], GroupDiff] = {}
    for old, day in rows:
        assert old.priced_at is not None  # `load_rows` gives every row the instant to keep
        pricing = pricer.price(old.model_requested, _tokens(old), old.priced_at, old.endpoint)
        new = _repriced(old, pricing)
        changed = new != old
        if changed:
            changes.append(Change(old, new, day))
        key = (old.team, old.model_requested)
        _tally(groups.setdefault(key, GroupDiff(*key)), old, new, changed)
    currencies = _currencies(book, groups.values())
    return Plan(
        book.digest, currencies, len(rows), tuple(changes), tuple(groups[k] for k in sorted(groups))
    )


def load_rows(queries: Queries, time_range: TimeRange) -> list[tuple[UsageRecord, date]]:
    """Every row in range that has token counts, as its record and billing day, oldest
    first. A record's `priced_at` is the instant that priced it (``priced_at``, else
    ``started_at``): re-pricing keeps it."""
    where, params = time_range.where()
    condition = f"{_REPRICEABLE} AND {where}"
    costs: dict[str, dict[str, Decimal]] = {}
    savings: dict[str, dict[str, Decimal]] = {}
    # Only constant SQL text is interpolated; the range bounds are parameters.
    for request_id, currency, amount, saved in queries.execute(
        "SELECT request_id, currency, amount, cache_savings FROM usage_cost WHERE "  # noqa: S608
        f"request_id IN (SELECT request_id FROM usage WHERE {condition})",
        params,
    ):
        costs.setdefault(request_id, {})[currency] = Decimal(amount)
        savings.setdefault(request_id, {})[currency] = Decimal(saved)
    rows = []
    for *values, day in queries.execute(
        f"SELECT {', '.join(RECORD_COLUMNS)}, billing_day FROM usage "  # noqa: S608
        f"WHERE {condition} ORDER BY started_at, request_id",
        params,
    ):
        request_id = values[0]
        record = queries.record(values, costs.get(request_id, {}), savings.get(request_id, {}))
        if record.priced_at is None:
            record = dataclasses.replace(record, priced_at=record.started_at)
        rows.append((record, queries.day(day)))
    return rows


def _tokens(record: UsageRecord) -> TokenUsage:
    hit, miss, output = record.cache_hit_tokens, record.cache_miss_tokens, record.output_tokens
    reasoning = record.reasoning_tokens
    # `_REPRICEABLE` selects only rows with all four.
    assert hit is not None and miss is not None and output is not None and reasoning is not None
    return TokenUsage(hit, miss, output, reasoning, record.tool_calls)


def _repriced(old: UsageRecord, pricing: Pricing) -> UsageRecord:
    """The record priced by `pricing`, as `proxy.metering.build_record` stores a pricing; its
    usage flags are kept."""
    return dataclasses.replace(
        old,
        priced=pricing.priced,
        unpriced_reason=pricing.reason,
        billed_model=pricing.billed_model,
        price_version=pricing.version_id,
        schedule_version=pricing.schedule_version_id,
        tier=pricing.tier,
        costs={c: cost.total for c, cost in pricing.costs.items()},
        cache_savings={c: cost.cache_savings for c, cost in pricing.costs.items()},
        flags=(*(f for f in old.flags if not is_price_flag(f)), *pricing.flags),
    )


def _tally(group: GroupDiff, old: UsageRecord, new: UsageRecord, changed: bool) -> None:
    group.rows += 1
    group.changed += int(changed)
    group.now_priced += int(new.priced and not old.priced)
    group.now_unpriced += int(old.priced and not new.priced)
    for totals, price_of in ((group.old, old), (group.new, new)):
        for currency, amount in price_of.costs.items():
            totals[currency] = totals.get(currency, ZERO) + amount


def _currencies(book: PriceBook, groups: Iterable[GroupDiff]) -> tuple[str, ...]:
    """The book's currencies, then any other currency the old rows were priced in."""
    extra = {c for g in groups for c in g.old if c not in book.currencies}
    return (*book.currencies, *sorted(extra))


def apply_plan(queries: Queries, plan: Plan, replaced_at: datetime) -> None:
    """Write a plan: history first, then costs, rows and daily spend (caller holds the
    transaction, the same one `plan_reprice` read in)."""
    spend: dict[tuple[str, date, str], Decimal] = {}
    for change in plan.changes:
        _keep_history(queries, change, replaced_at, plan.book_digest)
        _replace_costs(queries, change)
        _update_row(queries, change, plan.book_digest)
        old, new = change.old.costs, change.new.costs
        for currency in {*old, *new}:
            key = (change.old.team, change.day, currency)
            delta = new.get(currency, ZERO) - old.get(currency, ZERO)
            spend[key] = spend.get(key, ZERO) + delta
    for (team, day, currency), delta in sorted(spend.items()):
        if delta != 0:
            queries.add_spend(team, day, currency, delta)


def _keep_history(queries: Queries, change: Change, stamp: datetime, new_book: str) -> None:
    """One history row per currency the row had or gets (NULL: it had no price in it)."""
    old = change.old
    queries.executemany(
        "INSERT INTO cost_history VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                old.request_id,
                currency,
                old.costs.get(currency),
                old.price_book,
                old.price_version,
                stamp,
                new_book,
            )
            for currency in sorted({*old.costs, *change.new.costs})
        ],
    )


def _replace_costs(queries: Queries, change: Change) -> None:
    new = change.new
    queries.execute("DELETE FROM usage_cost WHERE request_id = ?", (new.request_id,))
    queries.executemany(
        "INSERT INTO usage_cost VALUES (?, ?, ?, ?)",
        [
            (new.request_id, currency, amount, new.cache_savings.get(currency, ZERO))
            for currency, amount in new.costs.items()
        ],
    )


def _update_row(queries: Queries, change: Change, new_book: str) -> None:
    new = dataclasses.replace(change.new, price_book=new_book)
    queries.execute(_UPDATE_ROW, (*record_values(new)[1:], new.request_id))


def render_plan(plan: Plan) -> str:
    """Per (team, model): rows, rows changed, rows newly (un)priced, and per currency the old
    total, the new total and the delta; then the same over everything."""
    header = ["team", "model", "rows", "changed", "now_priced", "now_unpriced"]
    for currency in plan.currencies:
        header += [f"old_{currency}", f"new_{currency}", f"delta_{currency}"]
    total = GroupDiff("TOTAL", "")
    for group in plan.groups:
        _add_group(total, group)
    cells = [_group_cells(g, plan.currencies) for g in (*plan.groups, total)]
    summary = (
        f"{plan.rows} row(s) with usage in range; {len(plan.changes)} priced differently "
        f"by book {plan.book_digest[:12]}"
    )
    return summary + "\n" + table(header, cells, text_columns=2)


def _add_group(total: GroupDiff, group: GroupDiff) -> None:
    total.rows += group.rows
    total.changed += group.changed
    total.now_priced += group.now_priced
    total.now_unpriced += group.now_unpriced
    for mine, theirs in ((total.old, group.old), (total.new, group.new)):
        for currency, amount in theirs.items():
            mine[currency] = mine.get(currency, ZERO) + amount


def _group_cells(group: GroupDiff, currencies: Sequence[str]) -> list[str]:
    cells = [
        group.team,
        group.model,
        str(group.rows),
        str(group.changed),
        str(group.now_priced),
        str(group.now_unpriced),
    ]
    for currency in currencies:
        old, new = group.old.get(currency, ZERO), group.new.get(currency, ZERO)
        cells += [decimal_text(old), decimal_text(new), signed(new - old)]
    return cells


def signed(delta: Decimal) -> str:
    """A delta with its sign: ``+0.5``, ``-0.5``, ``0``."""
    return ("+" if delta > 0 else "") + decimal_text(delta)
