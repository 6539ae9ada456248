"""``serve --workers 2``: one port, one ledger, /metrics summed over the workers, hard budgets
and admission limits shared, a dead worker's holds and calls released, replacements restarted
with backoff, a clean stop, and a worker whose ledger fails reported whichever worker is asked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from proxy.pricing import PriceBook
from tests.conftest import ROOT
from tests.support.budget_configs import BIG, SMALL_MONTH_BUDGET, one_call_budget
from tests.support.fake_deepseek import running_fake
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY, Reply
from tests.support.requests import AUTH, BOUNDED_CHAT, BOUNDED_USAGE
from tests.support.serve_process import (
    ServeProcess,
    eventually,
    ledger,
    serve_process,
    worker_owner,
    worker_pids,
    write_config,
)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def test_two_workers_share_ledger_and_metrics(tmp_path: Path) -> None:
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(40)])
        async with serve_process(tmp_path, fake.base_url, workers=2) as serve:
            for _ in range(40):  # a new connection each: the kernel spreads them over workers
                async with httpx.AsyncClient(base_url=serve.url, headers=AUTH) as http:
                    assert (
                        await http.post("/chat/completions", json=BOUNDED_CHAT)
                    ).status_code == 200
            costs = await asyncio.to_thread(
                ledger, serve.ledger, "SELECT amount FROM usage_cost WHERE currency = 'CNY'"
            )
            exact = sum((Decimal(str(a)) for (a,) in costs), Decimal(0))
            async with asyncio.timeout(10):
                while True:  # other workers publish their exact totals every second
                    async with httpx.AsyncClient(base_url=serve.url) as http:
                        text = (await http.get("/metrics")).text
                    requests = sum(samples(text, "llm_requests_total").values())
                    cost = sum(
                        v
                        for k, v in samples(text, "llm_cost_total").items()
                        if ("currency", "CNY") in k
                    )
                    if len(costs) == 40 and requests == 40 and cost == float(exact):
                        break
                    await asyncio.sleep(0.1)  # polling the published totals, with a deadline
                    costs = await asyncio.to_thread(
                        ledger, serve.ledger, "SELECT amount FROM usage_cost WHERE currency = 'CNY'"
                    )
                    exact = sum((Decimal(str(a)) for (a,) in costs), Decimal(0))
            assert samples(text, "llm_inflight_requests") == {
                (("team", "alpha"),): 0,
                (("team", "beta"),): 0,
            }
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
    assert ledger(serve.ledger, "SELECT count(*), min(state) FROM usage") == [(40, "final")]


async def test_hard_budget_is_shared_by_the_workers(tmp_path: Path) -> None:
    budget = SMALL_MONTH_BUDGET
    async with running_fake() as fake:
        fake.enqueue(
            *[
                Reply(usage=BOUNDED_USAGE, chunk_interval=0.01, content=["a", "b"])
                for _ in range(60)
            ]
        )
        async with serve_process(tmp_path, fake.base_url, workers=2, extra_config=budget) as serve:

            async def one() -> int:
                async with httpx.AsyncClient(base_url=serve.url, headers=AUTH, timeout=30) as http:
                    response = await http.post(
                        "/chat/completions", json={**BOUNDED_CHAT, "stream": True}
                    )
                    return response.status_code

            statuses = await asyncio.gather(*(one() for _ in range(60)))
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
    costs = ledger(serve.ledger, "SELECT amount FROM usage_cost WHERE currency = 'CNY'")
    spent = sum((Decimal(str(a)) for (a,) in costs), Decimal(0))
    assert statuses.count(200) == len(costs) >= 4
    assert statuses.count(402) == 60 - len(costs)
    # Each call holds about 0.0032 (its prompt bound, the body plus 1,032 template tokens, at
    # 2 CNY/M and 100 output tokens at 8 CNY/M) until it settles to its cost (0.00036).
    assert spent <= Decimal("0.02")
    assert ledger(serve.ledger, "SELECT count(*) FROM budget_holds") == [(0,)]


async def post(url: str, payload: dict[str, object] = BOUNDED_CHAT) -> httpx.Response:
    """One call on a new connection (the kernel picks the worker per connection)."""
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as http:
        return await http.post("/chat/completions", json=payload)


RELEASE_DEADLINE = 3.0
"""The stated bound is "as soon as the supervisor sees the exit" (well under a second); the
rest is an allowance for a loaded CI machine."""


@contextlib.asynccontextmanager
async def held_call(serve: ServeProcess) -> AsyncIterator[tuple[str, int]]:
    """A `BIG` stream of team alpha in progress, holding the budget: (its request id, the pid
    of the worker serving it, found through the owner of its ledger row and hold)."""
    async with (
        httpx.AsyncClient(base_url=serve.url, headers=AUTH, timeout=30) as http,
        http.stream("POST", "/chat/completions", json={**BIG, "stream": True}) as held,
    ):
        assert held.status_code == 200

        async def row_and_hold() -> tuple[str, str] | None:
            rows = await asyncio.to_thread(
                ledger,
                serve.ledger,
                "SELECT u.request_id, u.owner, h.owner FROM usage u "
                "JOIN budget_holds h USING (request_id) WHERE u.state = 'in_flight'",
            )
            if not rows:
                return None
            [(request_id, owner, hold_owner)] = rows
            assert owner == hold_owner
            return str(request_id), str(owner)

        request_id, owner = await eventually(row_and_hold, "the call's row and hold")
        [pid] = [p for p in worker_pids(serve.process.pid) if worker_owner(p) == owner]
        yield request_id, pid


def released(serve: ServeProcess, request_id: str) -> Callable[[], Awaitable[bool]]:
    """Whether the ledger has no hold left and the call's row ended as ``interrupted``."""

    async def check() -> bool:
        holds, [row] = await asyncio.gather(
            asyncio.to_thread(ledger, serve.ledger, "SELECT * FROM budget_holds"),
            asyncio.to_thread(
                ledger,
                serve.ledger,
                "SELECT state, outcome FROM usage WHERE request_id = ?",
                request_id,
            ),
        )
        return not holds and row == ("final", "interrupted")

    return check


