"""The PostgreSQL ledger stores what the SQLite ledger stores: the same batches written to both
give the same records back and the same daily spend, with the same rules (a final row never
twice, an interrupted row replaced by the call's real record, holds dropped with the spend)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.ledger.pg_store import PostgresLedger, shown_url
from proxy.ledger.store import SpendRow, SQLiteLedger
from proxy.pricing import PriceBook
from proxy.records import UsageRecord
from tests.support.ledger_faults import record
from tests.support.postgres import Postgres
from tests.support.proxy_harness import PEAK

BEIJING = ZoneInfo("Asia/Shanghai")


@pytest.fixture
def ledgers(postgres: Postgres, tmp_path: Path) -> Iterator[tuple[SQLiteLedger, PostgresLedger]]:
    sqlite = SQLiteLedger(tmp_path / "ledger.sqlite3", BEIJING, owner="w1")
    pg = PostgresLedger(postgres.new_database(), BEIJING, owner="w1")
    yield sqlite, pg
    sqlite.close()
    pg.close()


def ordered(rows: list[SpendRow]) -> list[SpendRow]:
    return sorted(rows, key=lambda r: (r.team, r.day, r.currency))


def stored(postgres: Postgres, pg: PostgresLedger) -> list[str]:
    """Each usage row of the PostgreSQL ledger as psql prints it: state, outcome, owner."""
    database = pg.url.rsplit("/", 1)[1]
    return postgres.psql(
        "SELECT request_id, state, outcome, owner FROM usage ORDER BY request_id", database
    ).splitlines()


def test_the_same_batches_give_the_same_spend(
    ledgers: tuple[SQLiteLedger, PostgresLedger], book: PriceBook, postgres: Postgres
) -> None:
    calls = [record(book, f"r{i}", PEAK + timedelta(hours=i * 7), "alpha") for i in range(6)]
    calls.append(record(book, "b1", PEAK, "beta"))
    running = UsageRecord.in_flight(calls[0], calls[0].started_at, book.digest)
    for ledger in ledgers:
        ledger.write([running], [])
        ledger.write([], calls[:4])
        ledger.write([], calls)  # the first four again: never counted twice
        ledger.write([running], [])  # a late in-flight row never replaces a final one
    sqlite, pg = ledgers
    since, until = date(2026, 11, 1), date(2026, 11, 30)
    assert ordered(pg.spend(since, until)) == ordered(sqlite.spend(since, until))
    cny = sum(r.amount for r in pg.spend(since, until) if r.currency == "CNY")
    assert cny == sum(c.costs["CNY"] for c in calls)
    assert stored(postgres, pg) == [
        f"{c.request_id}|final|complete|w1" for c in sorted(calls, key=lambda c: c.request_id)
    ]


def test_an_interrupted_row_is_replaced_by_the_calls_real_record(
    ledgers: tuple[SQLiteLedger, PostgresLedger], book: PriceBook, postgres: Postgres
) -> None:
    real = record(book, "r1", PEAK, "alpha")
    interrupted = dataclasses.replace(
        UsageRecord.in_flight(real, real.started_at, book.digest),
        outcome="interrupted",
        unpriced_reason="the proxy stopped during the call",
    )
    _, pg = ledgers
    pg.write([], [interrupted])
    assert pg.spend(date(2026, 11, 1), date(2026, 11, 30)) == []
    pg.write([], [real])
    spent = {r.currency: r.amount for r in pg.spend(date(2026, 11, 1), date(2026, 11, 30))}
    assert spent == dict(real.costs)
    assert stored(postgres, pg) == ["r1|final|complete|w1"]


def test_holds_go_in_the_transaction_that_adds_the_spend(
    ledgers: tuple[SQLiteLedger, PostgresLedger], book: PriceBook, postgres: Postgres
) -> None:
    _, pg = ledgers
    database = pg.url.rsplit("/", 1)[1]
    postgres.psql(
        "INSERT INTO budget_holds VALUES ('r1', 'alpha', 'CNY', '2026-11-02', 0.5, 'w1'), "
        "('r2', 'alpha', 'CNY', '2026-11-02', 0.5, 'w1')",
        database,
    )
    pg.write([], [record(book, "r1", PEAK, "alpha")])
    assert postgres.psql("SELECT request_id FROM budget_holds", database) == "r2"


def test_a_dead_owners_calls_end_and_its_holds_go_and_no_one_elses(
    ledgers: tuple[SQLiteLedger, PostgresLedger], book: PriceBook, postgres: Postgres
) -> None:
    _, pg = ledgers
    database = pg.url.rsplit("/", 1)[1]
    call = record(book, "r1", PEAK, "alpha")
    pg.write([UsageRecord.in_flight(call, call.started_at, book.digest)], [])  # owner w1
    postgres.psql(
        "INSERT INTO budget_holds VALUES ('r1', 'alpha', 'CNY', '2026-11-02', 0.5, 'w1'), "
        "('r9', 'alpha', 'CNY', '2026-11-02', 0.5, 'w2')",
        database,
    )
    assert pg.release_owner("w2") == (0, 1)
    assert pg.release_owner("w1") == (1, 1)
    assert pg.release_owner("w1") == (0, 0)
    assert stored(postgres, pg) == ["r1|final|interrupted|w1"]
    assert postgres.psql("SELECT count(*) FROM budget_holds", database) == "0"


def test_a_password_never_shows() -> None:
    assert shown_url("postgresql://proxy:s3cret@db.internal:5432/ledger") == (
        "postgresql://proxy:***@db.internal:5432/ledger"
    )
    assert shown_url("postgresql://proxy@127.0.0.1/ledger") == "postgresql://proxy@127.0.0.1/ledger"
