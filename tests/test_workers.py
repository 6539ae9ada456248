"""``serve --workers 2``: one port, one ledger, /metrics summed over the workers, hard budgets
shared, a clean stop, and a worker whose ledger fails reported whichever worker is asked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import sqlite3
import time
from decimal import Decimal
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_deepseek import running_fake
from tests.fake_deepseek_shapes import Reply
from tests.proxy_harness import TEAM_KEYS
from tests.serve_process import serve_process

AUTH = {"Authorization": f"Bearer {TEAM_KEYS['alpha']}"}
USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "prompt_cache_hit_tokens": 0,
         "prompt_cache_miss_tokens": 100, "total_tokens": 120}
CHAT = {"model": "deepseek-flash", "max_tokens": 100,
        "messages": [{"role": "user", "content": "x" * 92}]}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


def ledger(path: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


async def test_two_workers_share_ledger_and_metrics(tmp_path: Path) -> None:
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=USAGE) for _ in range(40)])
        async with serve_process(tmp_path, fake.base_url, workers=2) as serve:
            for _ in range(40):  # a new connection each: the kernel spreads them over workers
                async with httpx.AsyncClient(base_url=serve.url, headers=AUTH) as http:
                    assert (await http.post("/chat/completions", json=CHAT)).status_code == 200
            costs = await asyncio.to_thread(
                ledger, serve.ledger, "SELECT amount FROM usage_cost WHERE currency = 'CNY'")
            exact = sum((Decimal(str(a)) for (a,) in costs), Decimal(0))
            async with asyncio.timeout(10):
                while True:  # other workers publish their exact totals every second
                    async with httpx.AsyncClient(base_url=serve.url) as http:
                        text = (await http.get("/metrics")).text
                    requests = sum(samples(text, "llm_requests_total").values())
                    cost = sum(v for k, v in samples(text, "llm_cost_total").items()
                               if ("currency", "CNY") in k)
                    if len(costs) == 40 and requests == 40 and cost == float(exact):
                        break
                    await asyncio.sleep(0.1)  # polling the published totals, with a deadline
                    costs = await asyncio.to_thread(
                        ledger, serve.ledger,
                        "SELECT amount FROM usage_cost WHERE currency = 'CNY'")
                    exact = sum((Decimal(str(a)) for (a,) in costs), Decimal(0))
            assert samples(text, "llm_inflight_requests") == {
                (("team", "alpha"),): 0, (("team", "beta"),): 0}
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
    assert ledger(serve.ledger, "SELECT count(*), min(state) FROM usage") == [(40, "final")]


async def test_hard_budget_is_shared_by_the_workers(tmp_path: Path) -> None:
    budget = ("budgets:\n  alpha:\n"
              "    - {period: month, amount: '0.004', currency: CNY, hard: true}\n")
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=USAGE, chunk_interval=0.01, content=["a", "b"])
                       for _ in range(60)])
        async with serve_process(tmp_path, fake.base_url, workers=2,
                                 extra_config=budget) as serve:

            async def one() -> int:
                async with httpx.AsyncClient(base_url=serve.url, headers=AUTH,
                                             timeout=30) as http:
                    response = await http.post("/chat/completions", json={**CHAT,
                                                                           "stream": True})
                    return response.status_code

            statuses = await asyncio.gather(*(one() for _ in range(60)))
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
    costs = ledger(serve.ledger, "SELECT amount FROM usage_cost WHERE currency = 'CNY'")
    spent = sum((Decimal(str(a)) for (a,) in costs), Decimal(0))
    assert statuses.count(200) == len(costs) >= 4
    assert statuses.count(402) == 60 - len(costs)
    assert spent <= Decimal("0.004")  # each call holds 0.001 until it settles to its cost
    assert ledger(serve.ledger, "SELECT count(*) FROM budget_holds") == [(0,)]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the supervisor's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.name.isdigit() and int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


async def test_ledger_metrics_speak_for_every_worker(tmp_path: Path) -> None:
    """One worker's ledger writes fail (it may no longer grow a file: RLIMIT_FSIZE): whichever
    worker answers a scrape, the ledger is reported not committing, what waits is summed, and
    that worker still exits, saving what it could not write."""
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=USAGE) for _ in range(100)])
        async with serve_process(tmp_path, fake.base_url, workers=2,
                                 ledger_config="shutdown_timeout: 1, max_queued_records: 7"
                                 ) as serve:

            async def scrape() -> dict[str, float]:
                async with httpx.AsyncClient(base_url=serve.url) as http:  # either worker
                    text = (await http.get("/metrics")).text
                return {name: value for name in (
                    "llm_ledger_committing", "llm_ledger_queued_records",
                    "llm_ledger_max_queued_records", "llm_ledger_write_errors_total")
                    for value in samples(text, name).values()}

            workers = children(serve.process.pid)  # both started before either answered
            assert len(workers) == 2
            deadline = time.monotonic() + 10
            while (await scrape())["llm_ledger_max_queued_records"] < 14:
                assert time.monotonic() < deadline, "both workers publish their figures"
                await asyncio.sleep(0.05)  # polling the shared figures, with a deadline
            assert await scrape() == {
                "llm_ledger_committing": 1, "llm_ledger_queued_records": 0,
                "llm_ledger_max_queued_records": 14, "llm_ledger_write_errors_total": 0}
            failing = workers[0]
            wal = Path(f"{serve.ledger}-wal").stat().st_size
            _, hard = resource.prlimit(failing, resource.RLIMIT_FSIZE)
            resource.prlimit(failing, resource.RLIMIT_FSIZE, (wal, hard))
            sent: list[str] = []
            async with asyncio.timeout(30):
                while (await scrape())["llm_ledger_committing"] != 0:
                    async with httpx.AsyncClient(base_url=serve.url, headers=AUTH) as http:
                        response = await http.post("/chat/completions", json=CHAT)
                        assert response.status_code == 200
                        sent.append(response.headers["x-request-id"])
            for _ in range(8):  # new connections: the kernel picks either worker
                figures = await scrape()
                assert figures["llm_ledger_committing"] == 0
                assert figures["llm_ledger_write_errors_total"] >= 1
                assert figures["llm_ledger_max_queued_records"] == 14
                assert 1 <= figures["llm_ledger_queued_records"] <= 7
            serve.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(serve.process.wait(), 30) == 1  # a worker exited 3
    # Every call is in the ledger (the healthy worker's) or in the failing worker's spill file.
    [spilled] = tmp_path.glob(f"ledger.sqlite3.unwritten-*-{failing}.jsonl")
    kept = [json.loads(line)["request_id"] for line in spilled.read_text().splitlines()]
    written = [r for (r,) in ledger(serve.ledger, "SELECT request_id FROM usage")]
    assert kept and sorted(kept + written) == sorted(sent)
