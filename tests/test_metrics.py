"""The metrics contract: exact values after scripted traffic, bounded series, spend from the
ledger."""

from __future__ import annotations

import asyncio
import random
import string
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.ledger.store import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.pricing import PriceBook
from tests.fake_deepseek import FakeDeepSeek, running_fake
from tests.fake_deepseek_shapes import Reply
from tests.proxy_harness import PEAK, TEAM_KEYS, running_proxy

USAGE = {"prompt_tokens": 1000, "completion_tokens": 50, "prompt_cache_hit_tokens": 640,
         "prompt_cache_miss_tokens": 360, "completion_tokens_details": {"reasoning_tokens": 20},
         "total_tokens": 1050}
CHAT = {"model": "deepseek-flash", "messages": [{"role": "user", "content": "Say hello"}]}


def auth(team: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TEAM_KEYS[team]}"}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_metric_values_after_scripted_traffic(fake: FakeDeepSeek, book: PriceBook,
                                                    tmp_path: Path) -> None:
    store = SQLiteLedger(tmp_path / "ledger.sqlite3", ZoneInfo("Asia/Shanghai"))
    writer = LedgerWriter(store, flush_interval=0.01)
    fake.enqueue(Reply(usage=USAGE), Reply(usage=USAGE, server_tool_use={"web_search_requests": 3}),
                 Reply(usage=USAGE), Reply(status=429), Reply(usage=USAGE, cut_after_events=2))
    try:
        async with running_proxy(fake.base_url, book, sink=writer, spend=store.spend) as proxy, \
                httpx.AsyncClient(base_url=proxy.url) as http:
            await http.post("/chat/completions", json=CHAT, headers=auth("alpha"))
            await http.post("/chat/completions", json={**CHAT, "stream": True},
                            headers=auth("alpha"))
            await http.post("/v1/chat/completions", json={**CHAT, "model": "deepseek-v4-pro"},
                            headers=auth("beta"))
            await http.post("/chat/completions", json=CHAT, headers=auth("beta"))
            await http.post("/chat/completions", json={**CHAT, "stream": True},
                            headers=auth("beta"))
            await http.post("/chat/completions", json={**CHAT, "model": "my-own-model"},
                            headers=auth("beta"))
            await proxy.sink.wait_for(6)
            await asyncio.to_thread(writer.flush)
            scrape = (await http.get("/metrics")).text
        r = proxy.registry
        assert sample(r, "llm_requests_total", team="alpha", model="deepseek-flash",
                      endpoint="chat", status="200") == 2
        assert sample(r, "llm_requests_total", team="beta", model="deepseek-flash",
                      endpoint="chat", status="429") == 1
        assert sample(r, "llm_requests_total", team="beta", model="other", endpoint="chat",
                      status="200") == 1
        assert sample(r, "llm_tokens_total", team="alpha", model="deepseek-flash",
                      type="input_cache_hit") == 1280
        assert sample(r, "llm_tokens_total", team="alpha", model="deepseek-flash",
                      type="input_cache_miss") == 720
        assert sample(r, "llm_tokens_total", team="alpha", model="deepseek-flash",
                      type="output") == 100
        assert sample(r, "llm_reasoning_tokens_total", team="alpha", model="deepseek-flash") == 40
        assert sample(r, "llm_tool_calls_total", team="alpha", model="deepseek-flash",
                      tool="search") == 3
        # two flash calls at peak: 2 x 0.0011456 CNY plus 3 searches at 5 CNY per 1,000
        assert sample(r, "llm_cost_total", team="alpha", model="deepseek-flash",
                      currency="CNY", tier="peak") == float(Decimal("0.0172912"))
        # pro at peak: 640 x 0.3 + 360 x 9 + 50 x 27 per million
        assert sample(r, "llm_cost_total", team="beta", model="deepseek-v4-pro",
                      currency="CNY", tier="peak") == float(Decimal("0.004782"))
        assert sample(r, "llm_cache_savings_total", team="alpha", model="deepseek-flash",
                      currency="CNY") == float(Decimal("0.0025088"))
        assert sample(r, "llm_usage_missing_total", team="beta", model="deepseek-flash",
                      reason="upstream_cut") == 1
        assert sample(r, "llm_unpriced_requests_total", model="other") == 1
        assert sample(r, "llm_upstream_errors_total", reason="http_429") == 1
        assert sample(r, "llm_upstream_errors_total", reason="upstream_cut") == 1
        assert sample(r, "llm_inflight_requests", team="alpha") == 0
        assert sample(r, "llm_request_duration_seconds_count", team="alpha",
                      model="deepseek-flash", stream="true") == 1
        assert sample(r, "llm_proxy_overhead_seconds_count") == 6
        spend_alpha = Decimal("0.0172912")
        assert sample(r, "llm_team_spend", team="alpha", period="day", currency="CNY") == float(
            spend_alpha)
        assert sample(r, "llm_team_spend", team="alpha", period="month",
                      currency="CNY") == float(spend_alpha)
        names = {family.name for family in text_string_to_metric_families(scrape)}
        assert {"llm_requests", "llm_tokens", "llm_cost", "llm_team_spend",
                "llm_proxy_overhead_seconds", "llm_inflight_requests"} <= names
    finally:
        writer.close()


