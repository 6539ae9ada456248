"""The ledger: exact, idempotent, durable within the stated window, nothing lost on SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from proxy.attribution import NO_TAGS
from proxy.config import Limits
from proxy.ledger.connection import connect
from proxy.ledger.rows import COLUMNS, RECORD_COLUMNS, stored_record
from proxy.ledger.schema import SCHEMA_VERSION, SchemaTooNew
from proxy.ledger.store import SQLiteLedger, release_owner
from proxy.ledger.writer import LedgerWriter
from proxy.metering import CallMeter, build_record
from proxy.pricing import PriceBook, Pricer
from proxy.records import FIELDS, UsageRecord
from proxy.relay.request import new_request_id
from proxy.usage import parse_usage
from tests.support.calls import call_meter
from tests.support.requests import USAGE

SHANGHAI = ZoneInfo("Asia/Shanghai")

LOOSE = Limits()  # bounds far above these records' usage: nothing is cut


def meter(request_id: str, instant: datetime, team: str = "alpha") -> CallMeter:
    return call_meter(request_id, team=team, started_at=instant, upstream_status=200)


def final(book: PriceBook, request_id: str, instant: datetime, team: str = "alpha") -> UsageRecord:
    m = meter(request_id, instant, team)
    m.reported = parse_usage(USAGE)
    return build_record(m, instant + timedelta(seconds=2), Pricer(book), "request_start", LOOSE)


def in_flight(book: PriceBook, request_id: str, instant: datetime) -> UsageRecord:
    return UsageRecord.in_flight(meter(request_id, instant), instant, book.digest)


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


PEAK = datetime(2026, 11, 2, 1, 30, tzinfo=UTC)


def test_rows_and_costs_are_exact_and_survive_reopening(tmp_path: Path, book: PriceBook) -> None:
    path = tmp_path / "ledger.sqlite3"
    store = SQLiteLedger(path, SHANGHAI)
    store.write([], [final(book, "r1", PEAK), final(book, "r2", PEAK, "beta")])
    store.close()
    store = SQLiteLedger(path, SHANGHAI)
    assert store.interrupted == 0
    assert rows(
        path, "SELECT request_id, currency, amount, cache_savings FROM usage_cost ORDER BY 1, 2"
    ) == [
        ("r1", "CNY", "0.0011456", "0.0012544"),
        ("r1", "USD", "0.00017184", "0.00018816"),
        ("r2", "CNY", "0.0011456", "0.0012544"),
        ("r2", "USD", "0.00017184", "0.00018816"),
    ]
    [(state, outcome, hit, miss, out, started, day)] = rows(
        path,
        "SELECT state, outcome, cache_hit_tokens, cache_miss_tokens, output_tokens, "
        "started_at, billing_day FROM usage WHERE request_id = 'r1'",
    )
    assert (state, outcome, hit, miss, out) == ("final", "complete", 640, 360, 50)
    assert (started, day) == ("2026-11-02T01:30:00.000000Z", "2026-11-02")
    spend = {(r.team, r.currency): r.amount for r in store.spend(PEAK.date(), PEAK.date())}
    assert spend[("alpha", "CNY")] == Decimal("0.0011456")
    store.close()


def test_the_usage_table_has_exactly_the_record_columns_and_the_ledgers_own(
    tmp_path: Path,
) -> None:
    """The ``usage`` DDL is written out (it is what ledgers hold on disk); the columns written
    come from the record's schema. The two must agree, and a new record field needs a
    migration."""
    path = tmp_path / "ledger.sqlite3"
    SQLiteLedger(path, SHANGHAI).close()
    columns = [str(name) for (name,) in rows(path, "SELECT name FROM pragma_table_info('usage')")]
    assert sorted(columns) == sorted(COLUMNS)
    assert set(COLUMNS) - set(RECORD_COLUMNS) == {"state", "billing_day", "owner"}
    assert {f.name for f in FIELDS} - set(RECORD_COLUMNS) == {"costs", "cache_savings"}


def test_a_stored_record_reads_back_equal(tmp_path: Path, book: PriceBook) -> None:
    path = tmp_path / "ledger.sqlite3"
    store = SQLiteLedger(path, SHANGHAI)
    written = [
        dataclasses.replace(final(book, "r1", PEAK), tool_calls={"search": 2}),  # JSON in it
        in_flight(book, "r2", PEAK + timedelta(seconds=1)),
    ]
    store.write(written[1:], written[:1])
    store.close()
    costs: dict[str, dict[str, Decimal]] = {}
    savings: dict[str, dict[str, Decimal]] = {}
    for request_id, currency, amount, saved in rows(path, "SELECT * FROM usage_cost"):
        costs.setdefault(str(request_id), {})[str(currency)] = Decimal(str(amount))
        savings.setdefault(str(request_id), {})[str(currency)] = Decimal(str(saved))
    read = [
        stored_record(values, costs.get(str(values[0]), {}), savings.get(str(values[0]), {}))
        for values in rows(
            path,
            f"SELECT {', '.join(RECORD_COLUMNS)} FROM usage ORDER BY request_id",  # noqa: S608
        )
    ]
    assert read == written


def test_final_rows_are_idempotent(tmp_path: Path, book: PriceBook) -> None:
    path = tmp_path / "ledger.sqlite3"
    store = SQLiteLedger(path, SHANGHAI)
    record = final(book, "r1", PEAK)
    store.write([], [record])
    store.write([], [record])
    store.write([in_flight(book, "r1", PEAK)], [])  # a late in-flight row: ignored
    assert rows(path, "SELECT count(*), state FROM usage") == [(1, "final")]
    [(amount,)] = rows(path, "SELECT amount FROM spend_daily WHERE currency = 'CNY'")
    assert amount == "0.0011456"
    store.close()


def test_in_flight_rows_become_interrupted_on_restart(tmp_path: Path, book: PriceBook) -> None:
    path = tmp_path / "ledger.sqlite3"
    store = SQLiteLedger(path, SHANGHAI)
    store.write(
        [
            in_flight(book, "crashed", PEAK),
            in_flight(book, "finished", PEAK),
        ],
        [],
    )
    store.write([], [final(book, "finished", PEAK)])
    store.close()
    store = SQLiteLedger(path, SHANGHAI)
    assert store.interrupted == 1
    assert rows(
        path, "SELECT request_id, state, outcome, usage_source, priced FROM usage ORDER BY 1"
    ) == [
        ("crashed", "final", "interrupted", "unknown", 0),
        ("finished", "final", "complete", "reported", 1),
    ]
    store.close()


def test_writer_batches_and_close_drains_everything(tmp_path: Path, book: PriceBook) -> None:
    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(SQLiteLedger(path, SHANGHAI), flush_interval=30)
    records = [final(book, f"r{i}", PEAK + timedelta(seconds=i)) for i in range(500)]
    for record in records:
        writer.dispatched(in_flight(book, record.request_id, record.started_at))
        writer.submit(record)
    writer.close()  # long before the 30 s flush interval: close must write everything
    assert rows(path, "SELECT count(*), min(state), max(state) FROM usage") == [
        (500, "final", "final")
    ]
    [(total,)] = rows(path, "SELECT amount FROM spend_daily WHERE currency = 'USD'")
    assert Decimal(total) == 500 * Decimal("0.00017184")


def test_batches_of_every_size_store_every_row_once(tmp_path: Path, book: PriceBook) -> None:
    """Multi-row statements are cut into power-of-two sizes: sizes around those cuts, with
    in-flight rows of calls still running and of calls finishing in the same batch."""
    path = tmp_path / "ledger.sqlite3"
    store = SQLiteLedger(path, SHANGHAI)
    written = 0
    for size in (1, 2, 3, 63, 64, 65, 127, 129, 200):
        ids = [f"s{size}-{i:03d}" for i in range(size)]
        running = [in_flight(book, f"{r}-running", PEAK) for r in ids]
        ending = [in_flight(book, r, PEAK) for r in ids]
        store.write(running + ending, [final(book, r, PEAK) for r in ids])
        written += size
    assert rows(path, "SELECT state, count(*) FROM usage GROUP BY state ORDER BY 1") == [
        ("final", written),
        ("in_flight", written),
    ]
    assert rows(
        path, "SELECT count(*), count(DISTINCT request_id) FROM usage_cost WHERE currency = 'CNY'"
    ) == [(written, written)]
    [(total,)] = rows(path, "SELECT amount FROM spend_daily WHERE currency = 'CNY'")
    assert Decimal(total) == written * Decimal("0.0011456")
    store.close()


def test_in_flight_rows_are_built_from_the_call_only_when_written(
    tmp_path: Path, book: PriceBook
) -> None:
    """The request path hands the writer the call itself; its in-flight record is built in
    the writer's thread, and not at all when the final record is in the same batch."""
    built: list[str] = []

    class Call(CallMeter):
        __slots__ = ()

        def in_flight_record(self) -> UsageRecord:
            built.append(self.request_id)
            return super().in_flight_record()

    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(SQLiteLedger(path, SHANGHAI), flush_interval=30)
    calls = [
        Call(
            request_id=f"c{i}",
            team="alpha",
            key_id="k_00000000",
            endpoint="chat",
            stream=True,
            model_requested="deepseek-flash",
            tags=NO_TAGS,
            end_user=None,
            payload={},
            started_at=PEAK,
            prompt_bound=LOOSE.max_context_tokens,
            output_bound=LOOSE.max_output_tokens,
            price_book=book.digest,
        )
        for i in range(3)
    ]
    for call in calls:
        writer.dispatched(call)
    writer.submit(final(book, "c0", PEAK))
    writer.close()
    assert built == ["c1", "c2"]
    assert rows(path, "SELECT request_id, state, outcome, price_book FROM usage ORDER BY 1") == [
        ("c0", "final", "complete", book.digest),
        ("c1", "in_flight", "in_flight", book.digest),
        ("c2", "in_flight", "in_flight", book.digest),
    ]


