"""Reconciliation's SQL, written once for both ledgers over `proxy.ledger.queries.Queries`.

The tables (`proxy.ledger.schema`, `proxy.ledger.pg_schema`): ``balance_snapshots`` holds each
poll's balances as DeepSeek stated them; ``balance_windows`` the windows the poller has
*settled*, each with the running sums since the currency's first snapshot; ``balance_poller``
the lease of the one process that polls.

Why settled windows: the metrics export the running drift on every scrape, and summing every
window since the first snapshot each time would read the whole ledger. So each poll, in the
transaction that stores its snapshot, settles every window up to the *previous* snapshot:
its ledger cost is read one whole interval after the window ended, so records still queued in
a writer (every worker and replica has its own, flushing every 0.1 s) are in. The newest window
stays live: `figures` computes it from the ledger at each scrape. ``report reconcile``
recomputes every window from the snapshots and the ledger as they are (`windows`), so it and
the metrics agree exactly, unless a record reached the ledger more than an interval after its
call ended (a ledger outage, a spill file replayed, ``reprice --apply``): then the report has
the right figure, and the metrics' running sums keep what the ledger said when they settled.

Instants are bound as each ledger stores them (SQLite: fixed-width UTC text, whose order is
time's; PostgreSQL: ``timestamptz``), money as exact decimals (text, ``numeric``).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from proxy.formats import ZERO
from proxy.ledger.queries import Queries
from proxy.reconcile.balance import Balance
from proxy.reconcile.drift import Running, Snapshot, Window, window

ROLE = "balance"
"""The ``balance_poller`` row of the lease."""
_CLAIM = (
    "INSERT INTO balance_poller (role, owner, lease_until) VALUES ('balance', ?, ?) "
    "ON CONFLICT (role) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until "
    "WHERE balance_poller.owner = excluded.owner OR balance_poller.lease_until < ? "
    "RETURNING owner"
)
_SNAPSHOT = (
    "INSERT INTO balance_snapshots (taken_at, currency, total_balance, granted_balance, "
    "topped_up_balance, owner) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_SNAPSHOTS = (
    "SELECT taken_at, currency, total_balance, granted_balance, topped_up_balance "
    "FROM balance_snapshots "
)
_TAKEN_AT = _SNAPSHOTS + "WHERE taken_at = ?"
_BEFORE = _SNAPSHOTS + "WHERE currency = ? AND taken_at < ? ORDER BY taken_at DESC LIMIT 1"
_OF_CURRENCY = _SNAPSHOTS + "WHERE currency = ?"
_SETTLE = (
    "INSERT INTO balance_windows (currency, ended_at, started_at, spend, ledger_cost, "
    "spend_sum, cost_sum) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_LAST_SETTLED = (
    "SELECT ended_at, spend_sum, cost_sum FROM balance_windows WHERE currency = ? "
    "ORDER BY ended_at DESC LIMIT 1"
)


class OutOfOrder(Exception):
    """A snapshot not later than the newest one in the ledger (the message says which)."""


Selection = Collection[str] | None
"""The currencies reconciled (`proxy.config.ProxyConfig.reconcile_currencies`); None: all."""


def instant(value: Any) -> datetime:
    """A stored instant: SQLite's ISO text, or PostgreSQL's ``timestamptz``."""
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


def stored_amount(value: Any) -> Decimal:
    """A stored amount: SQLite's decimal text, or PostgreSQL's ``numeric``."""
    return value if isinstance(value, Decimal) else Decimal(value)


def chosen(currency: str, selection: Selection) -> bool:
    return selection is None or currency in selection


# --- the poller's lease ------------------------------------------------------------------------


def claim(queries: Queries, owner: str, now: datetime, until: datetime) -> bool:
    """Take the lease for `owner` until `until`, or renew it: granted when no one holds it,
    `owner` holds it, or its holder's lease ended before `now`. One statement, so two
    processes claiming at once cannot both win."""
    return bool(queries.execute(_CLAIM, (owner, until, now)))


def release(queries: Queries, owner: str) -> None:
    """Give the lease up (a clean stop): another process may poll at once."""
    queries.execute("DELETE FROM balance_poller WHERE owner = ?", (owner,))


def poller(queries: Queries) -> tuple[str, datetime] | None:
    """Who holds the lease, and until when."""
    rows = queries.execute("SELECT owner, lease_until FROM balance_poller WHERE role = 'balance'")
    return (str(rows[0][0]), instant(rows[0][1])) if rows else None


# --- snapshots and windows ---------------------------------------------------------------------


def store(
    queries: Queries,
    taken_at: datetime,
    balances: Sequence[Balance],
    owner: str | None,
    selection: Selection = None,
) -> None:
    """Store one poll's balances and settle every window before the newest, in one
    transaction. `OutOfOrder` if the ledger holds a snapshot taken at or after `taken_at`:
    windows only ever extend forwards, so what was settled stays what the report computes."""
    with queries.transaction():
        newest = queries.execute("SELECT max(taken_at) FROM balance_snapshots")
        if newest and newest[0][0] is not None and instant(newest[0][0]) >= taken_at:
            raise OutOfOrder(
                f"the ledger has a snapshot taken at {instant(newest[0][0]).isoformat()}, not "
                f"before this one ({taken_at.isoformat()}): a clock gone back, or a process "
                "whose clock is behind the others'"
            )
        queries.executemany(
            _SNAPSHOT,
            [(taken_at, b.currency, b.total, b.granted, b.topped_up, owner) for b in balances],
        )
        for balance in balances:
            if chosen(balance.currency, selection):
                settle(queries, balance.currency)


def settle(queries: Queries, currency: str) -> None:
    """Settle the windows of `currency` from its last settled one up to its second newest
    snapshot, each with its running sums (inside the caller's transaction)."""
    running, since = _settled(queries, currency)
    snapshots = currency_snapshots(queries, currency, since)
    rows = []
    for current in between(queries, snapshots[:-1]):  # the newest window stays live
        running = running.plus(current)
        rows.append(
            (
                currency,
                current.end,
                current.start,
                current.spend,
                current.ledger_cost,
                running.spend,
                running.ledger_cost,
            )
        )
    if rows:
        queries.executemany(_SETTLE, rows)


def _settled(queries: Queries, currency: str) -> tuple[Running, datetime | None]:
    """The running sums up to `currency`'s last settled window, and where it ended."""
    rows = queries.execute(_LAST_SETTLED, (currency,))
    if not rows:
        return Running(), None
    ended, spend, cost = rows[0]
    return Running(stored_amount(spend), stored_amount(cost)), instant(ended)


def currency_snapshots(
    queries: Queries,
    currency: str,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Snapshot]:
    """`currency`'s snapshots taken in ``[since, until)`` (open where None), in time order."""
    sql = _OF_CURRENCY
    params: list[object] = [currency]
    if since is not None:
        sql += " AND taken_at >= ?"
        params.append(since)
    if until is not None:
        sql += " AND taken_at < ?"
        params.append(until)
    return sorted(
        (_snapshot(row) for row in queries.execute(sql, params)), key=lambda s: s.taken_at
    )


def _snapshot(row: Sequence[Any]) -> Snapshot:
    taken_at, currency, total, granted, topped_up = row
    return Snapshot(
        instant(taken_at),
        Balance(
            str(currency), stored_amount(total), stored_amount(granted), stored_amount(topped_up)
        ),
    )


def between(queries: Queries, snapshots: Sequence[Snapshot]) -> list[Window]:
    """The windows between consecutive `snapshots` (one currency, in time order), each with
    the ledger's cost of the calls that ended in it."""
    return [
        window(
            before,
            after,
            ledger_costs(queries, before.taken_at, after.taken_at).get(
                after.balance.currency, ZERO
            ),
        )
        for before, after in itertools.pairwise(snapshots)
    ]


def ledger_costs(queries: Queries, start: datetime, end: datetime) -> dict[str, Decimal]:
    """The ledger's cost per currency of the calls that ended in ``(start, end]``: final rows
    only (a call still running has not ended; one whose process died is ``interrupted``,
    with unknown usage and no cost, which the drift then shows)."""
    money = queries.money_sum("c.amount")
    rows = queries.execute(
        f"SELECT c.currency, {money} "  # noqa: S608
        "FROM usage u JOIN usage_cost c ON c.request_id = u.request_id "
        "WHERE u.state = 'final' AND u.ended_at > ? AND u.ended_at <= ? GROUP BY c.currency",
        (start, end),
    )
    return {str(currency): stored_amount(amount) for currency, amount in rows if amount is not None}


def windows(
    queries: Queries,
    since: datetime | None = None,
    until: datetime | None = None,
    selection: Selection = None,
) -> list[Window]:
    """Every window whose end is in ``[since, until)``, per currency then in time order, each
    computed from the snapshots and the ledger as they are now (``report reconcile``). The
    first starts at the last snapshot before `since`."""
    rows = queries.execute("SELECT DISTINCT currency FROM balance_snapshots")
    found: list[Window] = []
    for currency in sorted(str(row[0]) for row in rows):
        if not chosen(currency, selection):
            continue
        snapshots = currency_snapshots(queries, currency, since, until)
        if since is not None:
            earlier = queries.execute(_BEFORE, (currency, since))
            snapshots[:0] = [_snapshot(row) for row in earlier]
        found += between(queries, snapshots)
    return found


# --- what the metrics export -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reconciled:
    """One reconciled currency's drift: its newest window and the running sums."""

    last: Window | None
    """The newest window (None with a single snapshot)."""
    running: Running
    """Every window since the first snapshot, the newest included."""


@dataclass(frozen=True, slots=True)
class Figures:
    """The balance and drift as the ledger has them now, for the metrics."""

    balances: tuple[Snapshot, ...] = ()
    """Every currency of the newest poll."""
    reconciled: tuple[Reconciled, ...] = ()
    """The drift of each currency of the newest poll that is reconciled."""
    last_poll: datetime | None = None
    """When the newest snapshot was taken (None: never)."""


def figures(queries: Queries, selection: Selection = None) -> Figures:
    """The newest poll's balances, and for each reconciled currency the running sums of its
    settled windows plus the live ones (normally one: since the previous snapshot)."""
    rows = queries.execute("SELECT max(taken_at) FROM balance_snapshots")
    if not rows or rows[0][0] is None:
        return Figures()
    last = instant(rows[0][0])
    latest = sorted(
        (_snapshot(row) for row in queries.execute(_TAKEN_AT, (last,))),
        key=lambda s: s.balance.currency,
    )
    reconciled = []
    for snapshot in latest:
        currency = snapshot.balance.currency
        if not chosen(currency, selection):
            continue
        running, since = _settled(queries, currency)
        snapshots = currency_snapshots(queries, currency, since)
        live = between(queries, snapshots)
        for current in live:
            running = running.plus(current)
        reconciled.append(Reconciled(live[-1] if live else None, running))
    return Figures(tuple(latest), tuple(reconciled), last)
