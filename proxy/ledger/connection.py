"""SQLite as the ledger uses it: the connection's settings, transactions that roll back only
what is still open, multi-row statements, and an exact decimal sum.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed transaction survives the
process being killed (``kill -9``); only an operating-system crash or power loss can lose the
last commits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy.formats import ZERO, decimal_text

MAX_ROWS_PER_STATEMENT = 64
"""Rows per multi-row INSERT (32 columns x 64 = 2,048 parameters, far below SQLite's 32,766)."""


def insert_rows(
    conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]], tail: str = ""
) -> None:
    """``head VALUES (...), (...) tail`` for many rows in a few statements.

    Why not ``executemany``: Python's sqlite3 releases the interpreter lock around every
    ``sqlite3_step``, once per row, and the ledger thread then has to win the lock back from
    the busy event loop each time; measured in bench/, that hand-off cost the proxy about
    60 us of CPU per call, three times the writing itself. One multi-row statement steps once.
    Statements are cut into power-of-two row counts (`statement_sizes`).
    """
    if not rows:
        return
    one = "(" + ", ".join("?" * len(rows[0])) + ")"
    for start, size in statement_sizes(len(rows)):
        params = [value for row in rows[start : start + size] for value in row]
        conn.execute(head + ", ".join([one] * size) + tail, params)


def statement_sizes(count: int) -> Iterator[tuple[int, int]]:
    """(start, size) of consecutive groups covering `count` items, each a power of two of at
    most `MAX_ROWS_PER_STATEMENT`: a statement per exact size would be parsed anew for most
    batches and crowd the statement cache, while these are at most seven texts."""
    start = 0
    while start < count:
        size = min(MAX_ROWS_PER_STATEMENT, 1 << ((count - start).bit_length() - 1))
        yield start, size
        start += size


class DecimalSum:
    """SQLite aggregate summing decimal text exactly (SQLite's SUM would use floats)."""

    def __init__(self) -> None:
        self.total: Decimal | None = None

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total = (self.total or ZERO) + Decimal(value)

    def finalize(self) -> str | None:
        return None if self.total is None else decimal_text(self.total)


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the ledger's settings and the `decimal_sum` aggregate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA foreign_keys = ON")
    # typeshed types aggregate steps as taking ints; ours takes the stored decimal text.
    conn.create_aggregate("decimal_sum", 1, DecimalSum)  # type: ignore[arg-type]
    return conn


class Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection.

    SQLite rolls a transaction back by itself on some errors (a full disk, an I/O error), and
    a ``ROLLBACK`` then would fail and hide the error that matters; a ``COMMIT`` that fails may
    leave it open, and the connection could never begin another. So: roll back exactly when a
    transaction is still open.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
