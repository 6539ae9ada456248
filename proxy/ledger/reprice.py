"""Re-pricing stored rows with the current price book (``python -m proxy reprice``).

When the book is corrected (a rate was misquoted, a holiday calendar arrives, a change's start
instant becomes known), the rows it priced are priced again from their stored tokens at the
instant that priced them the first time. `plan_reprice` computes what would change, without
writing; `apply_plan` writes it. The command runs both inside one ``BEGIN IMMEDIATE``
transaction, so the rows it read are the rows it rewrites and the proxy's writer (which waits on
the lock and retries) never sees half a re-pricing.

Only the pricing outcome is compared (priced or not and why, billed model, versions, tier,
amounts, savings and the engine's flags), never the book's digest: a row the new book prices
identically keeps the digest of the book that priced it, so running the same book twice changes
nothing. Every replaced amount goes to ``cost_history`` first, so no past figure is lost.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from proxy.ledger.report import TimeRange, table
from proxy.ledger.store import add_spend, iso, money
from proxy.pricing import PriceBook, Pricing, price
from proxy.pricing.engine import (
    FLAG_NO_HOLIDAY_CALENDAR,
    FLAG_REASONING_EXCEEDS_OUTPUT,
    FLAG_UNKNOWN_TOOL,
)
from proxy.usage import TokenUsage

_ZERO = Decimal(0)
_ROW_COLUMNS = (
    "request_id",
    "team",
    "model_requested",
    "billing_day",
    "started_at",
    "priced_at",
    "cache_hit_tokens",
    "cache_miss_tokens",
    "output_tokens",
    "reasoning_tokens",
    "tool_calls",
    "priced",
    "unpriced_reason",
    "billed_model",
    "price_version",
    "schedule_version",
    "tier",
    "price_book",
    "flags",
)
# Rows that have tokens to price. `in_flight` rows never do; the state test says so explicitly.
_REPRICEABLE = (
    "state = 'final' AND usage_source IN ('reported', 'estimated') "
    "AND cache_hit_tokens IS NOT NULL AND cache_miss_tokens IS NOT NULL "
    "AND output_tokens IS NOT NULL AND reasoning_tokens IS NOT NULL"
)


@dataclass(frozen=True, slots=True)
class StoredPrice:
    """How a row is priced: what the ledger says now, or what the current book says."""

    priced: bool
    unpriced_reason: str | None
    billed_model: str | None
    price_version: str | None
    schedule_version: str | None
    tier: str | None
    costs: Mapping[str, Decimal]
    savings: Mapping[str, Decimal]
    flags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Row:
    """A stored row with usage, as re-pricing needs it."""

    request_id: str
    team: str
    model: str
    day: str
    at: datetime
    """The instant that priced it (`priced_at`, else `started_at`): re-pricing keeps it."""
    tokens: TokenUsage
    price_book: str
    stored: StoredPrice


@dataclass(frozen=True, slots=True)
class Change:
    row: Row
    new: StoredPrice


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


def is_price_flag(flag: str) -> bool:
    """Flags the pricing engine sets; re-pricing replaces these and keeps the usage flags."""
    return flag in (FLAG_NO_HOLIDAY_CALENDAR, FLAG_REASONING_EXCEEDS_OUTPUT) or flag.startswith(
        FLAG_UNKNOWN_TOOL
    )


def plan_reprice(conn: sqlite3.Connection, book: PriceBook, time_range: TimeRange) -> Plan:
    """What re-pricing the rows in `time_range` with `book` would change. Reads only."""
    rows = load_rows(conn, time_range)
    changes = []
    groups: dict[tuple[str, str], GroupDiff] = {}
    for row in rows:
        new = _stored_form(price(book, row.model, row.tokens, row.at), row.stored.flags)
        changed = new != row.stored
        if changed:
            changes.append(Change(row, new))
        key = (row.team, row.model)
        _tally(groups.setdefault(key, GroupDiff(*key)), row.stored, new, changed)
    currencies = _currencies(book, groups.values())
    return Plan(
        book.digest, currencies, len(rows), tuple(changes), tuple(groups[k] for k in sorted(groups))
    )


def load_rows(conn: sqlite3.Connection, time_range: TimeRange) -> list[Row]:
    """Every row in range that has token counts, with its stored costs, oldest first."""
    where, params = time_range.where()
    condition = f"{_REPRICEABLE} AND {where}"
    costs: dict[str, dict[str, tuple[Decimal, Decimal]]] = {}
    # Only constant SQL text is interpolated; the range bounds are parameters.
    for request_id, currency, amount, savings in conn.execute(
        "SELECT request_id, currency, amount, cache_savings FROM usage_cost WHERE "  # noqa: S608
        f"request_id IN (SELECT request_id FROM usage WHERE {condition})",
        params,
    ):
        costs.setdefault(request_id, {})[currency] = (Decimal(amount), Decimal(savings))
    stored = conn.execute(
        f"SELECT {', '.join(_ROW_COLUMNS)} FROM usage WHERE {condition} "  # noqa: S608
        "ORDER BY started_at, request_id",
        params,
    ).fetchall()
    return [_row(dict(zip(_ROW_COLUMNS, r, strict=True)), costs.get(r[0], {})) for r in stored]


def _row(values: Mapping[str, Any], costs: Mapping[str, tuple[Decimal, Decimal]]) -> Row:
    at = values["priced_at"] or values["started_at"]
    tokens = TokenUsage(
        values["cache_hit_tokens"],
        values["cache_miss_tokens"],
        values["output_tokens"],
        values["reasoning_tokens"],
        json.loads(values["tool_calls"]),
    )
    stored = StoredPrice(
        bool(values["priced"]),
        values["unpriced_reason"],
        values["billed_model"],
        values["price_version"],
        values["schedule_version"],
        values["tier"],
        {c: amount for c, (amount, _) in costs.items()},
        {c: savings for c, (_, savings) in costs.items()},
        tuple(json.loads(values["flags"])),
    )
    return Row(
        values["request_id"],
        values["team"],
        values["model_requested"],
        values["billing_day"],
        datetime.fromisoformat(at),
        tokens,
        values["price_book"],
        stored,
    )


def _stored_form(pricing: Pricing, old_flags: Sequence[str]) -> StoredPrice:
    """The stored form of a pricing, as `proxy.metering.build_record` stores it."""
    flags = (*(f for f in old_flags if not is_price_flag(f)), *pricing.flags)
    return StoredPrice(
        pricing.priced,
        pricing.reason,
        pricing.billed_model,
        pricing.version_id,
        pricing.schedule_version_id,
        pricing.tier,
        {c: cost.total for c, cost in pricing.costs.items()},
        {c: cost.cache_savings for c, cost in pricing.costs.items()},
        flags,
    )


def _tally(group: GroupDiff, old: StoredPrice, new: StoredPrice, changed: bool) -> None:
    group.rows += 1
    group.changed += int(changed)
    group.now_priced += int(new.priced and not old.priced)
    group.now_unpriced += int(old.priced and not new.priced)
    for totals, price_of in ((group.old, old), (group.new, new)):
        for currency, amount in price_of.costs.items():
            totals[currency] = totals.get(currency, _ZERO) + amount


def _currencies(book: PriceBook, groups: Iterable[GroupDiff]) -> tuple[str, ...]:
    """The book's currencies, then any other currency the old rows were priced in."""
    extra = {c for g in groups for c in g.old if c not in book.currencies}
    return (*book.currencies, *sorted(extra))