def _series(registry: CollectorRegistry) -> int:
    return sum(len(metric.samples) for metric in registry.collect())


async def test_random_models_and_paths_leave_series_flat(fake: FakeDeepSeek, book: PriceBook
                                                         ) -> None:
    rng = random.Random(7)  # noqa: S311 - reproducible noise, not a secret

    def noise() -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits + "-._/", k=12))

    async with running_proxy(fake.base_url, book) as proxy, httpx.AsyncClient(
            base_url=proxy.url, headers=auth("alpha"),
            limits=httpx.Limits(max_connections=32)) as http:
        for model in ("deepseek-flash", "unknown-warmup"):
            await http.post("/chat/completions", json={**CHAT, "model": model})
        await proxy.sink.wait_for(2)
        before = _series(proxy.registry)
        semaphore = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with semaphore:
                if i % 2:
                    await http.post("/chat/completions", json={**CHAT, "model": noise()})
                else:
                    await http.post("/" + noise(), json=CHAT)

        await asyncio.gather(*(one(i) for i in range(10_000)))
        await proxy.sink.wait_for(5002)
        assert _series(proxy.registry) == before
    assert len(fake.requests) == 5002


async def test_spend_survives_a_restart(book: PriceBook, tmp_path: Path) -> None:
    """`llm_team_spend` is read from the ledger, so a new process reports the same spend."""
    path = tmp_path / "ledger.sqlite3"
    async with running_fake() as fake:
        for _ in range(2):
            fake.enqueue(Reply(usage=USAGE))
            store = SQLiteLedger(path, ZoneInfo("Asia/Shanghai"))
            writer = LedgerWriter(store)
            try:
                async with running_proxy(fake.base_url, book, sink=writer,
                                         spend=store.spend) as proxy, \
                        httpx.AsyncClient(base_url=proxy.url, headers=auth("alpha")) as http:
                    before = sample(proxy.registry, "llm_team_spend", team="alpha", period="day",
                                    currency="USD")
                    await http.post("/chat/completions", json=CHAT)
                    await proxy.sink.wait_for(1)
                    await asyncio.to_thread(writer.flush)
                    after = sample(proxy.registry, "llm_team_spend", team="alpha",
                                   period="day", currency="USD")
            finally:
                writer.close()
    assert before == float(Decimal("0.00017184"))
    assert after == float(Decimal("0.00034368"))


def test_spend_periods_follow_the_billing_timezone(tmp_path: Path, book: PriceBook) -> None:
    from proxy.metering import CallMeter, build_record
    from proxy.metrics import ProxyMetrics
    from proxy.usage import parse_usage

    store = SQLiteLedger(tmp_path / "l.sqlite3", ZoneInfo("Asia/Shanghai"))
    records = []
    for instant in ("2026-10-31T15:59:59Z", "2026-10-31T16:00:00Z", "2026-11-01T15:59:00Z"):
        meter = CallMeter(request_id=instant, team="alpha", key_id="k_00000000", endpoint="chat",
                          stream=False, model_requested="deepseek-flash", payload={},
                          started_at=datetime.fromisoformat(instant), outcome="complete")
        meter.reported = parse_usage(USAGE)
        records.append(build_record(meter, meter.started_at, book, "request_start"))
    store.write([], records)
    now = datetime(2026, 11, 1, 15, 59, 30, tzinfo=UTC)  # still 2026-11-01 in Beijing
    registry = CollectorRegistry()
    ProxyMetrics(registry, teams=["alpha", "beta"], models=book.models, tools=book.tool_fees,
                 currencies=book.currencies, spend=store.spend,
                 billing_timezone=ZoneInfo("Asia/Shanghai"), clock=lambda: now)
    costs = [r.costs["CNY"] for r in records]
    assert sample(registry, "llm_team_spend", team="alpha", period="day",
                  currency="CNY") == float(costs[1] + costs[2])
    assert sample(registry, "llm_team_spend", team="alpha", period="month",
                  currency="CNY") == float(costs[1] + costs[2])
    assert sample(registry, "llm_team_spend", team="beta", period="month", currency="USD") == 0
    store.close()
    assert PEAK.tzinfo is UTC
