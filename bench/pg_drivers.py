"""Which PostgreSQL driver for the ledger and the hard-budget holds (issue 13, step 3)?

``python -m bench.pg_drivers [--rounds N]`` starts a real PostgreSQL (fsync on, in a temporary
folder, `tests.support.postgres.running_postgres`), creates tables shaped like the proxy's and
measures, with the same server for every driver:

- **asyncpg** (async only, on uvloop as the proxy runs);
- **psycopg 3 async**, through `psycopg_pool.AsyncConnectionPool`, on uvloop;
- **psycopg 3 sync**, through `psycopg_pool.ConnectionPool`, called from threads: for the
  admission, from the event loop through a pool of threads (``run_in_executor``, as the SQLite
  holds run today); for the ledger rows, from one thread, as the proxy's ledger writer would.

Workloads:

- **admission**: the hard-budget check and hold as one transaction in one round trip, a call of
  the PL/pgSQL function `bench_admit`: lock the team's `budget_teams` row (``FOR UPDATE``), sum
  the team's holds for the day, insert the hold if under the limit. In a function each statement
  takes a fresh snapshot, so the sum sees every hold committed before the lock was granted (a
  single ``WITH ... INSERT`` statement would not: its snapshot predates the lock wait). The hold
  is transient, so the function commits it without waiting for the WAL flush
  (``synchronous_commit`` off for that transaction; one row measures the wait too). Each call is
  followed by the release of its hold (a ``DELETE``, as settlement would), so the holds table
  stays the size of the calls running; latency is the admission's alone, as seen by the event
  loop, at concurrency 1 and 32 (32 tasks over a pool of `POOL` connections), 4 teams.
- **rows**: batches of 200 `usage`-like rows (35 columns), one transaction each, fsync'd:
  ``executemany`` of an ``INSERT`` (in-flight rows), ``executemany`` of ``INSERT ... ON
  CONFLICT DO UPDATE`` over them (the final rows), and ``COPY`` into an empty table.

CPU is the client process's `time.process_time` over a workload divided by its operations
(every thread's, the server's excluded). Every figure is the median of `--rounds` rounds; the
drivers' order alternates from round to round. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from importlib.metadata import version as version_of
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import psycopg_pool
import uvloop

from tests.support.postgres import running_postgres

POOL = 8
CONCURRENCY = (1, 32)
TEAMS = 4
BATCH = 200
LIMIT = Decimal("1000000000")
HOLD = Decimal("0.0123")
DAY = "2026-12-03"

_SCHEMA = f"""
CREATE TABLE budget_teams (
    team TEXT NOT NULL,
    currency TEXT NOT NULL,
    budget NUMERIC NOT NULL,
    PRIMARY KEY (team, currency)
);
CREATE TABLE budget_holds (
    request_id TEXT NOT NULL,
    team TEXT NOT NULL,
    currency TEXT NOT NULL,
    day TEXT NOT NULL,
    amount NUMERIC NOT NULL,
    owner TEXT,
    PRIMARY KEY (request_id, currency)
);
CREATE INDEX budget_holds_team ON budget_holds (team, currency, day);
INSERT INTO budget_teams
    SELECT 'team-' || i, 'CNY', {LIMIT} FROM generate_series(0, {TEAMS - 1}) AS i;
CREATE FUNCTION bench_admit(
    p_request TEXT, p_team TEXT, p_currency TEXT, p_day TEXT, p_amount NUMERIC,
    p_owner TEXT, p_wait_flush BOOLEAN
) RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    v_budget NUMERIC;
    v_held NUMERIC;
BEGIN
    IF NOT p_wait_flush THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    SELECT budget INTO v_budget FROM budget_teams
        WHERE team = p_team AND currency = p_currency FOR UPDATE;
    IF NOT FOUND THEN
        RETURN FALSE;
    END IF;
    SELECT coalesce(sum(amount), 0) INTO v_held FROM budget_holds
        WHERE team = p_team AND currency = p_currency AND day = p_day;
    IF v_held + p_amount > v_budget THEN
        RETURN FALSE;
    END IF;
    INSERT INTO budget_holds (request_id, team, currency, day, amount, owner)
        VALUES (p_request, p_team, p_currency, p_day, p_amount, p_owner);
    RETURN TRUE;
