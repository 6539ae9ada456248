"""The end-to-end suite on both ledgers: SQLite (the embedded default) and PostgreSQL (replicas).

The `proxy` and `start_proxy` fixtures (tests/conftest.py) run every test that uses them once
per backend: the proxy's records go through the real `LedgerWriter` into the real store, hard
budgets are held where that backend holds them (in the process for SQLite, in PostgreSQL for
replicas), and when the test ends `check_ledger` asserts that the ledger holds exactly the
final records the proxy produced: each call once, final, with the same outcome and the same
costs to the last decimal, and nothing left in flight or held.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg  # type: ignore[import-untyped]

from proxy.ledger.pg_store import PostgresLedger
from proxy.ledger.store import LedgerStore, SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.reconcile.book import Selection
from proxy.reconcile.live import LiveBook, PostgresSource, SQLiteSource
from proxy.records import UsageRecord
from tests.support.postgres import Postgres

BACKENDS = ("sqlite", "postgresql")
BEIJING = ZoneInfo("Asia/Shanghai")
OWNER = "test-replica"

Row = tuple[str, str, dict[str, str], str | None, dict[str, Decimal]]
"""A call as the ledger holds it: state, outcome, tags, end user, costs per currency."""


@dataclass
class LedgerBackend:
    name: str
    store: LedgerStore
    writer: LedgerWriter
    url: str | None
    """The PostgreSQL ledger's URL (None for SQLite)."""
    path: Path | None
    """The SQLite ledger's file (None for PostgreSQL)."""

    def options(self) -> dict[str, Any]:
        """`running_proxy`'s options that put the proxy on this ledger."""
        return {
            "sink": self.writer,
            "ledger": self.writer,
            "spend": self.store.spend,
            "team_spend": self.store.team_spend,
            "shared_url": self.url,
            "owner": OWNER,
        }

    def live_book(self, selection: Selection = None) -> LiveBook:
        """A connection for DeepSeek's balance (`proxy.reconcile`) to this ledger, as
        ``serve`` opens one; the caller closes it."""
        if self.url is not None:
            return LiveBook(PostgresSource(self.url), selection)
        assert self.path is not None
        return LiveBook(SQLiteSource(self.path), selection)

    def rows(self) -> tuple[dict[str, Row], int]:
        """Every call in the ledger, and the number of budget holds left."""
        select_usage = "SELECT request_id, state, outcome, tags, end_user FROM usage"
        select_costs = "SELECT request_id, currency, amount FROM usage_cost"
        select_holds = "SELECT count(*) FROM budget_holds"
        if self.url is not None:
            usage, costs, holds = _pg_fetch(self.url, select_usage, select_costs, select_holds)
        else:
            assert self.path is not None
            with closing(sqlite3.connect(self.path)) as conn:
                usage = conn.execute(select_usage).fetchall()
                costs = conn.execute(select_costs).fetchall()
                holds = conn.execute(select_holds).fetchall()
        calls: dict[str, Row] = {
            row[0]: (row[1], row[2], json.loads(row[3]), row[4], {}) for row in usage
        }  # tags: SQLite's JSON text, PostgreSQL's jsonb as asyncpg gives it (text)
        for request_id, currency, amount in costs:
            calls[request_id][4][currency] = Decimal(str(amount))
        return calls, int(holds[0][0])


def _pg_fetch(url: str, *queries: str) -> list[list[tuple[Any, ...]]]:
    async def fetch() -> list[list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(url)
        try:
            return [[tuple(r) for r in await conn.fetch(q)] for q in queries]
        finally:
            await conn.close()

    # Called from async fixtures too, whose loop is running: its own loop, in a thread.
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, fetch()).result()


@contextmanager
def ledger_backend(name: str, folder: Path, postgres: Postgres | None) -> Iterator[LedgerBackend]:
    """A fresh ledger of the kind `name` (a new database of `postgres` for PostgreSQL), with
    its writer flushing often so tests end quickly; closed afterwards."""
    store: LedgerStore
    if name == "postgresql":
        assert postgres is not None
        url: str | None = postgres.new_database()
        assert url is not None
        store = PostgresLedger(url, BEIJING, owner=OWNER, lease=60)
        path = None
    else:
        url, path = None, folder / "ledger.sqlite3"
        store = SQLiteLedger(path, BEIJING, owner=OWNER)
    writer = LedgerWriter(store, flush_interval=0.01)
    try:
        yield LedgerBackend(name, store, writer, url, path)
    finally:
        writer.close(10)


def check_ledger(backend: LedgerBackend, records: Sequence[UsageRecord]) -> None:
    """The ledger holds exactly `records` (the proxy's final records): each once, final, same
    outcome, tags, end user and costs; no call left in flight, no hold left."""
    assert backend.writer.flush(10), f"the {backend.name} ledger did not commit in time"
    calls, holds = backend.rows()
    expected = {
        r.request_id: ("final", r.outcome, dict(r.tags), r.end_user, dict(r.costs)) for r in records
    }
    assert len(expected) == len(records), "a call recorded twice"
    assert calls == expected, f"the {backend.name} ledger differs from the proxy's records"
    assert holds == 0, f"{holds} budget hold(s) left in the {backend.name} ledger"
