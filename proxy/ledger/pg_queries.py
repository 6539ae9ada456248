"""`Queries` on the PostgreSQL ledger, for the ledger commands: asyncpg made synchronous.

asyncpg is asynchronous only, and the commands are plain functions run once from the command
line: each `PostgresQueries` runs its connection on an event loop of its own, in the calling
thread, and waits for every statement (`asyncio.run` per statement would open a connection per
statement). The serving proxy's store (`proxy.ledger.pg_store`) runs its loop in a thread
instead, since it is called from several threads; a command has only one.

The statements come in the commands' shared dialect (`proxy.ledger.queries`) and their ``?``
parameters are numbered ``$1``, ``$2``... here. Values are bound natively (``timestamptz``,
``date``, ``numeric``, ``boolean``; JSON fields as text, which ``jsonb`` parses), and read back
natively: a row's instants are already `datetime`, its days `date`, its money `Decimal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import date
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from proxy.ledger import pg_schema
from proxy.ledger.pg_store import shown_url
from proxy.ledger.queries import Dialect, LedgerUnusable, NoLedger, Row, check_version
from proxy.ledger.rows import STORED_FIELDS
from proxy.records import UsageRecord

_T = TypeVar("_T")

ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
"""What asyncpg raises for a server that cannot be reached, refuses the connection or fails a
statement (a refused connection is an `OSError`, a silent host a `TimeoutError`)."""
CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the server: a command should say it cannot reach it, not hang."""
COMMANDS_LOCK = 0x7072_6F78_7932
"""The advisory lock every writing ledger command (``reprice --apply``, ``ledger-copy``) holds
for its transaction, as SQLite's ``BEGIN IMMEDIATE`` makes them wait for each other: two
re-pricings reading the same old amounts would each apply the same change to the daily spend.
The proxy's own writes need not wait: they add new rows and add to the spend, which commutes."""
_FROM_COLUMN = tuple(
    (field.name, field.kind.from_column if field.kind.pg_type == "jsonb" else None)
    for field in STORED_FIELDS
)
_ADD_SPEND = (
    "INSERT INTO spend_daily VALUES ($1, $2, $3, $4) ON CONFLICT (team, day, currency) "
    "DO UPDATE SET amount = spend_daily.amount + excluded.amount"
)
_QUOTED_OR_MARK = re.compile(r"'(?:[^']|'')*'|\?")


@lru_cache(maxsize=64)
def numbered(sql: str) -> str:
    """``?`` parameters as ``$1``, ``$2``... (never inside a quoted literal)."""
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() != "?":
            return match.group()
        count += 1
        return f"${count}"

    return _QUOTED_OR_MARK.sub(number, sql)


class PostgresQueries:
    """`proxy.ledger.queries.Queries` on one asyncpg connection, on a loop of its own."""

    dialect: Dialect = "postgresql"

    def __init__(self, url: str, *, command_timeout: float | None = None) -> None:
        """Connect to `url`; `LedgerUnusable` names it (without password) and says why not.
        `command_timeout` bounds each statement (None: unbounded, as a command may run long;
        the serving proxy's reconciliation sets one, `proxy.reconcile.live`)."""
        self.where = shown_url(url)
        self._loop = asyncio.new_event_loop()
        try:
            self._conn = self._run(
                asyncpg.connect(url, timeout=CONNECT_TIMEOUT, command_timeout=command_timeout)
            )
        except BaseException:
            self._loop.close()
            raise

    def _run(self, work: Coroutine[Any, Any, _T]) -> _T:
        try:
            return self._loop.run_until_complete(work)
        except ERRORS as exc:
            raise LedgerUnusable(self.where, exc) from exc

    def has_ledger(self) -> bool:
        """Whether the database holds the ledger's tables."""
        rows = self.execute(
            "SELECT to_regclass('meta') IS NOT NULL AND to_regclass('usage') IS NOT NULL"
        )
        return bool(rows[0][0])

    def migrate(self) -> None:
        """Create the ledger's tables, or bring them to this proxy's schema (`pg_schema`)."""
        self._run(pg_schema.migrate(self._conn, self.where))

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return [tuple(row) for row in self._run(self._conn.fetch(numbered(sql), *params))]

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        self._run(self._conn.executemany(numbered(sql), rows))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction holding `COMMANDS_LOCK`; rolled back on any error."""
        transaction = self._conn.transaction()
        self._run(transaction.start())
        try:
            self.execute("SELECT pg_advisory_xact_lock(?)", (COMMANDS_LOCK,))
            yield
        except BaseException:
            # A lost connection cannot roll back: its error must not hide the one that matters.
            with contextlib.suppress(LedgerUnusable):
                self._run(transaction.rollback())
            raise
        self._run(transaction.commit())

    def money_sum(self, column: str) -> str:
        return f"sum({column})"

    def add_spend(self, team: str, day: date, currency: str, delta: Decimal) -> None:
        self._run(self._conn.execute(_ADD_SPEND, team, day, currency, delta))

    def record(
        self, values: Sequence[Any], costs: Mapping[str, Decimal], savings: Mapping[str, Decimal]
    ) -> UsageRecord:
        fields: dict[str, Any] = {
            name: value if convert is None or value is None else convert(value)
            for (name, convert), value in zip(_FROM_COLUMN, values, strict=True)
        }
        return UsageRecord(**fields, costs=costs, cache_savings=savings)

    def day(self, value: Any) -> date:
        assert isinstance(value, date)  # a ``date`` column
        return value

    def close(self) -> None:
        try:
            with contextlib.suppress(LedgerUnusable):
                self._run(self._conn.close())
        finally:
            self._loop.close()


def open_postgres(url: str) -> PostgresQueries:
    """The PostgreSQL ledger at `url`, which must exist: `NoLedger` for a database without its
    tables (never created here), `LedgerUnusable` for one that cannot be reached, and
    `pg_schema.SchemaTooNew` for one a newer proxy wrote."""
    queries = PostgresQueries(url)
    try:
        if not queries.has_ledger():
            raise NoLedger(queries.where)
    except BaseException:
        queries.close()
        raise
    check_version(
        queries,
        pg_schema.SCHEMA_VERSION,
        lambda found: pg_schema.SchemaTooNew(queries.where, found),
    )
    return queries
