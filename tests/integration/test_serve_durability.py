"""The real `serve` process: SIGTERM loses nothing, kill -9 loses at most the stated window,
a restarted proxy reports the same spend as the ledger, and a ledger that cannot commit or
whose file is deleted neither hangs the stop nor loses a record."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import DEFAULT_FLUSH_INTERVAL
from proxy.ledger.spill import read_records
from proxy.pricing import PriceBook, price
from proxy.usage import parse_usage
from tests.support.fake_deepseek import running_fake
from tests.support.fake_deepseek_shapes import Reply
from tests.support.requests import AUTH, CHAT, STREAM, USAGE, auth
from tests.support.serve_process import serve_process

# The stated window (README, proxy/ledger/writer.py) is the flush interval plus the commit in
# progress; the commit allowance here is generous for a loaded CI machine.
WINDOW = DEFAULT_FLUSH_INTERVAL + 1.0


def ledger_rows(path: Path) -> list[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT request_id, state, outcome FROM usage").fetchall()


def spend(path: Path, currency: str) -> Decimal:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        amounts = conn.execute(
            "SELECT amount FROM usage_cost WHERE currency = ?", (currency,)
        ).fetchall()
    return sum((Decimal(a) for (a,) in amounts), Decimal(0))


def expected_spend(path: Path, book: PriceBook, currency: str) -> Decimal:
    """What the price book says the ledger's rows cost, at the instants they were priced."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        priced = conn.execute("SELECT model_requested, priced_at FROM usage").fetchall()
    usage = parse_usage(USAGE).tokens
    return sum(
        (
            price(book, model, usage, datetime.fromisoformat(at)).costs[currency].total
            for model, at in priced
        ),
        Decimal(0),
    )


