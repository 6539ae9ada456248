"""The PostgreSQL ledger's schema on a real server: the record's own columns in native types,
created once however many replicas start together, and a newer schema refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg  # type: ignore[import-untyped]
import pytest

from proxy.ledger import pg_schema
from proxy.ledger.rows import COLUMNS
from tests.support.postgres import Postgres


@pytest.fixture
async def database(postgres: Postgres) -> AsyncIterator[str]:
    yield postgres.new_database()


async def columns(url: str, table: str) -> list[tuple[str, str, bool]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT column_name, data_type, is_nullable = 'YES' FROM information_schema.columns "
            "WHERE table_name = $1 ORDER BY ordinal_position",
            table,
        )
    finally:
        await conn.close()
    return [tuple(row) for row in rows]


async def test_the_usage_table_has_the_sqlite_ledgers_columns_in_native_types(
    database: str,
) -> None:
    conn = await asyncpg.connect(database)
    try:
        assert await pg_schema.migrate(conn, "test") == 0
    finally:
        await conn.close()
    found = await columns(database, "usage")
    assert [name for name, _, _ in found] == list(COLUMNS)
    types = {name: (kind, nullable) for name, kind, nullable in found}
    assert types["started_at"] == ("timestamp with time zone", False)
    assert types["first_byte_at"] == ("timestamp with time zone", True)
    assert types["stream"] == ("boolean", False)
    assert types["cache_hit_tokens"] == ("bigint", True)
    assert types["tool_calls"] == ("jsonb", False)
    assert types["billing_day"] == ("date", False)
    assert {name: kind for name, kind, _ in await columns(database, "usage_cost")}["amount"] == (
        "numeric"
    )


async def test_replicas_starting_together_create_the_schema_once(database: str) -> None:
    """Eight connections migrate at the same instant: one creates, the others find it done."""
    conns = [await asyncpg.connect(database) for _ in range(8)]
    try:
        found = await asyncio.gather(*(pg_schema.migrate(c, "test") for c in conns))
        again = await pg_schema.migrate(conns[0], "test")
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    assert sorted(found) == [0] + [pg_schema.SCHEMA_VERSION] * 7
    assert again == pg_schema.SCHEMA_VERSION


async def test_money_is_exact_and_a_newer_schema_is_refused(database: str) -> None:
    conn = await asyncpg.connect(database)
    try:
        await pg_schema.migrate(conn, "test")
        await conn.execute(
            "INSERT INTO spend_daily VALUES ('alpha', '2026-11-02', 'CNY', $1), "
            "('alpha', '2026-11-03', 'CNY', $2)",
            Decimal("0.0011456"),
            Decimal("0.00000001"),
        )
        assert await conn.fetchval("SELECT sum(amount) FROM spend_daily") == Decimal("0.00114561")
        await conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        with pytest.raises(pg_schema.SchemaTooNew) as refused:
            await pg_schema.migrate(conn, "ledger on test")
    finally:
        await conn.close()
    assert str(refused.value) == (
        "the PostgreSQL ledger ledger on test has schema version 99, newer than this proxy "
        f"knows ({pg_schema.SCHEMA_VERSION}): run the proxy version that wrote it, or a newer one"
    )


async def shape(url: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """Every table's columns (name, type, nullable, default) and every index's definition."""
    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = 'public' "
            "ORDER BY table_name, ordinal_position"
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
            "ORDER BY indexname"
        )
    finally:
        await conn.close()
    return [tuple(row) for row in columns], [tuple(row) for row in indexes]


async def test_a_version_6_database_gains_the_balance_tables_in_place(
    postgres: Postgres,
) -> None:
    """Version 7 (DeepSeek's balance, its windows, the poller's lease): a version 6 ledger
    is migrated in place, its rows kept, to the shape a new ledger has."""
    old = postgres.new_database()
    conn = await asyncpg.connect(old)
    try:
        async with conn.transaction():
            for statement in pg_schema.SCHEMA:
                if statement not in pg_schema.MIGRATIONS[6]:
                    await conn.execute(statement)
            await conn.execute("INSERT INTO meta VALUES ('schema_version', '6')")
            await conn.execute(
                "INSERT INTO spend_daily VALUES ('alpha', '2026-11-02', 'CNY', 0.0011456)"
            )
        assert await conn.fetchval("SELECT to_regclass('balance_snapshots') IS NULL")
        assert await pg_schema.migrate(conn, "test") == 6
        assert await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'") == "7"
        assert await conn.fetchval("SELECT amount FROM spend_daily") == Decimal("0.0011456")
    finally:
        await conn.close()
    new = postgres.new_database()
    conn = await asyncpg.connect(new)
    try:
        await pg_schema.migrate(conn, "test")
    finally:
        await conn.close()
    assert await shape(old) == await shape(new)