def test_billing_timezone_change_rebuilds_days(tmp_path: Path, book: PriceBook) -> None:
    path = tmp_path / "ledger.sqlite3"
    instant = datetime(2026, 11, 1, 20, 0, tzinfo=UTC)  # 2026-11-02 04:00 in Beijing
    store = SQLiteLedger(path, SHANGHAI)
    store.write([], [final(book, "r1", instant)])
    store.close()
    store = SQLiteLedger(path, ZoneInfo("UTC"))
    assert rows(path, "SELECT billing_day FROM usage") == [("2026-11-01",)]
    assert rows(path, "SELECT day, amount FROM spend_daily WHERE currency = 'CNY'") == [
        ("2026-11-01", "0.0005728")
    ]  # off-peak: 04:00 in Beijing
    store.close()


def test_request_ids_are_unique_and_ordered_by_time() -> None:
    """Ids are the ledger's primary key: in time order, a batch's inserts land on the last
    pages of the index instead of all over it (see `new_request_id`)."""
    first = [new_request_id() for _ in range(1000)]
    deadline = time.monotonic() + 5
    while time.time_ns() // 1_000_000 == int(first[-1][:12], 16):  # the next millisecond
        assert time.monotonic() < deadline
    later = new_request_id()
    assert all(len(r) == 32 and int(r, 16) >= 0 for r in first)
    assert len(set(first)) == 1000
    assert all(r < later for r in first)
    assert abs(int(later[:12], 16) - time.time_ns() // 1_000_000) < 5000


def test_releasing_an_owner_ends_only_its_calls_and_holds(tmp_path: Path, book: PriceBook) -> None:
    """What a dead worker leaves (`release_owner`): its in-flight rows end as ``interrupted``
    and its budget holds go, in one transaction; another worker's calls and holds stay."""
    path = tmp_path / "ledger.sqlite3"
    dead = SQLiteLedger(path, SHANGHAI, owner="host:1:w0:aa")
    alive = SQLiteLedger(path, SHANGHAI, owner="host:1:w1:bb", recover=False)
    dead.write([in_flight(book, r, PEAK) for r in ("d1", "d2", "d3")], [])
    dead.write([], [final(book, "d3", PEAK)])
    alive.write([in_flight(book, "a1", PEAK)], [])
    with contextlib.closing(connect(path)) as conn:
        conn.executemany(
            "INSERT INTO budget_holds (request_id, team, currency, day, amount, "
            "owner) VALUES (?, 'alpha', 'CNY', '2026-11-02', '0.1', ?)",
            [("d1", "host:1:w0:aa"), ("a1", "host:1:w1:bb")],
        )
        assert release_owner(conn, "host:1:w0:aa") == (2, 1)
    assert rows(path, "SELECT request_id, state, outcome, owner FROM usage ORDER BY 1") == [
        ("a1", "in_flight", "in_flight", "host:1:w1:bb"),
        ("d1", "final", "interrupted", "host:1:w0:aa"),
        ("d2", "final", "interrupted", "host:1:w0:aa"),
        ("d3", "final", "complete", "host:1:w0:aa"),
    ]
    assert rows(path, "SELECT request_id FROM budget_holds") == [("a1",)]
    dead.close()
    alive.close()


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE usage (
    request_id TEXT PRIMARY KEY, state TEXT NOT NULL, team TEXT NOT NULL, key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL, stream INTEGER NOT NULL, model_requested TEXT NOT NULL,
    model_served TEXT, started_at TEXT NOT NULL, billing_day TEXT NOT NULL, first_byte_at TEXT,
    ended_at TEXT NOT NULL, cache_hit_tokens INTEGER, cache_miss_tokens INTEGER,
    output_tokens INTEGER, reasoning_tokens INTEGER, prompt_tokens INTEGER,
    tool_calls TEXT NOT NULL, upstream_status INTEGER, upstream_trace_id TEXT,
    outcome TEXT NOT NULL, usage_source TEXT NOT NULL, priced INTEGER NOT NULL,
    unpriced_reason TEXT, billed_model TEXT, price_version TEXT, schedule_version TEXT,
    tier TEXT, priced_at TEXT, price_book TEXT NOT NULL, flags TEXT NOT NULL);
CREATE INDEX usage_started ON usage (started_at);
CREATE INDEX usage_team_day ON usage (team, billing_day);
CREATE TABLE usage_cost (
    request_id TEXT NOT NULL REFERENCES usage (request_id), currency TEXT NOT NULL,
    amount TEXT NOT NULL, cache_savings TEXT NOT NULL, PRIMARY KEY (request_id, currency));
CREATE TABLE cost_history (
    request_id TEXT NOT NULL, currency TEXT NOT NULL, amount TEXT, price_book TEXT NOT NULL,
    price_version TEXT, replaced_at TEXT NOT NULL, replaced_by_book TEXT NOT NULL);
CREATE TABLE budget_holds (
    request_id TEXT NOT NULL, team TEXT NOT NULL, currency TEXT NOT NULL, day TEXT NOT NULL,
    amount TEXT NOT NULL, PRIMARY KEY (request_id, currency));
CREATE INDEX budget_holds_team ON budget_holds (team, currency, day);
CREATE TABLE spend_daily (
    team TEXT NOT NULL, day TEXT NOT NULL, currency TEXT NOT NULL, amount TEXT NOT NULL,
    PRIMARY KEY (team, day, currency));
INSERT INTO meta VALUES ('schema_version', '1'), ('billing_timezone', 'Asia/Shanghai');
INSERT INTO usage VALUES
    ('old-final', 'final', 'alpha', 'k_00000001', 'chat', 1, 'deepseek-chat', 'deepseek-chat',
     '2026-10-02T01:30:00.000000Z', '2026-10-02', '2026-10-02T01:30:00.400000Z',
     '2026-10-02T01:30:02.000000Z', 640, 360, 50, 0, 1000, '{}', 200, 'trace-1', 'complete',
     'reported', 1, NULL, 'deepseek-chat', 'v3', 's1', 'peak',
     '2026-10-02T01:30:00.000000Z', 'digest-1', '[]'),
    ('old-running', 'in_flight', 'beta', 'k_00000002', 'fim', 0, 'deepseek-chat', NULL,
     '2026-10-02T02:00:00.000000Z', '2026-10-02', NULL, '2026-10-02T02:00:00.000000Z',
     NULL, NULL, NULL, NULL, NULL, '{}', NULL, NULL, 'in_flight', 'unknown', 0, NULL, NULL,
     NULL, NULL, NULL, NULL, 'digest-1', '[]');
INSERT INTO usage_cost VALUES ('old-final', 'CNY', '0.0011456', '0.0012544'),
    ('old-final', 'USD', '0.00017184', '0.00018816');
INSERT INTO cost_history VALUES ('old-final', 'CNY', '0.002', 'digest-0', 'v2',
    '2026-10-03T00:00:00Z', 'digest-1');
INSERT INTO budget_holds VALUES ('old-running', 'beta', 'CNY', '2026-10-02', '0.5');
INSERT INTO spend_daily VALUES ('alpha', '2026-10-02', 'CNY', '0.0011456'),
    ('alpha', '2026-10-02', 'USD', '0.00017184');
"""
TABLES = ("usage", "usage_cost", "cost_history", "budget_holds", "spend_daily")


def schema(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every table's columns and every index's definition, as SQLite describes them."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        shape: dict[str, list[tuple[object, ...]]] = {
            table: conn.execute(
                'SELECT name, type, "notnull", dflt_value, pk FROM pragma_table_info(?)', (table,)
            ).fetchall()
            for table in tables
        }
        shape["indexes"] = conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' "
            "AND sql IS NOT NULL ORDER BY name"
        ).fetchall()
    return shape


def test_a_version_1_ledger_is_migrated_in_place_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(V1_SCHEMA)
    before = {
        table: rows(path, f"SELECT * FROM {table} ORDER BY 1, 2")  # noqa: S608
        for table in TABLES
    }
    store = SQLiteLedger(path, SHANGHAI, recover=False, owner="host:1:aa")
    store.close()
    after = {
        table: rows(path, f"SELECT * FROM {table} ORDER BY 1, 2")  # noqa: S608
        for table in TABLES
    }
    # Rows from before the migration have no owner (v2), no client status (v3), no tags and
    # no end user (v4); only a start-up recovery ends them.
    added = {"usage": (None, None, "{}", None), "budget_holds": (None,)}
    assert after == {
        table: [(*row, *added.get(table, ())) for row in table_rows]
        for table, table_rows in before.items()
    }
    assert rows(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    SQLiteLedger(tmp_path / "new.sqlite3", SHANGHAI).close()
    assert schema(path) == schema(tmp_path / "new.sqlite3")  # the same as a new ledger's


def test_a_ledger_newer_than_the_proxy_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    SQLiteLedger(path, SHANGHAI).close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    with pytest.raises(SchemaTooNew) as refused:
        SQLiteLedger(path, SHANGHAI)
    assert str(refused.value) == (
        f"{path} has ledger schema version {SCHEMA_VERSION + 1}, newer than this proxy knows "
        f"({SCHEMA_VERSION}): run the proxy version that wrote it, or a newer one"
    )
    assert rows(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION + 1),)
    ]  # left as it was