def scraped_spend(text: str, team: str, period: str, currency: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "llm_team_spend" and s.labels == {
                "team": team,
                "period": period,
                "currency": currency,
            }:
                return s.value
    raise AssertionError("llm_team_spend not exported")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_sigterm_drains_streams_and_restart_keeps_spend(
    tmp_path: Path, book: PriceBook, loop: str
) -> None:
    async with running_fake() as fake:
        fake.enqueue(
            *[
                Reply(content=[f"w{i}" for i in range(10)], usage=USAGE, chunk_interval=0.05)
                for _ in range(6)
            ]
        )
        async with (
            serve_process(tmp_path, fake.base_url, loop=loop) as serve,
            httpx.AsyncClient(base_url=serve.url, headers=AUTH, timeout=30) as http,
        ):
            calls = [
                asyncio.create_task(http.post("/chat/completions", json=STREAM)) for _ in range(6)
            ]
            await fake.wait_for(lambda: len(fake.requests) == 6)
            serve.process.send_signal(signal.SIGTERM)  # while all six streams are running
            responses = await asyncio.gather(*calls)
            assert await serve.process.wait() == 0
        assert [r.status_code for r in responses] == [200] * 6
        assert all(r.text.endswith("data: [DONE]\n\n") for r in responses)
        rows = ledger_rows(serve.ledger)
        assert sorted(r[0] for r in rows) == sorted(r.headers["x-request-id"] for r in responses)
        assert {(state, outcome) for _, state, outcome in rows} == {("final", "complete")}
        usd = spend(serve.ledger, "USD")
        assert usd == expected_spend(serve.ledger, book, "USD")  # serve priced at its real clock

        async with (
            serve_process(tmp_path, fake.base_url) as again,
            httpx.AsyncClient(base_url=again.url) as http,
        ):
            text = (await http.get("/metrics")).text
        assert scraped_spend(text, "alpha", "month", "USD") == float(usd)
        # ... and the report agrees with the ledger to the last digit.
        report = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "proxy",
                "report",
                "--config",
                str(tmp_path / "proxy.yaml"),
                "--format",
                "json",
                "--by",
                "team",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        total = json.loads(report.stdout)["total"]
        assert (total["requests"], Decimal(total["cost"]["USD"])) == (6, usd)


async def test_kill_9_loses_at_most_the_stated_window(tmp_path: Path) -> None:
    async with running_fake() as fake:
        fake.enqueue(
            *[
                Reply(content=["a", "b", "c"], usage=USAGE, chunk_interval=0.01)
                for _ in range(10_000)
            ]
        )
        async with (
            serve_process(tmp_path, fake.base_url) as serve,
            httpx.AsyncClient(base_url=serve.url, headers=AUTH, timeout=30) as http,
        ):
            completed: list[str] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    with contextlib.suppress(httpx.HTTPError):
                        response = await http.post("/chat/completions", json=STREAM)
                        if response.text.endswith("[DONE]\n\n"):
                            completed.append(response.headers["x-request-id"])

            workers = [asyncio.create_task(traffic()) for _ in range(8)]
            await fake.wait_for(lambda: len(completed) >= 40, timeout=30)
            seen, done = len(fake.requests), set(completed)
            # Within the stated window, every call DeepSeek has seen is on disk ...
            deadline = time.monotonic() + WINDOW
            while True:
                rows = ledger_rows(serve.ledger)
                finals = {r[0] for r in rows if r[1] == "final"}
                if len(rows) >= seen and done <= finals:
                    break
                assert time.monotonic() < deadline, (len(rows), seen)
                await asyncio.sleep(0.01)  # polling the ledger file, bounded by the window
            os.kill(serve.process.pid, signal.SIGKILL)  # ... so a crash now loses none of it
            stop.set()
            await asyncio.gather(*workers)
        rows = ledger_rows(serve.ledger)
        ids = [r[0] for r in rows]
        assert len(ids) == len(set(ids))
        assert len(rows) >= seen
        assert len(rows) <= len(fake.requests)
        finals = {r[0] for r in rows if r[1] == "final" and r[2] == "complete"}
        assert done <= finals


DRAIN = 3.0
CANCEL_ALLOWANCE = 2 * 1.0 + 1.0
"""After the drain: aiohttp's two waits of `proxy.listener.CANCEL_GRACE` for cancelled calls,
plus a second for the ledger's flush and the exit on a loaded machine."""


async def test_drain_answers_503_on_every_connection_and_ends_in_time(tmp_path: Path) -> None:
    """SIGTERM with a stream that outlasts the drain: /readyz turns 503, a new call on a
    kept-alive connection and one on a new connection both get 503 with Retry-After and
    Connection: close (never a refused or silently closed connection), and the process ends
    within `timeouts.drain` plus the stated allowance, not twice the drain."""
    async with running_fake() as fake:
        fake.enqueue(Reply(content=[f"w{i}" for i in range(60)], usage=USAGE, chunk_interval=0.5))
        async with (
            serve_process(
                tmp_path, fake.base_url, extra_config=f"timeouts: {{drain: {DRAIN}}}\n"
            ) as serve,
            httpx.AsyncClient(base_url=serve.url, headers=AUTH, timeout=30) as kept,
            httpx.AsyncClient(base_url=serve.url, headers=AUTH, timeout=30) as streamer,
        ):
            assert (await kept.get("/healthz")).status_code == 200  # its connection stays open
            running = asyncio.create_task(streamer.post("/chat/completions", json=STREAM))
            await fake.wait_for(lambda: len(fake.requests) == 1)
            serve.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            async with asyncio.timeout(DRAIN):
                while True:  # polling the readiness flip, with a deadline
                    if (await kept.get("/readyz")).status_code == 503:
                        break
                    await asyncio.sleep(0.02)
            on_kept = await kept.post("/chat/completions", json=STREAM)
            async with httpx.AsyncClient(base_url=serve.url, headers=AUTH) as fresh:
                on_new = await fresh.post("/chat/completions", json=STREAM)
            with contextlib.suppress(httpx.HTTPError):
                await running  # cut when the drain ends
            code = await serve.process.wait()
            elapsed = time.monotonic() - started
    for answer in (on_kept, on_new):
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert answer.headers["Connection"] == "close"
        assert "shutting down" in answer.json()["error"]["message"]
    assert code == 0
    assert DRAIN <= elapsed < DRAIN + CANCEL_ALLOWANCE
    assert [row[1:] for row in ledger_rows(serve.ledger)] == [("final", "aborted")]
    assert len(fake.requests) == 1


async def test_drain_ends_when_the_last_call_does(tmp_path: Path) -> None:
    async with running_fake() as fake:
        fake.enqueue(Reply(content=["a", "b", "c"], usage=USAGE, chunk_interval=0.3))
        async with (
            serve_process(tmp_path, fake.base_url, extra_config="timeouts: {drain: 60}\n") as serve,
            httpx.AsyncClient(base_url=serve.url, headers=AUTH, timeout=30) as http,
        ):
            running = asyncio.create_task(http.post("/chat/completions", json=STREAM))
            await fake.wait_for(lambda: len(fake.requests) == 1)
            serve.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            answer = await running
            code = await serve.process.wait()
            elapsed = time.monotonic() - started
    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    assert code == 0 and elapsed < 10  # not the 60 s the drain allows
    assert [row[1:] for row in ledger_rows(serve.ledger)] == [("final", "complete")]


# --- the ledger failing: loud and bounded, never a hang -------------------------------------------
LEDGER_DRAIN = 2.0  # timeouts.drain of the ledger tests below, seconds
GIVE_UP = 2.0
MARGIN = 3.0  # interpreter start-up excluded: what a loaded machine may add to exiting
SPILLED = re.compile(r"they are saved in (\S+) \(one JSON line each\)")


async def metric(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    [value] = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]
    return value


async def poll(condition: Callable[[], Awaitable[bool]], what: str, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)  # polling the process's state, bounded by the deadline


async def served(http: httpx.AsyncClient, team: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = await http.post("/chat/completions", json=CHAT, headers=auth(team))
        assert response.status_code == 200, response.text
        ids.append(response.headers["x-request-id"])
    return ids


async def ledger_replay(config: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "ledger-replay", "--config", str(config), *map(str, files)],
        capture_output=True,
        text=True,
    )


def spend_is_consistent(path: Path, currency: str) -> Decimal:
    """The daily sums equal the rows' costs exactly; returns that total."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        daily = conn.execute(
            "SELECT amount FROM spend_daily WHERE currency = ?", (currency,)
        ).fetchall()
    total = sum((Decimal(a) for (a,) in daily), Decimal(0))
    assert total == spend(path, currency)
    return total


async def test_sigterm_with_an_unwritable_ledger_gives_up_in_time_and_spills(
    tmp_path: Path, book: PriceBook
) -> None:
    """The ledger's disk fills while serving (the process may no longer grow any file:
    RLIMIT_FSIZE, which Python's ignored SIGXFSZ turns into EFBIG errors): calls go on being
    served, and SIGTERM exits within drain + shutdown timeout, naming the spill file that
    ``ledger-replay`` puts back."""
    log = tmp_path / "serve.log"
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=USAGE) for _ in range(5)])
        async with (
            serve_process(
                tmp_path,
                fake.base_url,
                log=log,
                extra_config=f"timeouts: {{drain: {LEDGER_DRAIN}}}\n",
                ledger_config=f"shutdown_timeout: {GIVE_UP}",
            ) as serve,
            httpx.AsyncClient(base_url=serve.url, timeout=30) as http,
        ):
            early = await served(http, "beta", 2)

            async def written() -> bool:
                return len(await asyncio.to_thread(ledger_rows, serve.ledger)) == 2

            await poll(written, "the first calls are in the ledger")
            wal = Path(f"{serve.ledger}-wal").stat().st_size
            _, hard = resource.prlimit(serve.process.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(serve.process.pid, resource.RLIMIT_FSIZE, (wal, hard))
            late = await served(http, "beta", 3)

            async def failing() -> bool:
                return (
                    await metric(http, "llm_ledger_committing") == 0
                    and await metric(http, "llm_ledger_queued_records") == 3
                )

            await poll(failing, "the ledger reported failing with three records waiting")
            started = time.monotonic()
            serve.process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(serve.process.wait(), LEDGER_DRAIN + GIVE_UP + MARGIN)
            took = time.monotonic() - started
    assert code == 3  # proxy.serve.EXIT_UNWRITTEN
    assert GIVE_UP <= took < LEDGER_DRAIN + GIVE_UP + MARGIN
    text = log.read_text()
    assert "the ledger could not commit 3 record(s) (waited 2.0 s)" in text
    [spilled] = SPILLED.findall(text)
    assert sorted(r.request_id for r in read_records(Path(spilled))) == sorted(late)
    assert sorted(r[0] for r in ledger_rows(serve.ledger)) == sorted(early)

    replayed = await ledger_replay(tmp_path / "proxy.yaml", Path(spilled))
    assert (replayed.returncode, replayed.stdout) == (
        0,
        f"3 record(s) read: 3 written to {serve.ledger}, 0 already there\n",
    )
    assert sorted(ledger_rows(serve.ledger)) == sorted(
        (request_id, "final", "complete") for request_id in early + late
    )
    total = spend_is_consistent(serve.ledger, "USD")
    assert total == expected_spend(serve.ledger, book, "USD")


async def test_a_ledger_deleted_while_serving_is_rescued_and_refuses_hard_budgets(
    tmp_path: Path,
) -> None:
    log = tmp_path / "serve.log"
    budget = "budgets:\n  alpha:\n    - {period: month, amount: 100, currency: CNY, hard: true}\n"
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=USAGE) for _ in range(4)])
        async with (
            serve_process(
                tmp_path,
                fake.base_url,
                log=log,
                extra_config=budget,
                ledger_config=f"shutdown_timeout: {GIVE_UP}",
            ) as serve,
            httpx.AsyncClient(base_url=serve.url, timeout=30) as http,
        ):
            early = await served(http, "alpha", 1) + await served(http, "beta", 1)

            async def written() -> bool:
                return len(await asyncio.to_thread(ledger_rows, serve.ledger)) == 2

            await poll(written, "the first calls are in the ledger")
            serve.ledger.unlink()

            async def noticed() -> bool:
                return await metric(http, "llm_ledger_committing") == 0

            await poll(noticed, "the deletion is noticed", within=1 + MARGIN)
            refused = await http.post("/chat/completions", json=CHAT, headers=auth("alpha"))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "ledger_unavailable"
            late = await served(http, "beta", 2)  # no hard budget: served while there is room

            async def held() -> bool:
                return await metric(http, "llm_ledger_queued_records") == 2

            await poll(held, "the two records wait in memory")
            assert len(fake.requests) == 4
            started = time.monotonic()
            serve.process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(serve.process.wait(), LEDGER_DRAIN + GIVE_UP + MARGIN)
            took = time.monotonic() - started
    assert code == 3
    assert took < MARGIN  # nothing can be written to a deleted file: no point in waiting
    assert not serve.ledger.exists()  # never recreated
    [copy] = tmp_path.glob("ledger.sqlite3.recovered-*")
    assert sorted(r[0] for r in ledger_rows(copy)) == sorted(early)
    text = log.read_text()
    assert f"the ledger file {serve.ledger} was deleted or replaced" in text
    assert f"to {copy}. To restore it: stop the proxy" in text
    [spilled] = SPILLED.findall(text)
    assert sorted(r.request_id for r in read_records(Path(spilled))) == sorted(late)

    # The restore the log describes: the copy into place, then the spilled records.
    for leftover in ("-wal", "-shm"):
        Path(f"{serve.ledger}{leftover}").unlink(missing_ok=True)
    copy.rename(serve.ledger)
    replayed = await ledger_replay(tmp_path / "proxy.yaml", Path(spilled))
    assert replayed.returncode == 0, replayed.stderr
    assert sorted(ledger_rows(serve.ledger)) == sorted(
        (request_id, "final", "complete") for request_id in early + late
    )
    spend_is_consistent(serve.ledger, "CNY")