END
$$;
"""  # noqa: S608 (constants only)

_COLUMNS: tuple[tuple[str, str], ...] = (
    ("request_id", "TEXT PRIMARY KEY"),
    ("state", "TEXT NOT NULL"),
    ("team", "TEXT NOT NULL"),
    ("key_id", "TEXT NOT NULL"),
    ("endpoint", "TEXT NOT NULL"),
    ("stream", "INTEGER NOT NULL"),
    ("model_requested", "TEXT NOT NULL"),
    ("model_served", "TEXT"),
    ("started_at", "TEXT NOT NULL"),
    ("billing_day", "TEXT NOT NULL"),
    ("first_byte_at", "TEXT"),
    ("ended_at", "TEXT NOT NULL"),
    ("cache_hit_tokens", "INTEGER"),
    ("cache_miss_tokens", "INTEGER"),
    ("output_tokens", "INTEGER"),
    ("reasoning_tokens", "INTEGER"),
    ("prompt_tokens", "INTEGER"),
    ("tool_calls", "TEXT NOT NULL"),
    ("upstream_status", "INTEGER"),
    ("upstream_trace_id", "TEXT"),
    ("outcome", "TEXT NOT NULL"),
    ("usage_source", "TEXT NOT NULL"),
    ("priced", "INTEGER NOT NULL"),
    ("unpriced_reason", "TEXT"),
    ("billed_model", "TEXT"),
    ("price_version", "TEXT"),
    ("schedule_version", "TEXT"),
    ("tier", "TEXT"),
    ("priced_at", "TEXT"),
    ("price_book", "TEXT NOT NULL"),
    ("flags", "TEXT NOT NULL"),
    ("owner", "TEXT"),
    ("client_status", "INTEGER"),
    ("amount", "TEXT"),
    ("cache_savings", "TEXT"),
)
_NAMES = tuple(name for name, _ in _COLUMNS)
_USAGE = "CREATE TABLE usage ({})".format(", ".join(f"{n} {t}" for n, t in _COLUMNS))


def _insert_sql(placeholder: Callable[[int], str], upsert: bool) -> str:
    values = ", ".join(placeholder(i + 1) for i in range(len(_NAMES)))
    sql = f"INSERT INTO usage ({', '.join(_NAMES)}) VALUES ({values})"  # noqa: S608
    if upsert:
        updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in _NAMES[1:])
        sql += f" ON CONFLICT (request_id) DO UPDATE SET {updates}"
    return sql


_PG_INSERT = _insert_sql(lambda i: f"${i}", upsert=False)
_PG_UPSERT = _insert_sql(lambda i: f"${i}", upsert=True)
_PS_INSERT = _insert_sql(lambda i: "%s", upsert=False)
_PS_UPSERT = _insert_sql(lambda i: "%s", upsert=True)
_PS_COPY = f"COPY usage ({', '.join(_NAMES)}) FROM STDIN"
_PS_COPY_STAGE = f"COPY usage_stage ({', '.join(_NAMES)}) FROM STDIN"
_STAGE = "CREATE TEMP TABLE usage_stage (LIKE usage) ON COMMIT DROP"
_FROM_STAGE = (
    "INSERT INTO usage SELECT * FROM usage_stage ON CONFLICT (request_id) DO UPDATE SET "  # noqa: S608
    + ", ".join(f"{n} = EXCLUDED.{n}" for n in _NAMES[1:])
)
_PG_ADMIT = "SELECT bench_admit($1, $2, 'CNY', $3, $4, 'bench', $5)"
_PS_ADMIT = "SELECT bench_admit(%s, %s, 'CNY', %s, %s, 'bench', %s)"
_PG_RELEASE = "DELETE FROM budget_holds WHERE request_id = $1"
_PS_RELEASE = "DELETE FROM budget_holds WHERE request_id = %s"

Row = tuple[Any, ...]


def usage_rows(count: int, state: str) -> list[Row]:
    """`count` rows with fresh request ids, shaped like the proxy's records."""
    final = state == "final"
    rows: list[Row] = []
    for i in range(count):
        rows.append(
            (
                f"req-{uuid.uuid4().hex}",
                state,
                f"team-{i % TEAMS}",
                "key-0123456789abcdef",
                "/chat/completions",
                i % 2,
                "deepseek-chat",
                "deepseek-chat" if final else None,
                "2026-12-03T12:00:00.123456Z",
                DAY,
                "2026-12-03T12:00:00.323456Z" if final else None,
                "2026-12-03T12:00:01.123456Z",
                1024 if final else None,
                88 if final else None,
                512 if final else None,
                0 if final else None,
                1112 if final else None,
                "{}",
                200 if final else None,
                "trace-0123456789" if final else None,
                "complete" if final else "in_flight",
                "reported" if final else "none",
                1 if final else 0,
                None,
                "deepseek-chat" if final else None,
                "2026-09" if final else None,
                "standard" if final else None,
                "default" if final else None,
                "2026-12-03T12:00:01.223456Z" if final else None,
                "book-2026-09",
                "[]",
                "bench",
                200 if final else None,
                "0.001234560" if final else None,
                "0.000456000" if final else None,
            )
        )
    return rows


