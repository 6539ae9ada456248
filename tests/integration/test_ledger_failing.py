"""The ledger failing is loud and bounded, never a hang (issue 11, item 8).

A real `SQLiteLedger` that SQLite refuses to grow (`tests.support.ledger_faults`), or whose file is
deleted, behind the real `LedgerWriter`, and for the request path the real app: hard-budget
teams fail closed, the others are served while the bounded queue has room, the metrics say so,
nothing is dropped, and `close` gives up after its timeout with every record in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import time
import weakref
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from proxy.attribution import NO_TAGS
from proxy.config import Budget
from proxy.ledger.store import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.metering import CallMeter
from proxy.pricing import PriceBook
from proxy.records import UsageRecord
from proxy.relay.request import new_request_id
from tests.support.calls import call_meter
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import Reply
from tests.support.ledger_faults import fill_to_the_limit, lift_the_limit, record
from tests.support.proxy_harness import PEAK, running_proxy
from tests.support.requests import BOUNDED_CALL_COST, BOUNDED_CHAT, BOUNDED_USAGE, auth

SHANGHAI = ZoneInfo("Asia/Shanghai")
MONTH = Budget("alpha", "month", Decimal("0.01"), "CNY", (), True)
DEADLINE = 10.0


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE} s: {what}"
        time.sleep(0.01)  # polling the writer's state, bounded by the deadline


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE} s: {what}"
        await asyncio.sleep(0.01)  # polling the app's state, bounded by the deadline


def meter(request_id: str, team: str = "beta") -> CallMeter:
    return call_meter(request_id, team=team, price_book="digest")


def cost(records: list[UsageRecord]) -> Decimal:
    return sum((r.costs["CNY"] for r in records), Decimal(0))


def full_ledger(path: Path, book: PriceBook) -> tuple[SQLiteLedger, list[UsageRecord]]:
    store = SQLiteLedger(path, SHANGHAI)
    return store, fill_to_the_limit(store, book, "beta", PEAK)


def test_failed_writes_are_held_and_committed_once_when_the_ledger_recovers(
    tmp_path: Path, book: PriceBook
) -> None:
    path = tmp_path / "ledger.sqlite3"
    store, fillers = full_ledger(path, book)
    writer = LedgerWriter(store, flush_interval=0.01)
    try:
        ended = [record(book, new_request_id(), PEAK, "beta") for _ in range(5)]
        running = meter(new_request_id())
        writer.dispatched(running)
        for one in ended:
            writer.dispatched(meter(one.request_id))
            writer.submit(one)
        wait_until(lambda: not writer.committing(), "the first write fails")
        status = writer.status()
        assert (status.waiting, status.capacity) == (6, 50_000)  # five finals, one in flight
        assert status.write_errors >= 1
        lift_the_limit(store)
        assert writer.flush(DEADLINE)
        assert writer.committing()
        assert writer.status().waiting == 0
    finally:
        assert writer.close() == []
    assert rows(
        path,
        "SELECT request_id, state, outcome FROM usage WHERE request_id NOT LIKE "
        "'00-filler-%' ORDER BY 1",
    ) == sorted(
        [(r.request_id, "final", "complete") for r in ended]
        + [(running.request_id, "in_flight", "in_flight")]
    )
    [(spend,)] = rows(
        path, "SELECT amount FROM spend_daily WHERE team = 'beta' AND currency = 'CNY'"
    )
    assert Decimal(str(spend)) == cost(fillers) + 5 * BOUNDED_CALL_COST


def test_a_dispatched_call_is_not_kept_while_the_ledger_fails(
    tmp_path: Path, book: PriceBook
) -> None:
    """A call's meter holds its whole request; waiting for the ledger, only its small
    in-flight record may stay."""

    class Call(CallMeter):  # without __slots__, so that it can be weakly referenced
        pass

    store, _ = full_ledger(tmp_path / "ledger.sqlite3", book)
    writer = LedgerWriter(store, flush_interval=0.01)
    try:
        writer.submit(record(book, new_request_id(), PEAK, "beta"))
        wait_until(lambda: not writer.committing(), "the first write fails")
        call = Call(
            request_id=new_request_id(),
            team="beta",
            key_id="k_00000000",
            endpoint="chat",
            stream=False,
            model_requested="deepseek-flash",
            tags=NO_TAGS,
            end_user=None,
            payload={"messages": [{"role": "user", "content": "x" * 1_000_000}]},
            started_at=PEAK,
            prompt_bound=1 << 20,
            output_bound=1 << 16,
            price_book=book.digest,
        )
        gone = weakref.ref(call)
        writer.dispatched(call)
        del call

        def released() -> bool:
            gc.collect()
            return gone() is None

        wait_until(released, "the writer lets go of the call's meter")
        assert writer.status().waiting == 2
        assert not writer.committing()
    finally:
        left = writer.close(0.1)
    assert sorted(r.outcome for r in left) == ["complete", "in_flight"]


def test_close_gives_up_after_its_timeout_and_returns_every_record(
    tmp_path: Path, book: PriceBook
) -> None:
    store, _ = full_ledger(tmp_path / "ledger.sqlite3", book)
    writer = LedgerWriter(store, flush_interval=0.01)
    ended = [record(book, new_request_id(), PEAK, "beta") for _ in range(3)]
    running = meter(new_request_id())
    writer.dispatched(running)
    for one in ended:
        writer.submit(one)
    wait_until(lambda: not writer.committing(), "the first write fails")
    started = time.monotonic()
    left = writer.close(0.5)
    took = time.monotonic() - started
    assert 0.5 <= took < 1.5
    assert {r.request_id: r for r in left} == {
        **{r.request_id: r for r in ended},
        running.request_id: running.in_flight_record(),
    }
    assert writer.close(0.5) == []  # closed once


def test_a_deleted_ledger_file_is_copied_and_never_written_or_recreated(
    tmp_path: Path, book: PriceBook
) -> None:
    path = tmp_path / "ledger.sqlite3"
    writer = LedgerWriter(SQLiteLedger(path, SHANGHAI), flush_interval=0.01)
    before = [record(book, new_request_id(), PEAK, "beta") for _ in range(3)]
    try:
        for one in before:
            writer.submit(one)
        assert writer.flush(DEADLINE)
        path.unlink()
        wait_until(lambda: not writer.committing(), "the deletion is noticed")
        wait_until(
            lambda: len(list(tmp_path.glob("ledger.sqlite3.recovered-*"))) == 1, "a copy is saved"
        )
        [copy] = tmp_path.glob("ledger.sqlite3.recovered-*")
        after = [record(book, new_request_id(), PEAK, "beta") for _ in range(2)]
        for one in after:
            writer.submit(one)
        wait_until(lambda: writer.status().waiting == 2, "the writer holds the later records")
        assert not path.exists()
    finally:
        started = time.monotonic()
        left = writer.close(30)
    assert time.monotonic() - started < 2  # nothing can be written: no point in waiting
    assert sorted(r.request_id for r in left) == sorted(r.request_id for r in after)
    assert rows(copy, "SELECT request_id, state FROM usage ORDER BY 1") == sorted(
        (r.request_id, "final") for r in before
    )
    assert sorted(
        p.name for p in tmp_path.iterdir() if not p.name.startswith("ledger.sqlite3-")
    ) == [copy.name]  # no database made at the old path


async def test_a_ledger_that_cannot_commit_fails_closed_for_hard_budgets_only(
    fake: FakeDeepSeek, book: PriceBook, tmp_path: Path
) -> None:
    """The policy end to end, through the real app: alpha has a hard budget, beta none; the
    queue holds four records."""
    path = tmp_path / "ledger.sqlite3"
    store, fillers = full_ledger(path, book)
    writer = LedgerWriter(store, flush_interval=0.01, max_queued_records=4)
    fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(8)])
    served: list[str] = []
    try:
        async with (
            running_proxy(
                fake.base_url, book, sink=writer, ledger=writer, budgets=(MONTH,), spend=store.spend
            ) as proxy,
            httpx.AsyncClient(base_url=proxy.url) as http,
        ):

            def sample(name: str) -> float | None:
                return proxy.registry.get_sample_value(name)

            async def call(team: str) -> httpx.Response:
                response = await http.post(
                    "/chat/completions", json=BOUNDED_CHAT, headers=auth(team)
                )
                if response.status_code == 200:
                    served.append(response.headers["x-request-id"])
                return response

            assert sample("llm_ledger_committing") == 1
            assert sample("llm_ledger_max_queued_records") == 4
            assert (await call("beta")).status_code == 200
            await eventually(lambda: sample("llm_ledger_committing") == 0, "metric flips to 0")
            errors = sample("llm_ledger_write_errors_total")
            assert errors is not None and errors >= 1
            stamp = sample("llm_ledger_last_commit_timestamp_seconds")
            assert stamp is not None and stamp <= time.time()

            refused = await call("alpha")  # fail closed: its spend would not count
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "5"
            assert refused.json()["error"]["code"] == "ledger_unavailable"
            assert "team 'alpha', which has a hard budget" in refused.json()["error"]["message"]
            assert len(fake.requests) == 1

            # beta is served while the queue has room: four records, then every call refused.
            while (response := await call("beta")).status_code == 200:
                await eventually(
                    lambda: writer.status().waiting == len(served), "the writer holds the record"
                )
            assert len(served) == 4
            assert response.status_code == 503
            assert "fill its queue" in response.json()["error"]["message"]
            assert (await call("alpha")).status_code == 503
            assert sample("llm_ledger_queued_records") == 4
            assert len(fake.requests) == 4
            assert sample("llm_ledger_last_commit_timestamp_seconds") == stamp

            lift_the_limit(store)
            await eventually(
                lambda: (
                    sample("llm_ledger_committing") == 1
                    and sample("llm_ledger_queued_records") == 0
                ),
                "committed",
            )
            last = sample("llm_ledger_last_commit_timestamp_seconds")
            assert last is not None and last > stamp
            assert (await call("alpha")).status_code == 200
            assert (await call("beta")).status_code == 200
    finally:
        assert writer.close(DEADLINE) == []
    assert len(served) == 6
    assert rows(
        path,
        "SELECT request_id, state, outcome FROM usage WHERE request_id NOT LIKE "
        "'00-filler-%' ORDER BY 1",
    ) == sorted((request_id, "final", "complete") for request_id in served)
    spend = dict(rows(path, "SELECT team, amount FROM spend_daily WHERE currency = 'CNY'"))
    assert {team: Decimal(str(amount)) for team, amount in spend.items()} == {
        "alpha": Decimal("0.00036"),
        "beta": cost(fillers) + 5 * BOUNDED_CALL_COST,
    }
