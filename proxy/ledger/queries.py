"""One way to query either ledger: the seam the ledger commands (`proxy.ledger.commands`) run
their SQL through, so `report`, `reprice` and ``ledger-replay`` are written once for SQLite and
PostgreSQL.

The commands' SQL is in the dialect both databases share: ``?`` parameters (the PostgreSQL side
numbers them ``$1``, ``$2``...), ``TRUE``, ``COUNT(*) FILTER (WHERE ...)``, ``IN (...)``; no
``ORDER BY`` on text where the order is shown (PostgreSQL sorts text by the database's
collation, SQLite by code point: the commands sort in Python). What differs is behind
`Queries`:

- parameters are Python values (`datetime`, `date`, `Decimal`, `bool`): SQLite keeps instants as
  fixed-width UTC text, days as ISO text and money as decimal text (`SQLiteQueries` binds them
  so), PostgreSQL keeps each natively;
- what is read back: a ``usage`` row becomes its record (`Queries.record`), a billing day a
  `date` (`Queries.day`), whatever form the database stores them in;
- SQL that only one of them has (`Queries.dialect` names which: a report's week of a billing
  day, `proxy.ledger.report_groups`);
- the exact sum of money (`Queries.money_sum`): SQLite's `decimal_sum` aggregate over decimal
  text, PostgreSQL's ``sum`` over ``numeric``;
- adding to a day's spend (`Queries.add_spend`) and what a transaction locks
  (`Queries.transaction`).

Errors: `NoLedger` (nothing where the config points; nothing is created), `LedgerUnusable` (the
database cannot be reached or read: one line naming it and why), and the schema's
``SchemaTooNew`` (`proxy.ledger.schema`, `proxy.ledger.pg_schema`). Each driver's errors are
translated at this boundary, here and in `proxy.ledger.pg_queries` (and, for the stores
``ledger-replay`` writes through, in the command).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol

from proxy.formats import decimal_text, iso_instant
from proxy.ledger import schema
from proxy.ledger.connection import Transaction, connect
from proxy.ledger.rows import STORED_FIELDS, settled_ids, stored_record, stored_values
from proxy.ledger.store import add_spend
from proxy.records import UsageRecord

Row = tuple[Any, ...]
Dialect = Literal["sqlite", "postgresql"]


class NoLedger(Exception):
    """No ledger where the configuration points (a missing file, a database without the
    ledger's tables)."""

    def __init__(self, where: str) -> None:
        super().__init__(f"no ledger at {where}")
        self.where = where


class LedgerUnusable(Exception):
    """The ledger cannot be reached or read: its name and the driver's reason, in one line."""

    def __init__(self, where: str, reason: BaseException) -> None:
        text = str(reason).strip().replace("\n", " ") or type(reason).__name__
        super().__init__(f"cannot use the ledger at {where}: {text}")


class Queries(Protocol):
    """A ledger's database as the commands use it (`SQLiteQueries`, `PostgresQueries`)."""

    where: str
    """The ledger as messages name it (a file, or a URL without password)."""
    dialect: Dialect
    """Which database's SQL the shared dialect cannot say is written in."""

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Run one statement with ``?`` parameters; its rows (none for a write)."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None: ...

    def transaction(self) -> AbstractContextManager[None]:
        """One transaction, which two writing ledger commands never share with each other."""
        ...

    def money_sum(self, column: str) -> str:
        """The SQL for an exact sum of a money column."""
        ...

    def add_spend(self, team: str, day: date, currency: str, delta: Decimal) -> None:
        """Add `delta` to a daily spend sum (inside a transaction)."""
        ...

    def record(
        self, values: Sequence[Any], costs: Mapping[str, Decimal], savings: Mapping[str, Decimal]
    ) -> UsageRecord:
        """The record of a ``usage`` row's `RECORD_COLUMNS` values, and its costs."""
        ...

    def day(self, value: Any) -> date:
        """A stored ``billing_day``."""
        ...

    def close(self) -> None: ...


_JSON_TEXT = tuple(
    (index, field.kind.to_column)
    for index, field in enumerate(STORED_FIELDS)
    if field.kind.pg_type == "jsonb" and field.kind.to_column is not None
)


def record_values(record: UsageRecord) -> list[Any]:
    """A record's `RECORD_COLUMNS` values as both databases take them as parameters: JSON
    fields as their text (SQLite's TEXT, PostgreSQL's ``jsonb`` read it), the rest as Python
    values for `Queries` to bind."""
    row = list(stored_values(record))
    for index, convert in _JSON_TEXT:
        row[index] = convert(row[index])
    return row


def sqlite_value(value: object) -> object:
    """A parameter as the SQLite ledger stores it (`proxy.ledger.rows`, `record_schema`)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, datetime):
        return iso_instant(value, fixed_width=True)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return decimal_text(value)
    return value


class SQLiteQueries:
    """`Queries` on a connection from `proxy.ledger.connection.connect`."""

    dialect: Dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, where: str) -> None:
        self.where = where
        self._conn = conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        try:
            return self._conn.execute(sql, [sqlite_value(p) for p in params]).fetchall()
        except sqlite3.Error as exc:
            raise LedgerUnusable(self.where, exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        bound = ([sqlite_value(p) for p in row] for row in rows)
        try:
            self._conn.executemany(sql, bound)
        except sqlite3.Error as exc:
            raise LedgerUnusable(self.where, exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE``: the proxy's writer and other commands wait for it."""
        try:
            with Transaction(self._conn):
                yield
        except sqlite3.Error as exc:
            raise LedgerUnusable(self.where, exc) from exc

    def money_sum(self, column: str) -> str:
        return f"decimal_sum({column})"

    def add_spend(self, team: str, day: date, currency: str, delta: Decimal) -> None:
        try:
            add_spend(self._conn, team, day.isoformat(), currency, delta)
        except sqlite3.Error as exc:
            raise LedgerUnusable(self.where, exc) from exc

    def record(
        self, values: Sequence[Any], costs: Mapping[str, Decimal], savings: Mapping[str, Decimal]
    ) -> UsageRecord:
        return stored_record(values, costs, savings)

    def day(self, value: Any) -> date:
        return date.fromisoformat(value)

    def close(self) -> None:
        self._conn.close()


def open_sqlite(path: Path) -> SQLiteQueries:
    """The SQLite ledger at `path`, which must exist: `NoLedger` if it does not (report,
    reprice and replay never create one), `LedgerUnusable` if it cannot be read,
    `proxy.ledger.schema.SchemaTooNew` if a newer proxy wrote it."""
    if not path.is_file():
        raise NoLedger(str(path))
    try:
        conn = connect(path)
    except sqlite3.Error as exc:
        raise LedgerUnusable(str(path), exc) from exc
    queries = SQLiteQueries(conn, str(path))
    check_version(queries, schema.SCHEMA_VERSION, lambda found: schema.SchemaTooNew(path, found))
    return queries


def check_version(queries: Queries, known: int, too_new: Callable[[int], Exception]) -> None:
    """Refuse (and close) a ledger whose schema is newer than `known`, the newest this proxy
    knows for its kind: its columns may mean what this code cannot know. A ledger without the
    version row is version 1."""
    try:
        rows = queries.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        found = int(rows[0][0]) if rows else 1
        if found > known:
            raise too_new(found)
    except BaseException:
        queries.close()
        raise


def settled(queries: Queries, records: Sequence[UsageRecord]) -> set[str]:
    """Which records' final rows the ledger has already, so they are not written again.

    A final row that recovery ended as ``interrupted`` with unknown usage settles nothing: the
    call's own record, when it comes (a spill file, a copy), replaces it. A record that is
    itself ``interrupted`` is settled by any final row.
    """
    found = settled_ids(queries, [r.request_id for r in records])
    ended = [r.request_id for r in records if r.outcome == "interrupted"]
    found |= settled_ids(queries, [i for i in ended if i not in found], interrupted=True)
    return found
