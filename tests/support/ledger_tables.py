"""The ledger's tables read straight from either database, in one form, so a SQLite ledger and a
PostgreSQL ledger can be compared row for row: money as exact decimal text, instants as the
SQLite ledger's fixed-width UTC text, days as ISO text, booleans as 0/1 and JSON parsed. Read
with the drivers themselves, never through the code under test."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from proxy.formats import decimal_text, iso_instant

TABLES: dict[str, tuple[str, ...]] = {
    "usage": (
        "request_id",
        "state",
        "team",
        "model_requested",
        "outcome",
        "usage_source",
        "priced",
        "unpriced_reason",
        "price_version",
        "price_book",
        "tier",
        "flags",
        "tool_calls",
        "started_at",
        "priced_at",
        "billing_day",
        "client_status",
        "tags",
        "end_user",
    ),
    "usage_cost": ("request_id", "currency", "amount", "cache_savings"),
    "cost_history": (
        "request_id",
        "currency",
        "amount",
        "price_book",
        "price_version",
        "replaced_at",
        "replaced_by_book",
    ),
    "spend_daily": ("team", "day", "currency", "amount"),
}
"""Table -> the columns compared (``usage``: those a copy, a replay or a re-pricing writes)."""
_JSON = ("flags", "tool_calls", "tags")
Tables = dict[str, list[tuple[Any, ...]]]


def _normal(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in _JSON:
        return json.loads(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, datetime):
        return iso_instant(value, fixed_width=True)
    if isinstance(value, date):
        return value.isoformat()
    return value


def _select(table: str) -> str:
    return f"SELECT {', '.join(TABLES[table])} FROM {table}"  # noqa: S608 - constant names


def _rows(table: str, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    columns = TABLES[table]
    normal = [tuple(_normal(c, v) for c, v in zip(columns, row, strict=True)) for row in rows]
    return sorted(normal, key=repr)


def sqlite_tables(path: Path) -> Tables:
    with closing(sqlite3.connect(path)) as conn:
        return {table: _rows(table, conn.execute(_select(table)).fetchall()) for table in TABLES}


def pg_tables(url: str) -> Tables:
    async def read() -> Tables:
        conn = await asyncpg.connect(url)
        try:
            return {table: _rows(table, await conn.fetch(_select(table))) for table in TABLES}
        finally:
            await conn.close()

    return asyncio.run(read())


def pg_execute(url: str, *statements: str) -> None:
    """Run statements on the database at `url` (a test's own changes, or a fault)."""

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())