def as_final(rows: Sequence[Row]) -> list[Row]:
    """The final rows of the calls whose in-flight rows are `rows` (same request ids)."""
    template = usage_rows(1, "final")[0]
    return [(row[0], *template[1:]) for row in rows]


@dataclass
class Admission:
    latencies: list[float]
    seconds: float
    cpu: float

    @property
    def calls_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Rates:
    rows: int
    seconds: float
    cpu: float


@dataclass
class Figures:
    """Every round's figures of one driver, by workload name."""

    admission: dict[str, list[Admission]] = field(default_factory=dict)
    rows: dict[str, list[Rates]] = field(default_factory=dict)


AdmitCall = Callable[[str, str, bool], Awaitable[bool]]
ReleaseCall = Callable[[str], Awaitable[None]]


async def run_admission(
    admit: AdmitCall, release: ReleaseCall, calls: int, concurrency: int, wait_flush: bool
) -> Admission:
    latencies: list[float] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < calls:
            number = issued
            issued += 1
            request = f"hold-{uuid.uuid4().hex}"
            started = time.perf_counter()
            admitted = await admit(request, f"team-{number % TEAMS}", wait_flush)
            latencies.append(time.perf_counter() - started)
            if not admitted:
                raise RuntimeError("a hold was refused under a huge budget")
            await release(request)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Admission(latencies, time.perf_counter() - wall, time.process_time() - cpu)