async def test_a_killed_worker_releases_its_holds_and_calls(
    tmp_path: Path, book: PriceBook
) -> None:
    async with running_fake() as fake:
        fake.enqueue(Reply(usage=BOUNDED_USAGE, content=["a"] * 600, chunk_interval=0.05))
        async with serve_process(
            tmp_path, fake.base_url, workers=2, extra_config=one_call_budget(book)
        ) as serve:
            async with held_call(serve) as (request_id, pid):
                assert (await post(serve.url, BIG)).status_code == 402  # no room left
                os.kill(pid, signal.SIGKILL)
            await eventually(
                released(serve, request_id),
                "the dead worker's hold and call released",
                RELEASE_DEADLINE,
            )
            assert (await post(serve.url, BIG)).status_code == 200  # room again
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
    assert ledger(serve.ledger, "SELECT outcome FROM usage ORDER BY started_at") == [
        ("interrupted",),
        ("complete",),
    ]
    log = serve.log.read_text()
    assert f"worker {pid} " in log and "SIGKILL" in log


async def test_a_release_the_ledger_refuses_is_retried(tmp_path: Path, book: PriceBook) -> None:
    """The ledger is locked when the worker dies: the supervisor waits 1 s for it, logs the
    failure, starts the replacement anyway, and releases the state once it can write. With
    one call per team, the last call's admission also shows the dead worker's count gone."""
    config = one_call_budget(book) + "limits: {max_inflight_per_team: 1}\n"
    async with running_fake() as fake:
        fake.enqueue(Reply(usage=BOUNDED_USAGE, content=["a"] * 600, chunk_interval=0.05))
        async with serve_process(tmp_path, fake.base_url, workers=2, extra_config=config) as serve:

            async def refused() -> bool:
                return "cannot release the budget holds" in serve.log.read_text()

            async with held_call(serve) as (request_id, pid):
                with contextlib.closing(
                    sqlite3.connect(serve.ledger, isolation_level=None)
                ) as lock:
                    lock.execute("BEGIN IMMEDIATE")  # no other writer until the rollback
                    os.kill(pid, signal.SIGKILL)
                    await eventually(refused, "the release failing while the ledger is locked")
                    assert not await released(serve, request_id)()
                    lock.execute("ROLLBACK")
            await eventually(released(serve, request_id), "the release retried")
            assert (await post(serve.url, BIG)).status_code == 200
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0


