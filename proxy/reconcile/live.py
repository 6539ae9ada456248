"""The serving process's way to the ledger for reconciliation: one connection, one thread.

The poller writes a snapshot every few minutes and every scrape reads the figures; both go
through `proxy.reconcile.book`'s SQL on a `proxy.ledger.queries.Queries` connection of their
own (the store's belong to the ledger writer and the budgets), used from one thread, so
neither the serving loop nor the writer ever waits on the other's statements: SQLite's
``BEGIN IMMEDIATE`` may wait for the writer's commit, and PostgreSQL's driver is made
synchronous on a loop of the thread's own (`proxy.ledger.pg_queries`).

A connection that fails (`LedgerUnusable`: a database away, a file gone) is dropped and opened
again for the next use, so the poll after an outage works without a restart. A scrape waits
for the figures at most `READ_TIMEOUT` seconds, and asks again only once the last read is done:
a ledger that hangs costs each scrape that long once, never a queue of reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from proxy.ledger.connection import connect
from proxy.ledger.pg_queries import PostgresQueries
from proxy.ledger.queries import LedgerUnusable, Queries, SQLiteQueries
from proxy.reconcile import book
from proxy.reconcile.book import Figures, Selection

_T = TypeVar("_T")
READ_TIMEOUT = 2.0
"""Seconds a scrape waits for the figures (as ``llm_team_spend`` waits for the spend)."""
CLOSE_TIMEOUT = 5.0
"""Seconds `LiveBook.close` waits for the thread's last work."""
COMMAND_TIMEOUT = 30.0
"""Seconds one PostgreSQL statement may take before the connection is given up."""


class Unreadable(Exception):
    """The figures could not be read in time (the cause says why)."""


def sqlite_opener(path: Path) -> Callable[[], Queries]:
    """Connections to the SQLite ledger at `path` (which ``serve`` has created)."""

    def open_() -> Queries:
        try:
            return SQLiteQueries(connect(path), str(path))
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnusable(str(path), exc) from exc

    return open_


def postgres_opener(url: str) -> Callable[[], Queries]:
    """Connections to the PostgreSQL ledger at `url`."""
    return partial(PostgresQueries, url, command_timeout=COMMAND_TIMEOUT)


class LiveBook:
    """`proxy.reconcile.book` on a connection from `opener`, on a thread of its own."""

    def __init__(self, opener: Callable[[], Queries], selection: Selection = None) -> None:
        self._opener = opener
        self.selection = selection
        """The currencies reconciled (None: every one the balance lists)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="reconcile")
        self._queries: Queries | None = None
        self._reading: Future[Figures] | None = None
        self._lock = threading.Lock()

    def _call(self, work: Callable[[Queries], _T]) -> _T:
        """Runs in the thread: `work` on the connection, opened if need be."""
        if self._queries is None:
            self._queries = self._opener()
        try:
            return work(self._queries)
        except LedgerUnusable:
            self._drop()
            raise

    def _drop(self) -> None:
        queries, self._queries = self._queries, None
        if queries is not None:
            with contextlib.suppress(Exception):
                queries.close()

    async def run(self, work: Callable[[Queries], _T]) -> _T:
        """`work` on the connection, awaited from the serving loop without blocking it."""
        return await asyncio.wrap_future(self._executor.submit(self._call, work))

    def figures(self) -> Figures:
        """The figures now (a scrape); `Unreadable` if the ledger did not answer in time."""
        with self._lock:
            if self._reading is None or self._reading.done():
                self._reading = self._executor.submit(
                    self._call, partial(book.figures, selection=self.selection)
                )
            reading = self._reading
        try:
            return reading.result(READ_TIMEOUT)
        except TimeoutError as exc:
            raise Unreadable(f"the ledger did not answer within {READ_TIMEOUT:g} s") from exc
        except LedgerUnusable as exc:
            raise Unreadable(str(exc)) from exc

    def close(self) -> None:
        """Close the connection once what is queued has run, waiting `CLOSE_TIMEOUT` seconds
        at most (a stopping proxy must not wait on a database that is away)."""
        closing = self._executor.submit(self._drop)
        with contextlib.suppress(TimeoutError):
            closing.result(CLOSE_TIMEOUT)
        self._executor.shutdown(wait=False, cancel_futures=True)
