"""Proving the bill end to end (issue 17): the real proxy on loopback, the real ledger (SQLite
and PostgreSQL), and the fake DeepSeek's account, whose balance falls by exactly what it
charges each call at DeepSeek's published rates (`tests.support.fake_account`, computed apart
from the proxy's price book).

The poller is driven by the test (`BalancePoller.poll_once`), the clock is the test's own, and
the ledger is flushed before each poll, so every figure is exact: honest traffic drifts by
exactly 0, an overcharged call by exactly the overcharge, calls made around the proxy by
exactly their charge; top-ups and grants are recognized and the granted balance is spent
first. The metrics and ``report reconcile`` agree to the last decimal.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from proxy.app import POLLER
from proxy.config import Timeouts
from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook
from proxy.reconcile.book import poller as lease_holder
from proxy.reconcile.live import LiveBook, SQLiteSource, Unreadable
from proxy.reconcile.poller import BalancePoller, Polled
from proxy.upstream import AiohttpTransport, Upstream
from tests.conftest import SHIPPED_BOOK
from tests.support.exposition import series
from tests.support.fake_account import FakeAccount
from tests.support.fake_clients import UPSTREAM_AUTH, chat
from tests.support.fake_deepseek import FakeDeepSeek, running_fake
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY
from tests.support.ledger_backends import BEIJING, LedgerBackend, check_ledger
from tests.support.ledger_rows import run, write_config
from tests.support.proxy_harness import PEAK, TEAM_KEYS, RunningProxy, running_proxy
from tests.support.serve_process import (
    eventually,
    ledger,
    serve_process,
    worker_owner,
    worker_pids,
)

CNY = (("currency", "CNY"),)


class Clock:
    """The proxy's clock, moved by the test: calls and polls happen at instants it chooses
    (all in DeepSeek's peak hours on a Monday, the tier the fake account charges)."""

    def __init__(self) -> None:
        self.now = PEAK

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 60) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Reconciling:
    proxy: RunningProxy
    fake: FakeDeepSeek
    account: FakeAccount
    backend: LedgerBackend
    clock: Clock
    config: Path
    capsys: pytest.CaptureFixture[str]

    async def poll(self) -> None:
        """The ledger holds every call made so far; then, a minute later, one poll."""
        assert self.backend.writer.flush(10)
        self.clock.advance()
        assert await self.proxy.app[POLLER].poll_once() is Polled.STORED
        self.clock.advance()

    async def calls(self, count: int) -> None:
        """`count` calls of team alpha through the proxy, every other one streamed."""
        async with openai.AsyncOpenAI(
            base_url=self.proxy.url, api_key=TEAM_KEYS["alpha"], max_retries=0
        ) as sdk:
            for index in range(count):
                body = chat()
                if index % 2:
                    stream = await sdk.chat.completions.create(**body, stream=True)
                    async for _ in stream:
                        pass
                else:
                    await sdk.chat.completions.create(**body)

    async def bypass(self) -> Decimal:
        """One call straight to DeepSeek with the company key: the proxy never sees it."""
        async with httpx.AsyncClient(base_url=self.fake.base_url, headers=UPSTREAM_AUTH) as http:
            response = await http.post("/chat/completions", json=chat())
        assert response.status_code == 200
        return self.account.charges[-1]

    async def metrics(self) -> bytes:
        async with httpx.AsyncClient() as http:
            return (await http.get(self.proxy.url + "/metrics")).content

    async def report(self, *args: str) -> dict[str, Any]:
        """``report reconcile`` in JSON, in a thread (the PostgreSQL ledger's command runs a
        loop of its own)."""
        code, out, err = await asyncio.to_thread(
            run,
            self.capsys,
            "report",
            "reconcile",
            "--config",
            str(self.config),
            "--format",
            "json",
            *args,
        )
        assert (code, err) == (0, "")
        result: dict[str, Any] = json.loads(out)
        return result