async def test_replacements_dying_at_once_never_stop_the_service(tmp_path: Path) -> None:
    async with running_fake() as fake, serve_process(tmp_path, fake.base_url, workers=2) as serve:
        supervisor = serve.process.pid
        survivor, victim = sorted(worker_pids(supervisor))
        killed = [victim]
        os.kill(victim, signal.SIGKILL)
        for _ in range(2):  # the replacement dies within 5 s of its start, twice in a row

            async def replacement() -> int | None:
                fresh = worker_pids(supervisor) - {survivor, *killed}
                return min(fresh) if fresh else None

            pid = await eventually(replacement, "a replacement worker")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            assert (await post(serve.url)).status_code == 200  # the other worker answers
        assert serve.process.returncode is None

        async def serving() -> str | None:
            owners = [worker_owner(p) for p in worker_pids(supervisor) - {survivor, *killed}]
            if len(owners) != 1 or owners[0] is None:
                return None  # still backing off, or not started yet
            await post(serve.url)
            [(count,)] = await asyncio.to_thread(
                ledger, serve.ledger, "SELECT count(*) FROM usage WHERE owner = ?", owners[0]
            )
            return owners[0] if count else None

        # Restarts back off (0.5, 1 then 2 s here): the last replacement is up within seconds.
        owner = await eventually(serving, "a replacement that serves calls", timeout=20)
        [last] = [p for p in worker_pids(supervisor) if worker_owner(p) == owner]
        os.kill(last, signal.SIGKILL)
        killed.append(last)

        async def backing_off() -> bool:
            return f"worker {last} (slot 1) was killed by SIGKILL" in serve.log.read_text()

        await eventually(backing_off, "the supervisor backing off for 4 s")
        serve.process.send_signal(signal.SIGTERM)  # stops at once, not after the backoff
        assert await asyncio.wait_for(serve.process.wait(), 3.0) == 0
    log = serve.log.read_text()
    for pid in killed:
        assert f"worker {pid} " in log
    for delay in ("0.5", "1", "2", "4"):
        assert f"restarting in {delay} s\n" in log
    assert "started in slot" not in log.split("SIGTERM: stopping the workers")[1]


def running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie waits only to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    async with running_fake() as fake, serve_process(tmp_path, fake.base_url, workers=2) as serve:
        workers = worker_pids(serve.process.pid)
        os.kill(serve.process.pid, signal.SIGKILL)
        await serve.process.wait()

        async def all_stopped() -> bool:
            return not any(running(pid) for pid in workers)

        await eventually(all_stopped, "the workers stop once their supervisor is gone")
    # A killed supervisor cannot remove its run's shared folder: the test does.
    [folder] = re.findall(r"shared files in (\S+)\)", serve.log.read_text())
    shutil.rmtree(folder)


def test_workers_refuse_a_port_in_use_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, "http://127.0.0.1:9", port)
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--workers", "2"],
            cwd=ROOT,
            env={**os.environ, "TEST_DEEPSEEK_KEY": FAKE_UPSTREAM_KEY},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert (result.returncode, result.stderr) == (
        2,
        f"cannot start: {config}: listen: cannot listen on 127.0.0.1:{port}: "
        "address already in use\n",
    )


STREAMS = 16
"""Concurrent streams of one team, each on its own connection: the kernel spreads them over
both workers (all 16 on one worker has a chance of 2 in 65,536)."""