class Driver:
    name = ""

    async def open(self, url: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def admit(self, request: str, team: str, wait_flush: bool) -> bool:
        raise NotImplementedError

    async def release(self, request: str) -> None:
        raise NotImplementedError

    async def insert(self, rows: Sequence[Row], upsert: bool) -> None:
        raise NotImplementedError

    async def copy(self, rows: Sequence[Row], upsert: bool) -> None:
        raise NotImplementedError


async def _no_reset(connection: Any) -> None:
    """Return connections to asyncpg's pool as they are, as psycopg's pool does."""


class AsyncpgDriver(Driver):
    """asyncpg's pool without its default reset on release: that reset is one more round trip
    per acquire (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``),
    which the proxy, setting nothing on its sessions, would turn off."""

    name = "asyncpg"
    reset: Callable[[Any], Awaitable[None]] | None = staticmethod(_no_reset)

    async def open(self, url: str) -> None:
        self.pool = await asyncpg.create_pool(url, min_size=POOL, max_size=POOL, reset=self.reset)

    async def close(self) -> None:
        await self.pool.close()

    async def admit(self, request: str, team: str, wait_flush: bool) -> bool:
        result: bool = await self.pool.fetchval(_PG_ADMIT, request, team, DAY, HOLD, wait_flush)
        return result

    async def release(self, request: str) -> None:
        await self.pool.execute(_PG_RELEASE, request)

    async def insert(self, rows: Sequence[Row], upsert: bool) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(_PG_UPSERT if upsert else _PG_INSERT, rows)

    async def copy(self, rows: Sequence[Row], upsert: bool) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if not upsert:
                await conn.copy_records_to_table("usage", records=rows, columns=_NAMES)
                return
            await conn.execute(_STAGE)
            await conn.copy_records_to_table("usage_stage", records=rows, columns=_NAMES)
            await conn.execute(_FROM_STAGE)


class AsyncpgDefaultDriver(AsyncpgDriver):
    """asyncpg's pool as it comes: reset on every release."""

    name = "asyncpg, default pool"
    reset = None


class PsycopgAsyncDriver(Driver):
    name = "psycopg 3 async"

    async def open(self, url: str) -> None:
        self.pool = psycopg_pool.AsyncConnectionPool(
            url, min_size=POOL, max_size=POOL, kwargs={"autocommit": True}, open=False
        )
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.pool.close()

    async def admit(self, request: str, team: str, wait_flush: bool) -> bool:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(_PS_ADMIT, (request, team, DAY, HOLD, wait_flush))
            row = await cursor.fetchone()
        return bool(row and row[0])

    async def release(self, request: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(_PS_RELEASE, (request,))

    async def insert(self, rows: Sequence[Row], upsert: bool) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            await conn.cursor().executemany(_PS_UPSERT if upsert else _PS_INSERT, rows)

    async def copy(self, rows: Sequence[Row], upsert: bool) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            if upsert:
                await conn.execute(_STAGE)
            async with conn.cursor().copy(_PS_COPY_STAGE if upsert else _PS_COPY) as copy:
                for row in rows:
                    await copy.write_row(row)
            if upsert:
                await conn.execute(_FROM_STAGE)


class PsycopgSyncDriver(Driver):
    """psycopg 3's sync API, from threads: admissions through `POOL` threads off the event
    loop, ledger rows from one writer thread."""

    name = "psycopg 3 sync (threads)"

    async def open(self, url: str) -> None:
        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=POOL, max_size=POOL, kwargs={"autocommit": True}, open=False
        )
        self.pool.open(wait=True)
        self.threads = ThreadPoolExecutor(max_workers=POOL, thread_name_prefix="budgets")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")

    async def close(self) -> None:
        self.threads.shutdown()
        self.writer.shutdown()
        self.pool.close()

    def _admit(self, request: str, team: str, wait_flush: bool) -> bool:
        with self.pool.connection() as conn:
            row = conn.execute(_PS_ADMIT, (request, team, DAY, HOLD, wait_flush)).fetchone()
        return bool(row and row[0])

    def _release(self, request: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(_PS_RELEASE, (request,))

    def _insert(self, rows: Sequence[Row], upsert: bool) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.cursor().executemany(_PS_UPSERT if upsert else _PS_INSERT, rows)

    def _copy(self, rows: Sequence[Row], upsert: bool) -> None:
        with self.pool.connection() as conn, conn.transaction():
            if upsert:
                conn.execute(_STAGE)
            with conn.cursor().copy(_PS_COPY_STAGE if upsert else _PS_COPY) as copy:
                for row in rows:
                    copy.write_row(row)
            if upsert:
                conn.execute(_FROM_STAGE)

    async def admit(self, request: str, team: str, wait_flush: bool) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.threads, self._admit, request, team, wait_flush)

    async def release(self, request: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.threads, self._release, request)

    async def insert(self, rows: Sequence[Row], upsert: bool) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.writer, self._insert, rows, upsert)

    async def copy(self, rows: Sequence[Row], upsert: bool) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.writer, self._copy, rows, upsert)


