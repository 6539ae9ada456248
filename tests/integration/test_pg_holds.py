"""Hard-budget holds in a real PostgreSQL: the same behaviour as the other hold stores (the
shared tests of tests/unit/test_budget_holds.py run here against `PostgresHolds`), and no
overshoot when replicas admit calls of one team at the same time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg  # type: ignore[import-untyped]
import pytest

from proxy.budgets import BudgetExceeded, BudgetUnavailable, HoldStore
from proxy.budgets.pg_holds import PostgresHolds
from proxy.ledger import pg_schema
from tests.support.postgres import Postgres, free_port
from tests.unit.test_budget_holds import (
    DAILY,
    DAY,
    WORST,
    Admit,
    test_a_changed_amount_applies_to_the_next_call_with_spend_and_holds_kept,
    test_a_changed_currency_counts_only_that_currency,
    test_a_changed_period_reads_the_new_period_and_keeps_the_running_calls,
    test_a_refused_call_holds_nothing,
    test_a_removed_budget_is_no_longer_checked_and_is_right_if_it_returns,
    test_an_added_budget_counts_the_spend_and_the_calls_already_running,
    test_check_and_hold_see_the_spend_and_every_running_call,
    test_settling_keeps_the_real_cost_and_dropping_frees_the_hold,
)

__all__ = [  # the shared behaviour, collected here with this module's `holds`
    "test_a_changed_amount_applies_to_the_next_call_with_spend_and_holds_kept",
    "test_a_changed_currency_counts_only_that_currency",
    "test_a_changed_period_reads_the_new_period_and_keeps_the_running_calls",
    "test_a_refused_call_holds_nothing",
    "test_a_removed_budget_is_no_longer_checked_and_is_right_if_it_returns",
    "test_an_added_budget_counts_the_spend_and_the_calls_already_running",
    "test_check_and_hold_see_the_spend_and_every_running_call",
    "test_settling_keeps_the_real_cost_and_dropping_frees_the_hold",
]


@pytest.fixture
async def database(postgres: Postgres) -> AsyncIterator[str]:
    url = postgres.new_database()
    conn = await asyncpg.connect(url)
    try:
        await pg_schema.migrate(conn, "test")
        await conn.execute(
            "INSERT INTO spend_daily VALUES ('alpha', '2026-11-02', 'CNY', 0.001), "
            "('alpha', '2026-11-01', 'CNY', 5), ('alpha', '2026-11-04', 'USD', 0.0001)"
            # Monday of this week; last week; today
        )
    finally:
        await conn.close()
    yield url


@pytest.fixture
async def holds(database: str) -> AsyncIterator[HoldStore]:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
    yield PostgresHolds(pool, owner="replica-a")
    await pool.close()


async def test_replicas_admitting_at_once_cannot_overshoot(database: str) -> None:
    """Two replicas (two pools), 100 concurrent calls of one team, a day budget with room for
    two worst cases: exactly two are admitted, and their holds are all that is held."""
    pools = [await asyncpg.create_pool(database, min_size=8, max_size=8) for _ in range(2)]
    replicas = [PostgresHolds(pool, owner=f"replica-{i}") for i, pool in enumerate(pools)]

    async def call(index: int) -> bool:
        try:
            await replicas[index % 2].hold("alpha", f"r{index}", DAY, (DAILY,), Admit())
        except BudgetExceeded:
            return False
        return True

    try:
        admitted = await asyncio.gather(*(call(i) for i in range(100)))
        held = await pools[0].fetchval("SELECT sum(amount) FROM budget_holds")
        owners = await pools[0].fetchval("SELECT count(DISTINCT owner) FROM budget_holds")
    finally:
        await asyncio.gather(*(pool.close() for pool in pools))
    assert sum(admitted) == 2  # 0.006 fits 2 x 0.0028, not 3
    assert held == 2 * WORST
    assert owners in (1, 2)


async def test_a_database_that_cannot_be_reached_fails_closed() -> None:
    """Nothing listens on the port: the admission is refused as unavailable, promptly."""
    pool = await asyncpg.create_pool(
        f"postgresql://proxy@127.0.0.1:{free_port()}/ledger", min_size=0, max_size=1
    )
    try:
        with pytest.raises(BudgetUnavailable):
            await PostgresHolds(pool).hold("alpha", "r1", DAY, (DAILY,), Admit())
        await PostgresHolds(pool).settle("r1", {"CNY": Decimal(1)})  # logged, never raised
    finally:
        await pool.close()