async def test_inflight_limits_hold_across_workers(tmp_path: Path) -> None:
    async with running_fake() as fake:
        fake.enqueue(
            *[
                Reply(usage=BOUNDED_USAGE, content=["a"] * 40, chunk_interval=0.1)
                for _ in range(STREAMS)
            ]
        )
        async with serve_process(
            tmp_path, fake.base_url, workers=2, extra_config="limits: {max_inflight_per_team: 4}\n"
        ) as serve:
            answered: list[int] = []
            everyone = asyncio.Event()

            async def stream() -> tuple[int, str | None]:
                async with (
                    httpx.AsyncClient(base_url=serve.url, headers=AUTH, timeout=30) as http,
                    http.stream(
                        "POST", "/chat/completions", json={**BOUNDED_CHAT, "stream": True}
                    ) as response,
                ):
                    answered.append(response.status_code)
                    if len(answered) == STREAMS:
                        everyone.set()
                    await everyone.wait()  # every admitted stream stays open until then
                    await response.aread()
                    return response.status_code, response.headers.get("Retry-After")

            results = await asyncio.gather(*(stream() for _ in range(STREAMS)))
            admitted = [r for r in results if r[0] == 200]
            refused = [r for r in results if r[0] != 200]
            assert 4 <= len(admitted) <= 4 + 1  # the limit, plus one call per other worker
            assert refused == [(503, "1")] * (STREAMS - len(admitted))

            async def admitted_again() -> bool:
                replies = await asyncio.gather(*(post(serve.url) for _ in range(4)))
                return all(r.status_code == 200 for r in replies)

            await eventually(admitted_again, "four calls admitted once the streams ended")
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0


async def test_ledger_metrics_speak_for_every_worker(tmp_path: Path) -> None:
    """One worker's ledger writes fail (it may no longer grow a file: RLIMIT_FSIZE): whichever
    worker answers a scrape, the ledger is reported not committing, what waits is summed, and
    that worker still exits, saving what it could not write."""
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(100)])
        async with serve_process(
            tmp_path,
            fake.base_url,
            workers=2,
            ledger_config="shutdown_timeout: 1, max_queued_records: 7",
        ) as serve:

            async def scrape() -> dict[str, float]:
                async with httpx.AsyncClient(base_url=serve.url) as http:  # either worker
                    text = (await http.get("/metrics")).text
                return {
                    name: value
                    for name in (
                        "llm_ledger_committing",
                        "llm_ledger_queued_records",
                        "llm_ledger_max_queued_records",
                        "llm_ledger_write_errors_total",
                    )
                    for value in samples(text, name).values()
                }

            workers = sorted(worker_pids(serve.process.pid))  # both listen: serve_process waited
            assert len(workers) == 2
            deadline = time.monotonic() + 10
            while (await scrape())["llm_ledger_max_queued_records"] < 14:
                assert time.monotonic() < deadline, "both workers publish their figures"
                await asyncio.sleep(0.05)  # polling the shared figures, with a deadline
            assert await scrape() == {
                "llm_ledger_committing": 1,
                "llm_ledger_queued_records": 0,
                "llm_ledger_max_queued_records": 14,
                "llm_ledger_write_errors_total": 0,
            }
            failing = workers[0]
            wal = Path(f"{serve.ledger}-wal").stat().st_size
            _, hard = resource.prlimit(failing, resource.RLIMIT_FSIZE)
            resource.prlimit(failing, resource.RLIMIT_FSIZE, (wal, hard))
            sent: list[str] = []
            async with asyncio.timeout(30):
                while (await scrape())["llm_ledger_committing"] != 0:
                    async with httpx.AsyncClient(base_url=serve.url, headers=AUTH) as http:
                        response = await http.post("/chat/completions", json=BOUNDED_CHAT)
                        assert response.status_code == 200
                        sent.append(response.headers["x-request-id"])
            for _ in range(8):  # new connections: the kernel picks either worker
                figures = await scrape()
                assert figures["llm_ledger_committing"] == 0
                assert figures["llm_ledger_write_errors_total"] >= 1
                assert figures["llm_ledger_max_queued_records"] == 14
                assert 1 <= figures["llm_ledger_queued_records"] <= 7
            serve.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(serve.process.wait(), 30) == 3  # as the worker did
    # Every call is in the ledger (the healthy worker's) or in the failing worker's spill file.
    [spilled] = tmp_path.glob(f"ledger.sqlite3.unwritten-*-{failing}.jsonl")
    kept = [json.loads(line)["request_id"] for line in spilled.read_text().splitlines()]
    written = [r for (r,) in ledger(serve.ledger, "SELECT request_id FROM usage")]
    assert kept and sorted(kept + written) == sorted(sent)