def apply_plan(conn: sqlite3.Connection, plan: Plan, replaced_at: datetime) -> None:
    """Write a plan: history first, then costs, rows and daily spend (caller holds the
    transaction, the same one `plan_reprice` read in)."""
    stamp = iso(replaced_at)
    assert stamp is not None
    spend: dict[tuple[str, str, str], Decimal] = {}
    for change in plan.changes:
        _keep_history(conn, change, stamp, plan.book_digest)
        _replace_costs(conn, change)
        _update_row(conn, change, plan.book_digest)
        old, new = change.row.stored.costs, change.new.costs
        for currency in {*old, *new}:
            key = (change.row.team, change.row.day, currency)
            delta = new.get(currency, _ZERO) - old.get(currency, _ZERO)
            spend[key] = spend.get(key, _ZERO) + delta
    for (team, day, currency), delta in sorted(spend.items()):
        if delta != 0:
            add_spend(conn, team, day, currency, delta)


def _keep_history(conn: sqlite3.Connection, change: Change, stamp: str, new_book: str) -> None:
    """One history row per currency the row had or gets (NULL: it had no price in it)."""
    row, old = change.row, change.row.stored
    for currency in sorted({*old.costs, *change.new.costs}):
        amount = old.costs.get(currency)
        conn.execute(
            "INSERT INTO cost_history VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.request_id,
                currency,
                None if amount is None else money(amount),
                row.price_book,
                old.price_version,
                stamp,
                new_book,
            ),
        )


def _replace_costs(conn: sqlite3.Connection, change: Change) -> None:
    request_id, new = change.row.request_id, change.new
    conn.execute("DELETE FROM usage_cost WHERE request_id = ?", (request_id,))
    conn.executemany(
        "INSERT INTO usage_cost VALUES (?, ?, ?, ?)",
        [
            (request_id, c, money(amount), money(new.savings.get(c, _ZERO)))
            for c, amount in new.costs.items()
        ],
    )


def _update_row(conn: sqlite3.Connection, change: Change, new_book: str) -> None:
    new = change.new
    conn.execute(
        "UPDATE usage SET priced = ?, unpriced_reason = ?, billed_model = ?, price_version = ?, "
        "schedule_version = ?, tier = ?, priced_at = ?, price_book = ?, flags = ? "
        "WHERE request_id = ?",
        (
            int(new.priced),
            new.unpriced_reason,
            new.billed_model,
            new.price_version,
            new.schedule_version,
            new.tier,
            iso(change.row.at),
            new_book,
            json.dumps(list(new.flags)),
            change.row.request_id,
        ),
    )


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
            mine[currency] = mine.get(currency, _ZERO) + amount


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
        old, new = group.old.get(currency, _ZERO), group.new.get(currency, _ZERO)
        cells += [money(old), money(new), signed(new - old)]
    return cells


def signed(delta: Decimal) -> str:
    """A delta with its sign: ``+0.5``, ``-0.5``, ``0``."""
    return ("+" if delta > 0 else "") + money(delta)