async def timed_batches(
    batches: Sequence[Sequence[Row]], write: Callable[[Sequence[Row]], Awaitable[None]]
) -> Rates:
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        await write(batch)
    return Rates(
        sum(len(b) for b in batches), time.perf_counter() - wall, time.process_time() - cpu
    )


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def one_round(driver: Driver, url: str, figures: Figures, args: argparse.Namespace) -> None:
    reset = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await driver.open(url)
    try:
        # warm up: connections, prepared statements, plans
        await run_admission(driver.admit, driver.release, 200, POOL, False)
        workloads = [(c, False) for c in CONCURRENCY] + [(c, True) for c in CONCURRENCY]
        for concurrency, wait_flush in workloads:
            if wait_flush and driver.name != "asyncpg":
                continue
            calls = args.calls if concurrency > 1 else args.calls // 2
            if wait_flush:
                calls //= 4
            result = await run_admission(
                driver.admit, driver.release, calls, concurrency, wait_flush
            )
            key = f"c={concurrency}" + (", commit waits for fsync" if wait_flush else "")
            figures.admission.setdefault(key, []).append(result)
            progress(
                f"  {driver.name} admission {key}: p50 {result.percentile(0.5) * 1e3:.3f} ms, "
                f"{result.calls_per_second:,.0f}/s"
            )
        await reset.execute("TRUNCATE budget_holds")
        batches = [usage_rows(BATCH, "in_flight") for _ in range(args.batches)]
        finals = [as_final(batch) for batch in batches]
        await reset.execute("TRUNCATE usage")
        inserted = await timed_batches(batches, lambda b: driver.insert(b, upsert=False))
        upserted = await timed_batches(finals, lambda b: driver.insert(b, upsert=True))
        await reset.execute("TRUNCATE usage")
        await timed_batches(batches, lambda b: driver.insert(b, upsert=False))
        copied_over = await timed_batches(finals, lambda b: driver.copy(b, upsert=True))
        await reset.execute("TRUNCATE usage")
        copied = await timed_batches(finals, lambda b: driver.copy(b, upsert=False))
        await reset.execute("TRUNCATE usage")
        for key, rates in (
            ("executemany INSERT", inserted),
            ("executemany upsert (ON CONFLICT DO UPDATE)", upserted),
            ("COPY", copied),
            ("upsert as COPY to a temp table + INSERT ... SELECT ON CONFLICT", copied_over),
        ):
            figures.rows.setdefault(key, []).append(rates)
            progress(f"  {driver.name} {key}: {rates.rows / rates.seconds:,.0f} rows/s")
    finally:
        await driver.close()
        await reset.close()


def table(results: dict[str, Figures], rounds: int) -> str:
    names = list(results)
    lines = [
        "| workload | figure | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    median = statistics.median
    first = results[names[0]]
    for key in first.admission:

        def cell(name: str, pick: Callable[[Admission], float], fmt: str, key: str = key) -> str:
            runs = results[name].admission.get(key)
            return format(median(pick(r) for r in runs), fmt) if runs else "-"

        label = f"admission, {key}"
        for figure, pick, fmt in (
            ("p50 ms", lambda r: r.percentile(0.5) * 1e3, ".3f"),
            ("p99 ms", lambda r: r.percentile(0.99) * 1e3, ".3f"),
            ("calls/s (admit + release)", lambda r: r.calls_per_second, ",.0f"),
            (
                "client CPU us per call (admit + release)",
                lambda r: r.cpu / len(r.latencies) * 1e6,
                ".0f",
            ),
        ):
            cells = " | ".join(cell(n, pick, fmt) for n in names)
            lines.append(f"| {label} | {figure} | {cells} |")
    for key in first.rows:
        for figure, pick, fmt in (
            ("rows/s", lambda r: r.rows / r.seconds, ",.0f"),
            ("client CPU us per row", lambda r: r.cpu / r.rows * 1e6, ".1f"),
        ):
            cells = " | ".join(
                format(median(pick(r) for r in results[n].rows[key]), fmt) for n in names
            )
            lines.append(f"| rows, {BATCH} per batch: {key} | {figure} | {cells} |")
    return "\n".join(lines)


async def measure(args: argparse.Namespace) -> str:
    drivers: list[Driver] = [
        AsyncpgDriver(),
        AsyncpgDefaultDriver(),
        PsycopgAsyncDriver(),
        PsycopgSyncDriver(),
    ]
    results = {d.name: Figures() for d in drivers}
    with running_postgres(durable=True) as server:
        server.psql(_SCHEMA)
        server.psql(_USAGE)
        version = server.psql("SHOW server_version")
        for number in range(args.rounds):
            order = drivers if number % 2 == 0 else drivers[::-1]
            progress(f"round {number + 1} of {args.rounds}")
            for driver in order:
                await one_round(driver, server.url, results[driver.name], args)
    header = (
        f"PostgreSQL {version} (fsync on, loopback TCP); asyncpg {asyncpg.__version__}, "
        f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), "
        f"psycopg_pool {psycopg_pool.__version__}, uvloop {version_of('uvloop')}; "
        f"pool of {POOL} connections, {TEAMS} teams; median of {args.rounds} rounds"
    )
    return header + "\n\n" + table(results, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10000, help="admissions at c=32 per round")
    parser.add_argument("--batches", type=int, default=50, help=f"batches of {BATCH} rows")
    args = parser.parse_args()
    print(uvloop.run(measure(args)))


if __name__ == "__main__":
    main()
