"""Graduating from SQLite: an existing SQLite ledger copied into the PostgreSQL ledger
(``python -m proxy ledger-copy``, `proxy.ledger.commands`).

Every final row goes across as it is, with its costs, cache savings, flags and ``cost_history``
rows; the PostgreSQL daily spend grows by exactly the copied costs (its billing days are the
configured timezone's, as the PostgreSQL store derives them). A row whose final record is there
already is left alone, so copying again changes nothing, and a copy that was interrupted
resumes where it stopped: each batch is one transaction, rows and history and spend together.

``in_flight`` rows are not copied: their calls were still running (a proxy is serving from the
file), or their proxy died during them. Stopping the proxy and starting it once more on the file
ends them as ``interrupted``; a second copy then takes them.

The SQLite file is opened read-only and read in one snapshot, by three cursors walking the
``usage``, ``usage_cost`` and ``cost_history`` tables in request-id order side by side, so a
batch of rows needs no query per row and memory does not grow with the ledger
(``cost_history`` has no index on the request id; SQLite sorts it once, on disk if it must).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from proxy.formats import ZERO
from proxy.ledger.queries import LedgerUnusable, NoLedger, Queries, Row, record_values, settled
from proxy.ledger.rows import (
    ABSENT_VALUES,
    COLUMNS,
    INSERT_USAGE,
    ON_CONFLICT_USAGE,
    RECORD_COLUMNS,
)
from proxy.ledger.rows import stored_record as sqlite_record
from proxy.ledger.schema import SCHEMA_VERSION, SchemaTooNew
from proxy.records import UsageRecord

BATCH = 500
"""Final rows per transaction unless ``--batch`` says otherwise."""
_TABLES = ("meta", "usage", "usage_cost", "cost_history")
_INSERT_ROW = f"{INSERT_USAGE}({', '.join('?' * len(COLUMNS))}){ON_CONFLICT_USAGE}"


class NotALedger(Exception):
    """The file is not a SQLite ledger (not a database, or without the ledger's tables)."""


@dataclass(frozen=True, slots=True)
class Copied:
    """One batch: rows written, rows already there, ``in_flight`` rows passed over."""

    copied: int
    present: int
    in_flight: int


def open_source(path: Path) -> sqlite3.Connection:
    """The SQLite ledger at `path`, read-only (``mode=ro``: the file is never changed, nor
    created). `NoLedger`, `NotALedger`, or `SchemaTooNew` for a newer proxy's ledger."""
    if not path.is_file():
        raise NoLedger(str(path))
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerUnusable(str(path), exc) from exc
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        tables = {str(name) for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        missing = [t for t in _TABLES if t not in tables]
        if missing:
            raise NotALedger(f"{path} is not a ledger: it has no {', '.join(missing)} table")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        found = int(row[0]) if row else 1  # version 1 wrote it in a second transaction
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(path, found)
    except sqlite3.OperationalError as exc:  # it could not be read (permissions, I/O)
        conn.close()
        raise LedgerUnusable(str(path), exc) from exc
    except sqlite3.DatabaseError as exc:  # "file is not a database"
        conn.close()
        raise NotALedger(f"{path} is not a ledger: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def source_timezone(source: sqlite3.Connection) -> str | None:
    """The billing timezone the SQLite ledger's days and daily spend were kept in."""
    row = source.execute("SELECT value FROM meta WHERE key = 'billing_timezone'").fetchone()
    return None if row is None else str(row[0])


class _ByRequest:
    """A cursor's rows, sorted by request id (their first column), taken a request at a time
    in that order. Python compares text by code point, the order of SQLite's ``BINARY``."""

    def __init__(self, rows: Iterator[Row]) -> None:
        self._rows = rows
        self._next = next(rows, None)

    def take(self, request_id: str) -> list[Row]:
        """The rows of `request_id`, passing over those of smaller ids (a call still in flight
        has none; a history row may outlive its call's row)."""
        found = []
        while self._next is not None and self._next[0] <= request_id:
            if self._next[0] == request_id:
                found.append(self._next)
            self._next = next(self._rows, None)
        return found


@dataclass(frozen=True, slots=True)
class _Final:
    record: UsageRecord
    history: list[Row]


def copy_rows(
    source: sqlite3.Connection, target: Queries, timezone: ZoneInfo, batch: int = BATCH
) -> Generator[Copied, None, None]:
    """Copy the final rows of `source` into `target`, `batch` rows per transaction, and say
    what each batch did once it is committed. Reads `source` in one snapshot (a read
    transaction, which closing the connection ends)."""
    source.execute("BEGIN")
    usage = source.execute("SELECT * FROM usage ORDER BY request_id")
    names = {d[0]: index for index, d in enumerate(usage.description)}
    # A column a ledger of an older schema lacks (client_status before v3, tags and end_user
    # before v4) holds what such rows mean: NULL, or no tags.
    picks = [names.get(column) for column in RECORD_COLUMNS]
    state = names["state"]
    costs = _ByRequest(
        source.execute(
            "SELECT request_id, currency, amount, cache_savings FROM usage_cost ORDER BY request_id"
        )
    )
    history = _ByRequest(
        source.execute(
            "SELECT request_id, currency, amount, price_book, price_version, replaced_at, "
            "replaced_by_book FROM cost_history ORDER BY request_id, rowid"
        )
    )
    while rows := usage.fetchmany(batch):
        finals = []
        for row in rows:
            request_id = row[0]
            amounts = costs.take(request_id)
            replaced = history.take(request_id)
            if row[state] != "final":
                continue
            values = [
                absent if pick is None else row[pick]
                for pick, absent in zip(picks, ABSENT_VALUES, strict=True)
            ]
            record = sqlite_record(
                values,
                {currency: Decimal(amount) for _, currency, amount, _ in amounts},
                {currency: Decimal(saved) for _, currency, _, saved in amounts},
            )
            finals.append(_Final(record, replaced))
        copied, present = _write(target, finals, timezone)
        yield Copied(copied, present, len(rows) - len(finals))


def _write(target: Queries, finals: Sequence[_Final], timezone: ZoneInfo) -> tuple[int, int]:
    """One batch in one transaction: (rows copied, rows already there)."""
    if not finals:
        return 0, 0
    with target.transaction():
        present = settled(target, [final.record for final in finals])
        fresh = [final for final in finals if final.record.request_id not in present]
        rows: list[list[Any]] = []
        costs: list[tuple[str, str, Decimal, Decimal]] = []
        history: list[tuple[Any, ...]] = []
        spend: dict[tuple[str, date, str], Decimal] = {}
        for final in fresh:
            record = final.record
            day = record.started_at.astimezone(timezone).date()
            rows.append([*record_values(record), "final", day, None])
            for currency, amount in record.costs.items():
                saved = record.cache_savings.get(currency, ZERO)
                costs.append((record.request_id, currency, amount, saved))
                key = (record.team, day, currency)
                spend[key] = spend.get(key, ZERO) + amount
            history.extend(_history_row(row) for row in final.history)
        target.executemany(_INSERT_ROW, rows)
        target.executemany("INSERT INTO usage_cost VALUES (?, ?, ?, ?)", costs)
        target.executemany("INSERT INTO cost_history VALUES (?, ?, ?, ?, ?, ?, ?)", history)
        for (team, day, currency), delta in sorted(spend.items()):
            target.add_spend(team, day, currency, delta)
    return len(fresh), len(present)


def _history_row(row: Row) -> tuple[Any, ...]:
    """A SQLite ``cost_history`` row (decimal and instant text) as Python values."""
    request_id, currency, amount, book, version, replaced_at, replaced_by = row
    return (
        request_id,
        currency,
        None if amount is None else Decimal(amount),
        book,
        version,
        datetime.fromisoformat(replaced_at),
        replaced_by,
    )