@pytest.fixture
async def reconciling(
    fake: FakeDeepSeek,
    book: PriceBook,
    ledger_backend: LedgerBackend,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> AsyncIterator[Reconciling]:
    """The proxy on `ledger_backend` with a balance poller, in front of a fake DeepSeek whose
    account holds 1 CNY granted and 100 CNY topped up."""
    account = fake.account = FakeAccount.opened(granted="1.00", topped_up="100.00")
    clock = Clock()
    config = write_config(
        tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"), url=ledger_backend.url
    )
    balance = ledger_backend.live_book()
    try:
        async with running_proxy(
            fake.base_url, book, clock=clock, balance=balance, **ledger_backend.options()
        ) as proxy:
            yield Reconciling(proxy, fake, account, ledger_backend, clock, config, capsys)
        check_ledger(ledger_backend, proxy.sink.records)
    finally:
        balance.close()


def last_window(report: dict[str, Any]) -> dict[str, Any]:
    windows: list[dict[str, Any]] = report["windows"]
    return windows[-1]


async def test_honest_traffic_drifts_by_exactly_nothing(reconciling: Reconciling) -> None:
    await reconciling.poll()
    await reconciling.calls(4)
    await reconciling.poll()
    charged = sum(reconciling.account.charges, Decimal(0))
    assert len(reconciling.account.charges) == 4 and charged > 0
    window = last_window(await reconciling.report())
    assert (window["spend"], window["ledger_cost"], window["drift"]) == (
        str(charged),
        str(charged),
        "0",
    )
    assert (window["balance_before"], window["balance_after"]) == ("101", str(101 - charged))
    text = await reconciling.metrics()
    assert series(text, "llm_deepseek_bill_drift") == {CNY: 0.0}
    assert series(text, "llm_deepseek_bill_drift_ratio") == {CNY: 0.0}
    assert series(text, "llm_deepseek_bill_drift_running") == {CNY: 0.0}
    assert series(text, "llm_deepseek_bill_ledger_cost_running") == {CNY: float(charged)}
    wallet = reconciling.account.wallets["CNY"]
    assert series(text, "llm_deepseek_balance") == {
        (("currency", "CNY"), ("kind", "total")): float(wallet.granted + wallet.topped_up),
        (("currency", "CNY"), ("kind", "granted")): float(wallet.granted),
        (("currency", "CNY"), ("kind", "topped_up")): float(wallet.topped_up),
    }
    last_poll = reconciling.clock.now - timedelta(seconds=60)
    assert series(text, "llm_deepseek_balance_last_poll_timestamp_seconds") == {
        (): last_poll.timestamp()
    }


async def test_honest_traffic_in_every_format_drifts_by_exactly_nothing(
    reconciling: Reconciling,
) -> None:
    """Anthropic Messages (a claude name, streamed and not; DeepSeek bills it as
    deepseek-flash) and the Responses API, charged by the fake from each format's own usage:
    the ledger explains the balance to the last decimal."""
    await reconciling.poll()
    messages: list[Any] = [{"role": "user", "content": "Say hello " * 40}]
    async with anthropic.AsyncAnthropic(
        base_url=reconciling.proxy.url + "/anthropic", api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as claude:
        await claude.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=messages)
        async with claude.messages.stream(
            model="deepseek-v4-pro", max_tokens=64, messages=messages
        ) as stream:
            await stream.get_final_message()
    async with openai.AsyncOpenAI(
        base_url=reconciling.proxy.url, api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as sdk:
        await sdk.responses.create(model="deepseek-flash", input="Say hello " * 40)
        events = await sdk.responses.create(
            model="deepseek-v4-pro", input="Say hello " * 40, stream=True
        )
        async for _ in events:
            pass
    await reconciling.poll()
    charged = sum(reconciling.account.charges, Decimal(0))
    assert len(reconciling.account.charges) == 4 and charged > 0
    window = last_window(await reconciling.report())
    assert (window["spend"], window["ledger_cost"], window["drift"]) == (
        str(charged),
        str(charged),
        "0",
    )
    assert series(await reconciling.metrics(), "llm_deepseek_bill_drift") == {CNY: 0.0}


async def test_an_overcharged_call_drifts_by_exactly_the_overcharge(
    reconciling: Reconciling,
) -> None:
    await reconciling.poll()
    await reconciling.calls(1)
    reconciling.account.overcharge_next("0.25")
    await reconciling.calls(2)
    await reconciling.poll()
    window = last_window(await reconciling.report())
    cost = Decimal(window["ledger_cost"])
    assert Decimal(window["drift"]) == Decimal("0.25")
    assert Decimal(window["spend"]) == sum(reconciling.account.charges, Decimal(0))
    assert Decimal(window["drift_ratio"]) == (Decimal("0.25") / cost).quantize(Decimal("1e-6"))
    text = await reconciling.metrics()
    assert series(text, "llm_deepseek_bill_drift") == {CNY: float(Decimal(window["drift"]))}
    assert series(text, "llm_deepseek_bill_drift_ratio") == {CNY: float(Decimal("0.25") / cost)}


async def test_calls_around_the_proxy_drift_by_exactly_their_charge(
    reconciling: Reconciling,
) -> None:
    await reconciling.poll()
    await reconciling.calls(2)
    unseen = await reconciling.bypass() + await reconciling.bypass()
    await reconciling.poll()
    window = last_window(await reconciling.report())
    assert Decimal(window["drift"]) == unseen
    text = await reconciling.metrics()
    assert series(text, "llm_deepseek_bill_drift") == {CNY: float(unseen)}


async def test_top_ups_and_grants_are_not_spend_and_granted_is_spent_first(
    reconciling: Reconciling,
) -> None:
    account = reconciling.account
    account.wallets["CNY"].granted = Decimal("0.0005")  # about one call's worth
    await reconciling.poll()
    account.top_up("50")  # while granted lasts, the topped-up balance only rises
    await reconciling.calls(1)
    await reconciling.poll()
    await reconciling.calls(2)  # the granted balance runs out: the rest from topped-up
    await reconciling.poll()
    account.grant("5")
    await reconciling.poll()
    report = await reconciling.report()
    first, second, third = report["windows"]
    charges = account.charges
    assert (first["top_ups"], first["grants"], first["spend"], first["drift"]) == (
        "50",
        "0",
        str(charges[0]),
        "0",
    )
    assert (second["top_ups"], second["spend"], second["drift"]) == (
        "0",
        str(charges[1] + charges[2]),
        "0",
    )
    assert (third["grants"], third["spend"], third["ledger_cost"], third["drift"]) == (
        "5",
        "0",
        "0",
        "0",
    )
    assert third["drift_ratio"] is None  # no ledger cost to compare with
    [total] = report["total"]
    assert (total["top_ups"], total["grants"], total["drift"]) == ("50", "5", "0")
    text = await reconciling.metrics()
    assert series(text, "llm_deepseek_bill_drift") == {CNY: 0.0}
    assert series(text, "llm_deepseek_bill_drift_ratio") == {}
    assert series(text, "llm_deepseek_bill_drift_running") == {CNY: 0.0}


async def test_a_top_up_of_a_paid_account_is_never_a_false_drift(
    reconciling: Reconciling,
) -> None:
    """No granted balance (a paid account): calls and a top-up in one window leave the
    topped-up balance risen by the top-up less the calls. The window's charges are taken as
    the ledger says and the top-up is the 50 it was, so the drift is exactly 0. The price: an
    overcharge in such a window cannot be told from a smaller top-up (19.75 for 20), so that
    window is not judged; the windows around it are."""
    account = reconciling.account
    account.wallets["CNY"].granted = Decimal(0)
    await reconciling.poll()
    await reconciling.calls(2)
    account.top_up("50")
    await reconciling.poll()
    account.overcharge_next("0.25")
    await reconciling.calls(1)
    account.top_up("20")
    await reconciling.poll()
    first, second = (await reconciling.report())["windows"]
    charges = account.charges
    assert (first["top_ups"], first["spend"], first["ledger_cost"], first["drift"]) == (
        "50",
        str(charges[0] + charges[1]),
        str(charges[0] + charges[1]),
        "0",
    )
    assert (second["top_ups"], second["drift"]) == ("19.75", "0")
    text = await reconciling.metrics()
    assert series(text, "llm_deepseek_bill_drift_running") == {CNY: 0.0}


async def test_the_running_drift_is_the_reports_total(reconciling: Reconciling) -> None:
    """Five windows: the first settled by later polls, the newest live; the metrics' running
    sums equal the report's totals, and ``--since`` takes the windows that ended from it."""
    await reconciling.poll()
    await reconciling.calls(2)
    await reconciling.poll()
    reconciling.account.overcharge_next("0.125")
    await reconciling.calls(1)
    await reconciling.poll()
    since = reconciling.clock.now
    unseen = await reconciling.bypass()
    await reconciling.poll()
    await reconciling.calls(1)
    await reconciling.poll()
    report = await reconciling.report()
    assert [w["drift"] for w in report["windows"]] == ["0", "0.125", str(unseen), "0"]
    [total] = report["total"]
    assert Decimal(total["drift"]) == Decimal("0.125") + unseen
    text = await reconciling.metrics()
    assert series(text, "llm_deepseek_bill_drift_running") == {CNY: float(Decimal(total["drift"]))}
    assert series(text, "llm_deepseek_bill_ledger_cost_running") == {
        CNY: float(Decimal(total["ledger_cost"]))
    }
    later = await reconciling.report("--since", since.isoformat())
    assert [w["drift"] for w in later["windows"]] == [str(unseen), "0"]


async def test_a_failed_poll_is_counted_and_calls_go_on(reconciling: Reconciling) -> None:
    poller = reconciling.proxy.app[POLLER]
    reconciling.fake.balance_status = 500
    assert await poller.poll_once() is Polled.FAILED
    reconciling.fake.balance_status = 200
    reconciling.fake.balance_body = b'{"is_available": true, "balance_infos": "none"}'
    assert await poller.poll_once() is Polled.FAILED
    await reconciling.calls(1)
    reconciling.fake.balance_body = None
    await reconciling.poll()
    text = await reconciling.metrics()
    failures = series(text, "llm_deepseek_balance_poll_failures_total")
    assert failures == {
        (("reason", reason),): count
        for reason, count in (
            ("unreachable", 0.0),
            ("http_error", 1.0),
            ("bad_answer", 1.0),
            ("ledger", 0.0),
            ("clock", 0.0),
            ("internal", 0.0),
        )
    }
    assert series(text, "llm_deepseek_balance") != {}


async def test_one_process_polls_and_a_dead_pollers_lease_runs_out(
    fake: FakeDeepSeek, ledger_backend: LedgerBackend
) -> None:
    """Two processes sharing the ledger (workers or replicas): one polls, the other stands by
    without asking DeepSeek; claiming at once, exactly one wins; when the poller stops
    renewing (it died), the other takes over once the lease has run out; a clean stop hands
    the lease over at once."""
    fake.account = FakeAccount.opened(granted="0", topped_up="10")
    clock = Clock()
    upstream = Upstream(fake.base_url, FAKE_UPSTREAM_KEY, AiohttpTransport(Timeouts()))
    books = [ledger_backend.live_book(), ledger_backend.live_book()]
    failures: list[str] = []
    first, second = (
        BalancePoller(book, lambda: upstream, clock, owner, 60.0, failures.append)
        for book, owner in zip(books, ("worker-1", "worker-2"), strict=True)
    )
    try:
        results = await asyncio.gather(first.poll_once(), second.poll_once())
        assert sorted(r.value for r in results) == ["standby", "stored"]
        holder, other = (first, second) if results[0] is Polled.STORED else (second, first)
        clock.advance(60)
        assert await other.poll_once() is Polled.STANDBY
        assert await holder.poll_once() is Polled.STORED  # renewed: until 3 minutes on
        clock.advance(180)
        assert await other.poll_once() is Polled.STANDBY  # the lease ends only now
        clock.advance(1)
        assert await other.poll_once() is Polled.STORED  # the holder died: taken over
        assert await holder.poll_once() is Polled.STANDBY
        await other.leave()
        clock.advance(1)
        assert await holder.poll_once() is Polled.STORED
        polls = [r for r in fake.requests if r.path == "/user/balance"]
        assert len(polls) == 4 and failures == []
        lease = await books[0].run(lease_holder)
        assert lease == (holder.owner, clock.now + timedelta(seconds=180))
    finally:
        await upstream.close()
        for book in books:
            book.close()


async def test_a_holder_that_cannot_read_the_balance_gives_the_lease_up(
    fake: FakeDeepSeek, ledger_backend: LedgerBackend
) -> None:
    """A replica left with an old key gets 401 from DeepSeek: it gives the lease up at once,
    so the replica that can read the balance polls at its next turn instead of standing by
    behind a lease renewed forever."""
    fake.account = FakeAccount.opened(granted="0", topped_up="10")
    clock = Clock()
    stale = Upstream(fake.base_url, "sk-fake-rotated-away-0000", AiohttpTransport(Timeouts()))
    good = Upstream(fake.base_url, FAKE_UPSTREAM_KEY, AiohttpTransport(Timeouts()))
    books = [ledger_backend.live_book(), ledger_backend.live_book()]
    failures: list[str] = []
    broken = BalancePoller(books[0], lambda: stale, clock, "replica-1", 60.0, failures.append)
    healthy = BalancePoller(books[1], lambda: good, clock, "replica-2", 60.0, failures.append)
    try:
        assert await broken.poll_once() is Polled.FAILED  # it held the lease, and let it go
        for _ in range(3):
            assert await healthy.poll_once() is Polled.STORED
            clock.advance(60)
            assert await broken.poll_once() is Polled.STANDBY
        assert failures == ["http_error"]
        assert await books[0].run(lease_holder) == (
            "replica-2",
            clock.now - timedelta(seconds=60) + timedelta(seconds=180),
        )
    finally:
        await stale.close()
        await good.close()
        for book in books:
            book.close()


async def test_a_scrape_never_waits_behind_a_poll_stuck_on_a_lock(
    ledger_backend: LedgerBackend,
) -> None:
    """The figures' read shares a thread with the poller's work, which may wait on a lock (a
    ``reprice --apply``): meanwhile a scrape shows the last figures read rather than hold the
    serving loop for the read's whole timeout; once the poll is through, fresh ones again."""
    live = ledger_backend.live_book()
    started, release = threading.Event(), threading.Event()

    def stuck(queries: object) -> None:
        started.set()
        release.wait(30)

    try:
        first = live.figures()
        poll = asyncio.ensure_future(live.run(stuck))
        assert await asyncio.to_thread(started.wait, 10)
        assert await asyncio.to_thread(live.figures) is first
        release.set()
        await poll
        assert await asyncio.to_thread(live.figures) == first
    finally:
        release.set()
        live.close()


async def test_with_two_workers_one_polls(tmp_path: Path) -> None:
    """``serve --workers 2`` polling every second: every snapshot comes from one worker (the
    lease's holder), each poll DeepSeek saw is in the ledger, and either worker's ``/metrics``
    shows the balance."""
    async with running_fake() as fake:
        fake.account = FakeAccount.opened(granted="1.00", topped_up="100.00")
        async with serve_process(
            tmp_path, fake.base_url, workers=2, extra_config="reconcile: {balance_interval: 1}\n"
        ) as serve:

            async def snapshots() -> list[tuple[object, ...]]:
                return await asyncio.to_thread(
                    ledger, serve.ledger, "SELECT owner FROM balance_snapshots"
                )

            async def three() -> bool:
                return len(await snapshots()) >= 3

            await eventually(three, "three balance polls", timeout=30)
            owners = {owner for (owner,) in await snapshots()}
            workers = {worker_owner(pid) for pid in worker_pids(serve.process.pid)}
            assert len(owners) == 1 and owners <= workers
            async with httpx.AsyncClient() as http:
                text = (await http.get(serve.url + "/metrics")).content
            assert (
                series(text, "llm_deepseek_balance")[(("currency", "CNY"), ("kind", "total"))]
                == 101.0
            )
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
        polls = [r for r in fake.requests if r.path == "/user/balance"]
        stored = len(
            await asyncio.to_thread(ledger, serve.ledger, "SELECT 1 FROM balance_snapshots")
        )
        assert stored <= len(polls) <= stored + 1  # a poll cut short by the stop
        assert ledger(serve.ledger, "SELECT count(*) FROM balance_poller") == [(0,)]


async def test_a_deleted_ledger_file_is_never_recreated(fake: FakeDeepSeek, tmp_path: Path) -> None:
    """A SQLite ledger deleted under the running proxy stays deleted (the writer rescues what
    it had): the poll that follows fails as a ledger failure, and a scrape leaves the figures
    out, without creating an empty ledger in its place."""
    path = tmp_path / "ledger.sqlite3"
    SQLiteLedger(path, BEIJING).close()
    fake.account = FakeAccount.opened(granted="0", topped_up="10")
    clock = Clock()
    upstream = Upstream(fake.base_url, FAKE_UPSTREAM_KEY, AiohttpTransport(Timeouts()))
    balance = LiveBook(SQLiteSource(path))
    failures: list[str] = []
    poller = BalancePoller(balance, lambda: upstream, clock, "me", 60.0, failures.append)
    try:
        assert await poller.poll_once() is Polled.STORED
        assert balance.figures().last_poll == clock.now
        path.unlink()
        clock.advance(60)
        assert await poller.poll_once() is Polled.FAILED
        with pytest.raises(Unreadable):
            balance.figures()
        await poller.leave()
    finally:
        await upstream.close()
        balance.close()
    assert failures == ["ledger"]
    assert not path.exists()


async def test_the_report_as_a_table_and_csv(reconciling: Reconciling) -> None:
    """The table: a caption, a line per window (instants in the billing timezone), a TOTAL per
    currency; CSV: the header and the windows only. Bounds in the wrong order are refused."""
    await reconciling.poll()
    reconciling.account.overcharge_next("0.5")
    await reconciling.calls(1)
    await reconciling.poll()
    args = ("report", "reconcile", "--config", str(reconciling.config))
    code, table, _ = await asyncio.to_thread(run, reconciling.capsys, *args)
    caption, header, line, total = table.splitlines()
    assert code == 0
    assert caption == (
        "Balance windows that ended from the first poll until the last poll (exclusive); "
        "billing timezone Asia/Shanghai"
    )
    assert header.split() == [
        "currency",
        "start",
        "end",
        "balance_before",
        "balance_after",
        "top_ups",
        "grants",
        "spend",
        "ledger_cost",
        "drift",
        "drift_ratio",
    ]
    cells = line.split()
    assert cells[:3] == ["CNY", "2026-11-02T09:31:00+08:00", "2026-11-02T09:33:00+08:00"]
    assert cells[9] == "0.5"
    assert total.split()[:3] == ["CNY", "TOTAL", "-"]
    assert total.split()[9] == "0.5"
    code, csv_text, _ = await asyncio.to_thread(run, reconciling.capsys, *args, "--format", "csv")
    assert code == 0
    assert [row.split(",")[9] for row in csv_text.splitlines()] == ["drift", "0.5"]
    code, _, err = await asyncio.to_thread(
        run, reconciling.capsys, *args, "--since", "2026-11-03", "--until", "2026-11-02"
    )
    assert (code, err.strip()) == (2, "--since must be before --until")


async def test_a_snapshot_from_a_clock_gone_back_is_not_stored(
    fake: FakeDeepSeek, ledger_backend: LedgerBackend
) -> None:
    """Windows only extend forwards: a poll whose instant is not after the newest snapshot
    (the clock went back, or a replica's is behind) stores nothing and counts as `clock`."""
    fake.account = FakeAccount.opened(granted="0", topped_up="10")
    clock = Clock()
    upstream = Upstream(fake.base_url, FAKE_UPSTREAM_KEY, AiohttpTransport(Timeouts()))
    balance = ledger_backend.live_book()
    failures: list[str] = []
    poller = BalancePoller(balance, lambda: upstream, clock, "me", 60.0, failures.append)
    try:
        assert await poller.poll_once() is Polled.STORED
        newest = clock.now
        clock.advance(-1)
        assert await poller.poll_once() is Polled.FAILED
        assert failures == ["clock"]
        assert balance.figures().last_poll == newest
        clock.advance(2)
        assert await poller.poll_once() is Polled.STORED
    finally:
        await upstream.close()
        balance.close()
