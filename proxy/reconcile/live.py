"""The serving process's way to the ledger for reconciliation: one connection, one thread.

The poller writes a snapshot every few minutes and every scrape reads the figures; both go
through `proxy.reconcile.book`'s SQL on a `proxy.ledger.queries.Queries` connection of their
own (the store's belong to the ledger writer and the budgets), used from one thread, so
neither the serving loop nor the writer ever waits on the other's statements: SQLite's
``BEGIN IMMEDIATE`` may wait for the writer's commit, and PostgreSQL's driver is made
synchronous on a loop of the thread's own (`proxy.ledger.pg_queries`).

A connection that fails (`LedgerUnusable`: a database away, a file gone) is dropped and opened
again for the next use, so the poll after an outage works without a restart; a SQLite ledger
file that was deleted or replaced is never recreated here (`SQLiteSource`). A scrape waits
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
from typing import Protocol, TypeVar

from proxy.ledger.connection import connect
from proxy.ledger.pg_queries import PostgresQueries
from proxy.ledger.queries import LedgerUnusable, Queries, SQLiteQueries
from proxy.reconcile import book
from proxy.reconcile.book import Figures, Selection

_T = TypeVar("_T")
READ_TIMEOUT = 2.0
"""Seconds a scrape waits for the figures when it has none yet (as ``llm_team_spend`` waits
for the spend)."""
FRESH_WAIT = 0.1
"""Seconds a scrape waits for fresh figures once it has some: the read shares its thread with
the poller's store, which may wait on a lock (a ``reprice --apply``, a busy SQLite file), and a
scrape runs on the serving loop, so past this it shows the last figures rather than stall
every call in flight."""
CLOSE_TIMEOUT = 5.0
"""Seconds `LiveBook.close` waits for the thread's last work."""
COMMAND_TIMEOUT = 30.0
"""Seconds one PostgreSQL statement may take before the connection is given up."""


class Unreadable(Exception):
    """The figures could not be read in time (the cause says why)."""


class Source(Protocol):
    """Where the ledger is: how to open a connection to it, and whether an open one still
    leads to it."""

    def open(self) -> Queries: ...

    def still_there(self) -> bool: ...


class SQLiteSource:
    """The SQLite ledger at `path`, which ``serve`` has created: never created here (a ledger
    file deleted under a running proxy must stay deleted, `proxy.ledger.moved_file`), and a
    connection to a file that was deleted or replaced since is given up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None

    def _stat(self) -> tuple[int, int]:
        status = self.path.stat()
        return status.st_dev, status.st_ino

    def open(self) -> Queries:
        try:
            if not self.path.is_file():
                raise FileNotFoundError(f"no ledger file at {self.path}")
            self._identity = self._stat()
            return SQLiteQueries(connect(self.path), str(self.path))
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnusable(str(self.path), exc) from exc

    def still_there(self) -> bool:
        try:
            return self._stat() == self._identity
        except OSError:
            return False


class PostgresSource:
    """The PostgreSQL ledger at `url`; each statement bounded by `COMMAND_TIMEOUT`."""

    def __init__(self, url: str) -> None:
        self.url = url

    def open(self) -> Queries:
        return PostgresQueries(self.url, command_timeout=COMMAND_TIMEOUT)

    def still_there(self) -> bool:
        return True


class LiveBook:
    """`proxy.reconcile.book` on a connection to `source`, on a thread of its own."""

    def __init__(self, source: Source, selection: Selection = None) -> None:
        self._source = source
        self.selection = selection
        """The currencies reconciled (None: every one the balance lists)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="reconcile")
        self._queries: Queries | None = None
        self._reading: Future[Figures] | None = None
        self._last: Figures | None = None
        self._writing = False
        self._lock = threading.Lock()

    def _call(self, work: Callable[[Queries], _T]) -> _T:
        """Runs in the thread: `work` on the connection, opened if need be."""
        if self._queries is not None and not self._source.still_there():
            self._drop()
        if self._queries is None:
            self._queries = self._source.open()
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
        return await asyncio.wrap_future(self._executor.submit(self._call_writing, work))

    def _call_writing(self, work: Callable[[Queries], _T]) -> _T:
        """`_call` for the poller's work (claims, stores), which may wait on a lock: while it
        runs, a scrape does not wait for fresh figures (`FRESH_WAIT`)."""
        self._writing = True
        try:
            return self._call(work)
        finally:
            self._writing = False

    def figures(self) -> Figures:
        """The figures now (a scrape); while the poller's work holds the thread, the last ones
        read if fresh ones take longer than `FRESH_WAIT`; `Unreadable` if the ledger did not
        answer in time and none were read."""
        with self._lock:
            if self._reading is None or self._reading.done():
                self._reading = self._executor.submit(
                    self._call, partial(book.figures, selection=self.selection)
                )
            reading = self._reading
        last = self._last
        try:
            wait = FRESH_WAIT if last is not None and self._writing else READ_TIMEOUT
            self._last = reading.result(wait)
            return self._last
        except TimeoutError as exc:
            if last is not None:
                return last
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
