"""``serve --workers 2``: one port, one ledger, /metrics summed over the workers, hard budgets
shared, a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
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
              "    - {period: month, amount: '0.02', currency: CNY, hard: true}\n")
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
    # Each call holds about 0.0032 (its prompt bound, the body plus 1,032 template tokens, at
    # 2 CNY/M and 100 output tokens at 8 CNY/M) until it settles to its cost (0.00036).
    assert spent <= Decimal("0.02")
    assert ledger(serve.ledger, "SELECT count(*) FROM budget_holds") == [(0,)]
