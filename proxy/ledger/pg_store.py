"""The ledger's records in PostgreSQL (step 3), written as the SQLite ledger writes them.

`PostgresLedger.write` stores a batch in one transaction with the SQLite ledger's rules
(`proxy.ledger.store.SQLiteLedger.write`): in-flight rows upserted, a final row never written
twice (a row recovery ended as ``interrupted`` with unknown usage is replaced by the call's
real record), costs per currency, the daily spend adjusted once per team, day and currency,
and the calls' budget holds dropped in the same transaction that adds their cost to the
spend, so a cost is never counted twice or not at all across replicas.

asyncpg is asynchronous only (the measured choice, bench/RESULTS.md), and the ledger writer is
a thread: the store runs its connection on an event loop of its own, in a thread of its own,
and its methods wait for the result, so they may be called from any thread (the writer's, or a
scrape reading spend) and never touch the proxy's event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import asyncpg  # type: ignore[import-untyped]

from proxy.formats import ZERO
from proxy.ledger import pg_schema
from proxy.ledger.rows import COLUMNS, ON_CONFLICT_USAGE, STORED_FIELDS, stored_values
from proxy.ledger.store import INTERRUPTED_REASON, SpendRow
from proxy.records import UsageRecord

_T = TypeVar("_T")
_JSON = tuple(index for index, field in enumerate(STORED_FIELDS) if field.kind.pg_type == "jsonb")
_COLUMN_LIST = ", ".join(COLUMNS)
_PLACES = ", ".join(
    f"${i}::jsonb" if i - 1 in _JSON else f"${i}" for i in range(1, len(COLUMNS) + 1)
)
# Built from the record's field names, never from input; values are parameters.
_UPSERT_USAGE = f"INSERT INTO usage ({_COLUMN_LIST}) VALUES ({_PLACES})" + ON_CONFLICT_USAGE  # noqa: S608
_SETTLED = (
    "SELECT request_id FROM usage WHERE state = 'final' AND request_id = ANY($1::text[]) "
    "AND NOT (outcome = 'interrupted' AND usage_source = 'unknown')"
)
_UPSERT_COST = (
    "INSERT INTO usage_cost VALUES ($1, $2, $3, $4) ON CONFLICT (request_id, currency) "
    "DO UPDATE SET amount = excluded.amount, cache_savings = excluded.cache_savings"
)
_ADD_SPEND = (
    "INSERT INTO spend_daily VALUES ($1, $2, $3, $4) ON CONFLICT (team, day, currency) "
    "DO UPDATE SET amount = spend_daily.amount + excluded.amount"
)
_DROP_HOLDS = "DELETE FROM budget_holds WHERE request_id = ANY($1::text[])"
_INTERRUPT = (
    "UPDATE usage SET state = 'final', outcome = 'interrupted', unpriced_reason = $2 "
    "WHERE state = 'in_flight' AND owner = $1"
)
_RELEASE_HOLDS = "DELETE FROM budget_holds WHERE owner = $1"
_SPEND = "SELECT team, day, currency, amount FROM spend_daily WHERE day BETWEEN $1 AND $2"


def shown_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


class PostgresLedger:
    """The ledger in the PostgreSQL database at `url` (created or migrated on open)."""

    def __init__(self, url: str, billing_timezone: ZoneInfo, *, owner: str | None = None) -> None:
        self.url = shown_url(url)
        self.billing_timezone = billing_timezone
        self._owner = owner
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ledger-postgres", daemon=True
        )
        self._thread.start()
        try:
            self._conn = self._wait(asyncpg.connect(url))
            self._wait(pg_schema.migrate(self._conn, self.url))
        except BaseException:
            self._stop()
            raise

    def _wait(self, work: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def _day(self, instant: datetime) -> date:
        return instant.astimezone(self.billing_timezone).date()

    def _row(self, record: UsageRecord, state: str) -> list[Any]:
        row = list(stored_values(record))
        for index in _JSON:
            value = row[index]
            row[index] = json.dumps(dict(value) if isinstance(value, Mapping) else list(value))
        return [*row, state, self._day(record.started_at), self._owner]

    def write(self, pending: Sequence[UsageRecord], final: Sequence[UsageRecord]) -> None:
        """Store a batch in one transaction. Idempotent: a final row is never written twice."""
        self._wait(self._write(pending, final))

    async def _write(self, pending: Sequence[UsageRecord], final: Sequence[UsageRecord]) -> None:
        conn = self._conn
        async with conn.transaction():
            if pending:
                await conn.executemany(_UPSERT_USAGE, [self._row(r, "in_flight") for r in pending])
            if not final:
                return
            settled = {row[0] for row in await conn.fetch(_SETTLED, [r.request_id for r in final])}
            fresh = [r for r in final if r.request_id not in settled]
            spend: dict[tuple[str, date, str], Decimal] = {}
            costs = []
            for record in fresh:
                day = self._day(record.started_at)
                for currency, amount in record.costs.items():
                    key = (record.team, day, currency)
                    spend[key] = spend.get(key, ZERO) + amount
                    saved = record.cache_savings.get(currency, ZERO)
                    costs.append((record.request_id, currency, amount, saved))
            if fresh:
                await conn.executemany(_UPSERT_USAGE, [self._row(r, "final") for r in fresh])
            if costs:
                await conn.executemany(_UPSERT_COST, costs)
            if spend:
                await conn.executemany(_ADD_SPEND, [(*key, delta) for key, delta in spend.items()])
            await conn.execute(_DROP_HOLDS, [r.request_id for r in final])

    def release_owner(self, owner: str) -> tuple[int, int]:
        """End what a dead replica or worker left, in one transaction: its ``in_flight`` rows
        become final ``interrupted`` rows (usage unknown, never priced) and its holds are
        dropped. Returns (calls ended, holds dropped). Always one named owner: replicas share
        the database, so a starting one can never assume the others are dead (SQLite's
        start-up recovery of every owner has no PostgreSQL counterpart)."""
        return self._wait(self._release(owner))

    async def _release(self, owner: str) -> tuple[int, int]:
        async with self._conn.transaction():
            calls = await self._conn.execute(_INTERRUPT, owner, INTERRUPTED_REASON)
            holds = await self._conn.execute(_RELEASE_HOLDS, owner)
        return int(calls.rsplit(" ", 1)[1]), int(holds.rsplit(" ", 1)[1])

    def spend(self, since: date, until: date) -> list[SpendRow]:
        """Daily spend rows with ``since <= day <= until`` (billing days)."""
        rows = self._wait(self._conn.fetch(_SPEND, since, until))
        return [SpendRow(team, day, currency, amount) for team, day, currency, amount in rows]

    def close(self) -> None:
        try:
            self._wait(self._conn.close())
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
