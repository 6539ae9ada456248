"""Leases in a PostgreSQL ledger (`proxy.ledger.leases`): a replica whose lease ran out, or
whose rows have no lease at all, is released by a live one; a live one never is; a replica
released by mistake (it was away longer than its lease) takes its lease again; a clean stop
releases the replica's own leftovers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from proxy.ledger import pg_schema
from proxy.ledger.leases import Released
from proxy.ledger.pg_store import PostgresLedger
from proxy.pricing import PriceBook
from proxy.records import UsageRecord
from tests.support.ledger_faults import record
from tests.support.ledger_rows import BEIJING
from tests.support.postgres import Postgres
from tests.support.proxy_harness import PEAK


@pytest.fixture
def url(postgres: Postgres) -> str:
    return postgres.new_database()


def running(book: PriceBook, request_id: str) -> UsageRecord:
    call = record(book, request_id, PEAK, "alpha")
    return UsageRecord.in_flight(call, call.started_at, book.digest)


def hold(postgres: Postgres, url: str, request_id: str, owner: str) -> None:
    postgres.psql(  # the test's own constants, no input
        "INSERT INTO budget_holds VALUES "  # noqa: S608
        f"('{request_id}', 'alpha', 'CNY', '2026-11-02', 0.5, '{owner}')",
        url.rsplit("/", 1)[1],
    )


def rows(postgres: Postgres, url: str, sql: str) -> list[str]:
    return postgres.psql(sql, url.rsplit("/", 1)[1]).splitlines()


@pytest.fixture
def live(url: str) -> Iterator[PostgresLedger]:
    ledger = PostgresLedger(url, BEIJING, owner="live", lease=60)
    yield ledger
    ledger.close()


def test_an_expired_lease_and_a_missing_one_are_released(
    url: str, postgres: Postgres, book: PriceBook, live: PostgresLedger
) -> None:
    dead = PostgresLedger(url, BEIJING, owner="dead", lease=60)
    dead.write([running(book, "d1")], [])
    hold(postgres, url, "d1", "dead")
    rows(
        postgres,
        url,
        "UPDATE replicas SET lease_until = now() - interval '1 second' WHERE owner = 'dead'",
    )
    live.write([running(book, "l1")], [])
    hold(postgres, url, "l1", "live")
    # Rows of an owner that never had a lease (a crashed start, an older proxy).
    orphan = PostgresLedger(url, BEIJING, owner="orphan")
    orphan.write([running(book, "o1")], [])
    orphan.close()
    hold(postgres, url, "o1", "orphan")

    assert live.beat_now() == Released(("dead", "orphan"), 2, 2)
    assert rows(
        postgres,
        url,
        "SELECT request_id, state, outcome, usage_source FROM usage ORDER BY request_id",
    ) == [
        "d1|final|interrupted|unknown",
        "l1|in_flight|in_flight|unknown",
        "o1|final|interrupted|unknown",
    ]
    assert rows(postgres, url, "SELECT request_id FROM budget_holds") == ["l1"]
    assert rows(postgres, url, "SELECT owner FROM replicas ORDER BY owner") == ["live"]
    assert live.beat_now() == Released((), 0, 0)  # nothing more to release
    dead.close()


def test_a_live_lease_is_never_released(
    url: str, postgres: Postgres, book: PriceBook, live: PostgresLedger
) -> None:
    other = PostgresLedger(url, BEIJING, owner="other", lease=60)
    other.write([running(book, "x1")], [])
    hold(postgres, url, "x1", "other")
    assert live.beat_now() == Released((), 0, 0)
    assert rows(postgres, url, "SELECT state FROM usage") == ["in_flight"]
    assert other.beat_now() == Released((), 0, 0)
    other.close()


def test_a_replica_released_by_mistake_takes_its_lease_again(
    url: str,
    postgres: Postgres,
    book: PriceBook,
    live: PostgresLedger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Away longer than its lease (a partition): released, its call marked interrupted; it
    renews, and the call's real record still replaces the interrupted row."""
    away = PostgresLedger(url, BEIJING, owner="away", lease=60)
    call = record(book, "a1", PEAK, "alpha")
    away.write([UsageRecord.in_flight(call, call.started_at, book.digest)], [])
    rows(
        postgres,
        url,
        "UPDATE replicas SET lease_until = now() - interval '1 second' WHERE owner = 'away'",
    )
    assert live.beat_now().owners == ("away",)
    with caplog.at_level(logging.WARNING, "proxy.ledger"):
        away.beat_now()
    assert "lease (away) had run out and others released its calls" in caplog.text
    assert rows(postgres, url, "SELECT owner FROM replicas ORDER BY owner") == ["away", "live"]
    away.write([], [call])
    assert rows(postgres, url, "SELECT outcome, usage_source FROM usage") == ["complete|reported"]
    away.close()


def test_a_clean_stop_releases_what_is_left_and_the_lease(
    url: str, postgres: Postgres, book: PriceBook
) -> None:
    ledger = PostgresLedger(url, BEIJING, owner="me", lease=60)
    ledger.write([running(book, "m1")], [])
    hold(postgres, url, "m1", "me")
    ledger.close()
    assert rows(postgres, url, "SELECT outcome FROM usage") == ["interrupted"]
    assert rows(postgres, url, "SELECT count(*) FROM budget_holds") == ["0"]
    assert rows(postgres, url, "SELECT count(*) FROM replicas") == ["0"]


async def test_a_version_3_database_gains_the_leases(postgres: Postgres) -> None:
    """A ledger created by the first PostgreSQL schema is migrated in place, to the leases
    (version 4), the one-statement hold (version 5) and every later version."""
    url = postgres.new_database()
    later = [
        statement
        for version, statements in pg_schema.MIGRATIONS.items()
        if version >= 3
        for statement in statements
    ]
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            for statement in pg_schema.SCHEMA:
                if statement not in later:
                    await conn.execute(statement)
            # Version 6's columns are in the usage table's statement: a version 3 lacks them.
            await conn.execute("ALTER TABLE usage DROP COLUMN tags, DROP COLUMN end_user")
            await conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
        assert await pg_schema.migrate(conn, "test") == 3
        assert await conn.fetchval("SELECT to_regclass('replicas') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regproc('proxy_hold') IS NOT NULL")
        assert await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'") == str(
            pg_schema.SCHEMA_VERSION
        )
    finally:
        await conn.close()
