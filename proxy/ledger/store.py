"""The ledger store: usage records on disk, exactly, behind a small interface.

`LedgerStore` is what the rest of the proxy uses; `SQLiteLedger` is the embedded default, and
`proxy.ledger.pg_store.PostgresLedger` the one replicas share. Money is stored as decimal text and
summed with an exact `Decimal` aggregate (`decimal_sum`), never as floats. The tables are
described in `proxy.ledger.schema`, the rows in `proxy.ledger.rows`.

A process's in-flight rows and holds must not outlive it: when it dies they are released
(`release_owner`), by the supervisor of ``serve --workers N`` as soon as it reaps the worker,
and for every owner when the proxy starts.

A ledger file deleted or replaced while the proxy runs would go on taking writes that no one
can read again (the open connection keeps the unlinked file); `SQLiteLedger.moved` tells, and
`SQLiteLedger.save_copy` rescues what the connection still sees (`proxy.ledger.writer`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Protocol, runtime_checkable
from zoneinfo import ZoneInfo

from proxy.formats import ZERO, decimal_text
from proxy.ledger.connection import Transaction, connect, insert_rows
from proxy.ledger.rows import (
    INSERT_COST,
    INSERT_USAGE,
    ON_CONFLICT_USAGE,
    cost_rows,
    settled_ids,
    usage_row,
)
from proxy.ledger.schema import migrate
from proxy.records import UsageRecord

INTERRUPTED_REASON = "the proxy process stopped before the call ended; usage unknown"
"""Why a call its serving process left ``in_flight`` was never priced (both ledgers say it)."""
_INTERRUPT = (
    "UPDATE usage SET state = 'final', outcome = 'interrupted', unpriced_reason = ?2 "
    "WHERE state = 'in_flight' AND (?1 IS NULL OR owner = ?1)"
)
_DROP_HOLDS = "DELETE FROM budget_holds WHERE ?1 IS NULL OR owner = ?1"


def release_owner(conn: sqlite3.Connection, owner: str | None) -> tuple[int, int]:
    """End what a dead serving process left, in one transaction: its ``in_flight`` rows become
    final ``interrupted`` rows (usage unknown, so never priced) and its budget holds are
    dropped, so they stop counting against hard budgets. Returns (calls ended, holds dropped).

    `owner` None means every owner: at start-up, when no process of this ledger can be running
    (`SQLiteLedger`); the supervisor of ``serve --workers N`` names the worker it has just
    reaped (`proxy.workers`). Only a dead owner's state may be released: a live one would
    still settle its holds and finish its rows.
    """
    with Transaction(conn):
        calls = conn.execute(_INTERRUPT, (owner, INTERRUPTED_REASON)).rowcount
        holds = conn.execute(_DROP_HOLDS, (owner,)).rowcount
    return calls, holds


def add_spend(conn: sqlite3.Connection, team: str, day: str, currency: str, delta: Decimal) -> None:
    """Adjust a daily spend sum exactly (the caller holds the transaction)."""
    row = conn.execute(
        "SELECT amount FROM spend_daily WHERE team = ? AND day = ? AND currency = ?",
        (team, day, currency),
    ).fetchone()
    total = Decimal(row[0]) + delta if row else delta
    conn.execute(
        "INSERT OR REPLACE INTO spend_daily VALUES (?, ?, ?, ?)",
        (team, day, currency, decimal_text(total)),
    )


@dataclass(frozen=True, slots=True)
class SpendRow:
    team: str
    day: date
    currency: str
    amount: Decimal


SpendReader = Callable[[date, date], Sequence[SpendRow]]
"""Daily spend rows between two billing days (inclusive): `SQLiteLedger.spend`."""
TeamSpendReader = Callable[[str, date, date], Awaitable[Sequence[SpendRow]]]
"""One team's daily spend rows between two billing days (inclusive), awaited on the serving
loop: `SQLiteLedger.team_spend`, `proxy.ledger.pg_store.PostgresLedger.team_spend`. Raises
`SpendUnreadable`."""


class SpendUnreadable(Exception):
    """The ledger's daily spend cannot be read (the driver's error is the cause)."""


class LedgerStore(Protocol):
    """What the proxy needs from a ledger: the SQLite one below (the default), or
    `proxy.ledger.pg_store.PostgresLedger`."""

    def write(self, pending: Sequence[UsageRecord], final: Sequence[UsageRecord]) -> None: ...

    def spend(self, since: date, until: date) -> list[SpendRow]: ...

    async def team_spend(self, team: str, since: date, until: date) -> list[SpendRow]: ...

    def close(self) -> None: ...


@runtime_checkable
class FileLedger(LedgerStore, Protocol):
    """A ledger in a local file, which can be deleted or replaced under the running proxy
    (`proxy.ledger.moved_file`); a server database cannot."""

    path: Path
    """Where the ledger lives; what is rescued from it is saved beside it."""

    def moved(self) -> bool: ...

    def save_copy(self, target: Path) -> None: ...


class SQLiteLedger:
    """The embedded ledger. One writer (the `LedgerWriter` thread); readers open their own."""

    def __init__(
        self,
        path: Path,
        billing_timezone: ZoneInfo,
        *,
        recover: bool = True,
        owner: str | None = None,
    ) -> None:
        """Open (creating or migrating if needed) the ledger; `SchemaTooNew` if a newer proxy
        wrote it. `recover` ends rows left in flight and drops budget holds: only for the one
        process that starts first, never for a worker that joins running siblings (it would
        end their calls). `owner` marks the rows this store writes (`release_owner`); tools
        and tests that serve no calls may leave it None."""
        self.path = path
        self.billing_timezone = billing_timezone
        self._owner = owner
        self._conn = connect(path)  # the writer thread's
        self._identity = _file_identity(path)
        try:
            migrate(self._conn, path)
        except BaseException:
            self._conn.close()
            raise
        self._reader = connect(path)  # the event loop's (spend gauges, budgets)
        self._check_meta()
        self.interrupted = self._recover() if recover else 0

    def _check_meta(self) -> None:
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        tz = str(self.billing_timezone.key)
        with self._transaction():
            if meta.get("billing_timezone") not in (None, tz):
                self._rebuild_billing_days()
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('billing_timezone', ?)", (tz,))

    def _rebuild_billing_days(self) -> None:
        """The billing timezone changed: re-derive every row's billing day and the daily sums."""
        rows = self._conn.execute("SELECT request_id, started_at FROM usage").fetchall()
        self._conn.executemany(
            "UPDATE usage SET billing_day = ? WHERE request_id = ?",
            [(self._day(datetime.fromisoformat(s)), r) for r, s in rows],
        )
        self._conn.execute("DELETE FROM spend_daily")
        self._conn.execute(
            "INSERT INTO spend_daily SELECT u.team, u.billing_day, c.currency, "
            "decimal_sum(c.amount) FROM usage u JOIN usage_cost c USING (request_id) "
            "GROUP BY u.team, u.billing_day, c.currency"
        )

    def _recover(self) -> int:
        """Rows still in flight when the ledger opens belong to a proxy that died mid-call."""
        calls, _ = release_owner(self._conn, None)
        return calls

    def _transaction(self) -> Transaction:
        return Transaction(self._conn)

    def _day(self, instant: datetime) -> str:
        return instant.astimezone(self.billing_timezone).date().isoformat()

    def write(self, pending: Sequence[UsageRecord], final: Sequence[UsageRecord]) -> None:
        """Store a batch in one transaction. Idempotent: a final row is never written twice.

        The writer thread shares the interpreter with the event loop, so the batch is written
        with few statements (multi-row INSERTs, `insert_rows`) and the daily sums are adjusted
        once per team, day and currency rather than once per row.
        """
        conn, owner = self._conn, self._owner
        with self._transaction():
            if pending:
                insert_rows(
                    conn,
                    INSERT_USAGE,
                    [usage_row(r, "in_flight", self._day(r.started_at), owner) for r in pending],
                    ON_CONFLICT_USAGE,
                )
            if not final:
                return
            done = self._already_final([r.request_id for r in final])
            rows = []
            costs = []
            spend: dict[tuple[str, str, str], Decimal] = {}
            for record in final:
                if record.request_id in done:
                    continue
                day = self._day(record.started_at)
                rows.append(usage_row(record, "final", day, owner))
                costs += cost_rows(record)
                for currency, amount in record.costs.items():
                    key = (record.team, day, currency)
                    spend[key] = spend.get(key, ZERO) + amount
            insert_rows(conn, INSERT_USAGE, rows, ON_CONFLICT_USAGE)
            insert_rows(conn, INSERT_COST, costs)
            for (team, day, currency), delta in spend.items():
                add_spend(conn, team, day, currency, delta)
            if conn.execute("SELECT EXISTS (SELECT 1 FROM budget_holds)").fetchone()[0]:
                conn.executemany(
                    "DELETE FROM budget_holds WHERE request_id = ?",
                    [(record.request_id,) for record in final],
                )

    def _already_final(self, request_ids: list[str]) -> set[str]:
        return settled_ids(self._conn, request_ids)

    def spend(self, since: date, until: date) -> list[SpendRow]:
        """Daily spend rows with ``since <= day <= until`` (billing days)."""
        rows = self._reader.execute(
            "SELECT team, day, currency, amount FROM spend_daily WHERE day BETWEEN ? AND ?",
            (since.isoformat(), until.isoformat()),
        ).fetchall()
        return [SpendRow(t, date.fromisoformat(d), c, Decimal(a)) for t, d, c, a in rows]

    async def team_spend(self, team: str, since: date, until: date) -> list[SpendRow]:
        """`team`'s daily spend rows with ``since <= day <= until``: a range of the table's
        primary key (team, day, currency), so a few rows read, however long the ledger. Read on
        the serving loop, as the budgets' and the scrapes' reads are: an indexed read of a
        local file in WAL mode, which a writer never blocks."""
        try:
            rows = self._reader.execute(
                "SELECT day, currency, amount FROM spend_daily "
                "WHERE team = ? AND day BETWEEN ? AND ?",
                (team, since.isoformat(), until.isoformat()),
            ).fetchall()
        except sqlite3.Error as exc:
            raise SpendUnreadable(f"cannot read spend from {self.path}: {exc}") from exc
        return [SpendRow(team, date.fromisoformat(d), c, Decimal(a)) for d, c, a in rows]

    def moved(self) -> bool:
        """Whether `path` no longer leads to the file this ledger opened: deleted, renamed or
        replaced. One ``stat``, cheap enough for the writer to ask every second. A ``stat``
        that fails for another reason (permissions, I/O) cannot tell, and says no."""
        try:
            return _file_identity(self.path) != self._identity
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def save_copy(self, target: Path) -> None:
        """Copy the database as the writer's connection sees it (the last commits included)
        to `target`, with SQLite's backup API: once the file was deleted, that connection is
        the only way left to its rows. Written under a temporary name and renamed, so
        `target` is either complete or absent. Called from the writer's thread only."""
        partial = target.with_name(target.name + ".partial")
        try:
            with contextlib.closing(sqlite3.connect(partial)) as copy:
                self._conn.backup(copy)
            partial.replace(target)
        except BaseException:
            for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
                leftover.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        self._conn.close()
        self._reader.close()


def _file_identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino
