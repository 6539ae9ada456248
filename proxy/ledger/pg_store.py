"""The ledger's records in PostgreSQL (step 3), written as the SQLite ledger writes them.

`PostgresLedger.write` stores a batch in one transaction with the SQLite ledger's rules
(`proxy.ledger.store.SQLiteLedger.write`): in-flight rows upserted, a final row never written
twice (a row recovery ended as ``interrupted`` with unknown usage is replaced by the call's
real record), costs per currency, the daily spend adjusted once per team, day and currency,
and the calls' budget holds dropped in the same transaction that adds their cost to the
spend, so a cost is never counted twice or not at all across replicas.

asyncpg is asynchronous only (the measured choice, bench/RESULTS.md), and the ledger writer is
a thread: the store runs a small pool of connections on an event loop of its own, in a thread
of its own, and its methods wait for the result, so they may be called from any thread (the
writer's, or a scrape reading spend) and never touch the proxy's event loop. The same loop
renews this replica's lease and releases dead replicas (`proxy.ledger.leases`).

Losing the database loses nothing: every wait is bounded (`CONNECT_TIMEOUT`,
`COMMAND_TIMEOUT`), a failed write raises, and the writer keeps the records and retries
(`proxy.ledger.writer`); the pool replaces a broken connection on the next use, so the first
write after the server returns commits the backlog, and writing a batch twice changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
from proxy.ledger.leases import Leases, Released
from proxy.ledger.rows import COLUMNS, ON_CONFLICT_USAGE, STORED_FIELDS, stored_values
from proxy.ledger.store import SpendRow, SpendUnreadable
from proxy.records import UsageRecord

log = logging.getLogger("proxy.ledger")

_T = TypeVar("_T")
CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection: an unreachable server fails a write in this time, at most."""
COMMAND_TIMEOUT = 30.0
"""Seconds one statement may take (a batch's statements take milliseconds on a healthy
server): a server that stopped answering fails the write instead of holding the writer."""
SPEND_TIMEOUT = 2.0
"""Seconds a read of the daily spend may take: scrapes wait on it."""
CLOSE_TIMEOUT = 5.0
"""Seconds `close` gives the release of this replica and the pool's goodbye."""
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
_SPEND = "SELECT team, day, currency, amount FROM spend_daily WHERE day BETWEEN $1 AND $2"
_TEAM_SPEND = (
    "SELECT day, currency, amount FROM spend_daily WHERE team = $1 AND day BETWEEN $2 AND $3"
)
_UNREADABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
"""What a read of a lost or failing database raises (a refused connection is an OSError)."""


def shown_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


OPEN_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    pg_schema.SchemaTooNew,
)
"""What opening a PostgreSQL ledger raises when the server, the database or its schema is
not what the proxy needs (a refused connection is an OSError, a wrong password a
PostgresError)."""
RELEASE_TIMEOUT = 2.0
"""Seconds `release_dead` may take: the supervisor waits on it, and retries a failure."""


def release_dead(url: str, owner: str) -> tuple[int, int]:
    """Release a dead worker's calls and holds at once, from the supervisor of
    ``serve --workers N`` (which has no event loop): (calls ended, holds dropped)."""

    async def release() -> Released:
        conn = await asyncpg.connect(url, timeout=RELEASE_TIMEOUT)
        try:
            return await Leases(owner, 0.0).leave(conn)
        finally:
            await conn.close()

    async def bounded() -> Released:
        async with asyncio.timeout(RELEASE_TIMEOUT * 2):
            return await release()

    released = asyncio.run(bounded())
    return released.calls, released.holds


class PostgresLedger:
    """The ledger in the PostgreSQL database at `url` (created or migrated on open).

    With `lease` (seconds) this store is a replica's: it takes a lease for `owner` before
    anything is written and renews it, releasing dead replicas, until `close`
    (`proxy.ledger.leases`). Without, it only reads and writes (commands, tests)."""

    def __init__(
        self,
        url: str,
        billing_timezone: ZoneInfo,
        *,
        owner: str | None = None,
        lease: float | None = None,
    ) -> None:
        self.url = shown_url(url)
        self.billing_timezone = billing_timezone
        self._owner = owner
        self._leases = Leases(owner, lease) if owner is not None and lease is not None else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ledger-postgres", daemon=True
        )
        self._thread.start()
        self._beating: asyncio.Task[None] | None = None
        try:
            self._pool = self._wait(self._open(url))
        except BaseException:
            self._stop()
            raise

    async def _open(self, url: str) -> Any:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=4,  # the writer, a scrape's spend read, the lease beat, the spend API
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
        )
        try:
            async with pool.acquire() as conn:
                await pg_schema.migrate(conn, self.url)
                if self._leases is not None:
                    await self._leases.join(conn)
        except BaseException:
            pool.terminate()
            raise
        if self._leases is not None:
            self._beating = asyncio.get_running_loop().create_task(self._beat(self._leases, pool))
        return pool

    def _wait(self, work: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

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
        async with self._pool.acquire() as conn, conn.transaction():
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

    async def _beat(self, leases: Leases, pool: Any) -> None:
        """Renew the lease and release the dead every `Leases.interval`, until `close`."""
        failing = False
        while True:
            await asyncio.sleep(leases.interval)
            try:
                async with pool.acquire() as conn:
                    await leases.beat(conn, self._loop.time())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again at the next beat
                leases.lost()
                if not failing:
                    log.error("cannot renew this replica's lease in %s: %s", self.url, exc)
                failing = True
            else:
                if failing:
                    log.info("renewed this replica's lease in %s again", self.url)
                failing = False

    def beat_now(self) -> Released:
        """One beat at once, releasing the dead without the wait after an outage (tests: no
        waiting on the interval)."""
        assert self._leases is not None, "a store without a lease does not beat"
        leases = self._leases

        async def beat() -> Released:
            async with self._pool.acquire() as conn:
                return await leases.beat(conn, None)

        return self._wait(beat())

    def release_owner(self, owner: str) -> tuple[int, int]:
        """End what a dead replica or worker left, in one transaction: its ``in_flight`` rows
        become final ``interrupted`` rows (usage unknown, never priced), its holds are
        dropped and its lease is forgotten. Returns (calls ended, holds dropped). Always one
        named owner: replicas share the database, so a starting one can never assume the
        others are dead (SQLite's start-up recovery of every owner has no PostgreSQL
        counterpart; leases do it, `proxy.ledger.leases`)."""

        async def release() -> Released:
            async with self._pool.acquire() as conn:
                return await Leases(owner, 0.0).leave(conn)

        released = self._wait(release())
        return released.calls, released.holds

    def spend(self, since: date, until: date) -> list[SpendRow]:
        """Daily spend rows with ``since <= day <= until`` (billing days); raises after
        `SPEND_TIMEOUT` seconds when the database does not answer."""
        rows = self._wait(self._fetch(_SPEND, since, until), SPEND_TIMEOUT)
        return [SpendRow(team, day, currency, amount) for team, day, currency, amount in rows]

    async def team_spend(self, team: str, since: date, until: date) -> list[SpendRow]:
        """`team`'s daily spend rows with ``since <= day <= until`` (a range of the table's
        primary key), awaited from the serving loop without blocking it: the query runs on
        this store's own loop; `SpendUnreadable` after `SPEND_TIMEOUT` seconds at most."""
        work = asyncio.run_coroutine_threadsafe(
            self._fetch(_TEAM_SPEND, team, since, until), self._loop
        )
        try:
            rows = await asyncio.wrap_future(work)
        except _UNREADABLE as exc:
            raise SpendUnreadable(
                f"cannot read spend from {self.url}: {str(exc) or type(exc).__name__}"
            ) from exc
        return [SpendRow(team, day, currency, amount) for day, currency, amount in rows]

    async def _fetch(self, query: str, *args: object) -> list[Any]:
        async with self._pool.acquire(timeout=SPEND_TIMEOUT) as conn:
            rows: list[Any] = await conn.fetch(query, *args, timeout=SPEND_TIMEOUT)
            return rows

    def close(self) -> None:
        """Stop the lease; release this replica's leftovers (after a drain, nothing should
        be running); close the connections. Bounded: a database that is away costs at most
        `CLOSE_TIMEOUT`, and the survivors release this replica when its lease runs out."""
        try:
            self._wait(self._close(), CLOSE_TIMEOUT * 2)
        except Exception as exc:
            log.error("closing the PostgreSQL ledger %s: %s", self.url, exc)
        finally:
            self._stop()

    async def _close(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
        leases = self._leases
        try:
            if leases is not None:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    async with self._pool.acquire() as conn:
                        released = await leases.leave(conn)
                if released.calls or released.holds:
                    log.warning(
                        "this replica stopped with %d call(s) in flight (recorded as "
                        "'interrupted') and %d budget hold(s) (dropped)",
                        released.calls,
                        released.holds,
                    )
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._pool.close()
        except (Exception, TimeoutError):
            self._pool.terminate()
            raise

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
