"""The metrics contract: exact values after scripted traffic, bounded series, spend from the
ledger."""

from __future__ import annotations

import asyncio
import random
import string
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy.attribution import NO_TAGS
from proxy.config import Limits
from proxy.ledger.store import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.metering import CallMeter, build_record
from proxy.metrics import (
    DURATION_BUCKETS,
    OVERHEAD_BUCKETS,
    TTFT_BUCKETS,
    CallTotals,
    MetricSources,
    ProxyMetrics,
)
from proxy.metrics.sharing import SharedTotals
from proxy.outcome import Failure
from proxy.pricing import PriceBook, Pricer
from proxy.records import Outcome, UsageRecord
from tests.support.calls import call_meter
from tests.support.fake_deepseek import FakeDeepSeek, running_fake
from tests.support.fake_deepseek_shapes import Reply
from tests.support.proxy_harness import PEAK, RunningProxy, running_proxy
from tests.support.requests import CHAT, USAGE, auth

LOOSE = Limits()  # bounds far above these records' usage: nothing is cut


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_metric_values_after_scripted_traffic(
    fake: FakeDeepSeek, book: PriceBook, tmp_path: Path
) -> None:
    store = SQLiteLedger(tmp_path / "ledger.sqlite3", ZoneInfo("Asia/Shanghai"))
    writer = LedgerWriter(store, flush_interval=0.01)
    fake.enqueue(
        Reply(usage=USAGE),
        Reply(usage=USAGE, server_tool_use={"web_search_requests": 3}),
        Reply(usage=USAGE),
        Reply(status=429),
        Reply(usage=USAGE, cut_after_events=2),
    )
    try:
        async with (
            running_proxy(fake.base_url, book, sink=writer, spend=store.spend) as proxy,
            httpx.AsyncClient(base_url=proxy.url) as http,
        ):
            await http.post("/chat/completions", json=CHAT, headers=auth("alpha"))
            await http.post(
                "/chat/completions", json={**CHAT, "stream": True}, headers=auth("alpha")
            )
            await http.post(
                "/v1/chat/completions",
                json={**CHAT, "model": "deepseek-v4-pro"},
                headers=auth("beta"),
            )
            await http.post("/chat/completions", json=CHAT, headers=auth("beta"))
            await http.post(
                "/chat/completions", json={**CHAT, "stream": True}, headers=auth("beta")
            )
            await http.post(
                "/chat/completions", json={**CHAT, "model": "my-own-model"}, headers=auth("beta")
            )
            await proxy.sink.wait_for(6)
            await asyncio.to_thread(writer.flush)
            scrape = (await http.get("/metrics")).text
        r = proxy.registry
        assert (
            sample(
                r,
                "llm_requests_total",
                team="alpha",
                model="deepseek-flash",
                endpoint="chat",
                status="200",
            )
            == 2
        )
        assert (
            sample(
                r,
                "llm_requests_total",
                team="beta",
                model="deepseek-flash",
                endpoint="chat",
                status="429",
            )
            == 1
        )
        assert (
            sample(
                r, "llm_requests_total", team="beta", model="other", endpoint="chat", status="200"
            )
            == 1
        )
        assert (
            sample(
                r, "llm_tokens_total", team="alpha", model="deepseek-flash", type="input_cache_hit"
            )
            == 1280
        )
        assert (
            sample(
                r, "llm_tokens_total", team="alpha", model="deepseek-flash", type="input_cache_miss"
            )
            == 720
        )
        assert (
            sample(r, "llm_tokens_total", team="alpha", model="deepseek-flash", type="output")
            == 100
        )
        assert sample(r, "llm_reasoning_tokens_total", team="alpha", model="deepseek-flash") == 40
        assert (
            sample(r, "llm_tool_calls_total", team="alpha", model="deepseek-flash", tool="search")
            == 3
        )
        # two flash calls at peak: 2 x 0.0011456 CNY plus 3 searches at 5 CNY per 1,000
        assert sample(
            r, "llm_cost_total", team="alpha", model="deepseek-flash", currency="CNY", tier="peak"
        ) == float(Decimal("0.0172912"))
        # pro at peak: 640 x 0.3 + 360 x 9 + 50 x 27 per million
        assert sample(
            r, "llm_cost_total", team="beta", model="deepseek-v4-pro", currency="CNY", tier="peak"
        ) == float(Decimal("0.004782"))
        assert sample(
            r, "llm_cache_savings_total", team="alpha", model="deepseek-flash", currency="CNY"
        ) == float(Decimal("0.0025088"))
        assert (
            sample(
                r,
                "llm_usage_missing_total",
                team="beta",
                model="deepseek-flash",
                reason="upstream_cut",
            )
            == 1
        )
        assert sample(r, "llm_unpriced_requests_total", model="other") == 1
        assert sample(r, "llm_upstream_errors_total", reason="http_429") == 1
        assert sample(r, "llm_upstream_errors_total", reason="upstream_cut") == 1
        assert sample(r, "llm_inflight_requests", team="alpha") == 0
        assert (
            sample(
                r,
                "llm_request_duration_seconds_count",
                team="alpha",
                model="deepseek-flash",
                stream="true",
            )
            == 1
        )
        assert sample(r, "llm_proxy_overhead_seconds_count") == 6
        spend_alpha = Decimal("0.0172912")
        assert sample(r, "llm_team_spend", team="alpha", period="day", currency="CNY") == float(
            spend_alpha
        )
        assert sample(r, "llm_team_spend", team="alpha", period="month", currency="CNY") == float(
            spend_alpha
        )
        names = {family.name for family in text_string_to_metric_families(scrape)}
        assert {
            "llm_requests",
            "llm_tokens",
            "llm_cost",
            "llm_team_spend",
            "llm_proxy_overhead_seconds",
            "llm_inflight_requests",
        } <= names
    finally:
        writer.close()


def _series(registry: CollectorRegistry) -> int:
    return sum(len(metric.samples) for metric in registry.collect())


async def test_random_models_and_paths_leave_series_flat(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    rng = random.Random(7)  # noqa: S311 - reproducible noise, not a secret

    def noise() -> str:
        return "".join(rng.choices(string.ascii_letters + string.digits + "-._/", k=12))

    async with httpx.AsyncClient(
        base_url=proxy.url, headers=auth("alpha"), limits=httpx.Limits(max_connections=32)
    ) as http:
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
                async with (
                    running_proxy(fake.base_url, book, sink=writer, spend=store.spend) as proxy,
                    httpx.AsyncClient(base_url=proxy.url, headers=auth("alpha")) as http,
                ):
                    before = sample(
                        proxy.registry, "llm_team_spend", team="alpha", period="day", currency="USD"
                    )
                    await http.post("/chat/completions", json=CHAT)
                    await proxy.sink.wait_for(1)
                    await asyncio.to_thread(writer.flush)
                    after = sample(
                        proxy.registry, "llm_team_spend", team="alpha", period="day", currency="USD"
                    )
            finally:
                writer.close()
    assert before == float(Decimal("0.00017184"))
    assert after == float(Decimal("0.00034368"))


def test_spend_periods_follow_the_billing_timezone(tmp_path: Path, book: PriceBook) -> None:
    from proxy.usage import parse_usage

    store = SQLiteLedger(tmp_path / "l.sqlite3", ZoneInfo("Asia/Shanghai"))
    records = []
    for instant in ("2026-10-31T15:59:59Z", "2026-10-31T16:00:00Z", "2026-11-01T15:59:00Z"):
        meter = call_meter(instant, started_at=datetime.fromisoformat(instant), upstream_status=200)
        meter.reported = parse_usage(USAGE)
        records.append(build_record(meter, meter.started_at, Pricer(book), "request_start", LOOSE))
    store.write([], records)
    now = datetime(2026, 11, 1, 15, 59, 30, tzinfo=UTC)  # still 2026-11-01 in Beijing
    registry = CollectorRegistry()
    sources = MetricSources(
        teams=["alpha", "beta"],
        book=book,
        billing_timezone=ZoneInfo("Asia/Shanghai"),
        clock=lambda: now,
        spend=store.spend,
    )
    ProxyMetrics(registry, sources)
    costs = [r.costs["CNY"] for r in records]
    assert sample(registry, "llm_team_spend", team="alpha", period="day", currency="CNY") == float(
        costs[1] + costs[2]
    )
    assert sample(
        registry, "llm_team_spend", team="alpha", period="month", currency="CNY"
    ) == float(costs[1] + costs[2])
    assert sample(registry, "llm_team_spend", team="beta", period="month", currency="USD") == 0
    store.close()
    assert PEAK.tzinfo is UTC


FACTS: dict[str, tuple[Failure | None, bool]] = {
    "complete": (None, False),
    "upstream_error": (None, False),
    "upstream_cut": ("cut", False),
    "timeout": ("timeout", False),
    "connect_error": ("unreachable", False),
    "bad_response": ("unreadable", False),
    "client_disconnected": (None, True),
}
"""What the relay records for each outcome (`proxy.outcome.classify` turns it back)."""


def _records(book: PriceBook, count: int, seed: int) -> list[UsageRecord]:
    """Calls of every shape the metrics tell apart, with durations on bucket bounds too."""
    rng = random.Random(seed)  # noqa: S311 - reproducible traffic, not a secret
    records = []
    for i in range(count):
        started = PEAK + timedelta(seconds=i)
        outcomes: list[Outcome] = [
            "complete",
            "complete",
            "upstream_error",
            "upstream_cut",
            "timeout",
            "connect_error",
            "bad_response",
            "client_disconnected",
        ]
        outcome = rng.choice(outcomes)
        meter = CallMeter(
            request_id=f"r{i}",
            team=rng.choice(["alpha", "beta"]),
            key_id="k_00000000",
            endpoint=rng.choice(["chat", "fim"]),
            stream=rng.random() < 0.5,
            model_requested=rng.choice(["deepseek-flash", "deepseek-v4-pro", "someone-else"]),
            tags=NO_TAGS,
            end_user=None,
            payload={"messages": [{"role": "user", "content": "hi " * i}]},
            started_at=started,
            prompt_bound=LOOSE.max_context_tokens,
            output_bound=LOOSE.max_output_tokens,
        )
        meter.failure, meter.client_left = FACTS[outcome]
        meter.upstream_status = {
            "upstream_error": rng.choice([400, 429, 500]),
            "connect_error": None,
            "timeout": None,
        }.get(outcome, 200)
        meter.client_status = rng.choice(  # what the relay recorded it sent; None: nothing
            [meter.upstream_status or (504 if outcome == "timeout" else 502), None]
        )
        if outcome in ("complete", "client_disconnected") or rng.random() < 0.2:
            usage = {
                **USAGE,
                "server_tool_use": {
                    "web_search_requests": rng.randint(0, 2),
                    "mystery_requests": rng.randint(0, 1),
                },
            }
            meter.take_usage(
                usage if rng.random() < 0.9 else {"prompt_tokens": -1},
                {"web_search_requests": "search", "mystery_requests": "mystery"},
            )
        meter.output_chunks = rng.randint(0, 3)
        if rng.random() < 0.7:
            meter.first_byte_at = started + timedelta(seconds=rng.choice([0.01, 0.3, 2, 700]))
        elapsed = rng.choice([0.05, 0.051, 1, 2.5, 7, 1800, 5000])
        records.append(
            build_record(
                meter, started + timedelta(seconds=elapsed), Pricer(book), "request_start", LOOSE
            )
        )
    return records


def _reference(
    registry: CollectorRegistry, records: list[UsageRecord], overheads: list[float], book: PriceBook
) -> None:
    """The same traffic through prometheus_client's own Counter and Histogram."""

    def model(name: str) -> str:
        return name if name in book.models else "other"

    requests = Counter(
        "llm_requests", "", ["team", "model", "endpoint", "status"], registry=registry
    )
    tokens = Counter("llm_tokens", "", ["team", "model", "type"], registry=registry)
    reasoning = Counter("llm_reasoning_tokens", "", ["team", "model"], registry=registry)
    tools = Counter("llm_tool_calls", "", ["team", "model", "tool"], registry=registry)
    duration = Histogram(
        "llm_request_duration_seconds",
        "",
        ["team", "model", "stream"],
        buckets=DURATION_BUCKETS,
        registry=registry,
    )
    ttft = Histogram(
        "llm_time_to_first_token_seconds",
        "",
        ["team", "model"],
        buckets=TTFT_BUCKETS,
        registry=registry,
    )
    overhead = Histogram(
        "llm_proxy_overhead_seconds", "", buckets=OVERHEAD_BUCKETS, registry=registry
    )
    missing = Counter("llm_usage_missing", "", ["team", "model", "reason"], registry=registry)
    unpriced = Counter("llm_unpriced_requests", "", ["model"], registry=registry)
    errors = Counter("llm_upstream_errors", "", ["reason"], registry=registry)
    for record, spent in zip(records, overheads, strict=True):
        team, name = record.team, model(record.model_requested)
        status = "none" if record.client_status is None else str(record.client_status)
        requests.labels(team, name, record.endpoint, status).inc()
        if record.cache_hit_tokens is not None:
            tokens.labels(team, name, "input_cache_hit").inc(record.cache_hit_tokens)
            tokens.labels(team, name, "input_cache_miss").inc(record.cache_miss_tokens or 0)
            tokens.labels(team, name, "output").inc(record.output_tokens or 0)
            reasoning.labels(team, name).inc(record.reasoning_tokens or 0)
        for tool, count in record.tool_calls.items():
            tools.labels(team, name, tool if tool in book.tool_fees else "other").inc(count)
        duration.labels(team, name, "true" if record.stream else "false").observe(
            (record.ended_at - record.started_at).total_seconds()
        )
        if record.first_byte_at is not None:
            ttft.labels(team, name).observe(
                (record.first_byte_at - record.started_at).total_seconds()
            )
        overhead.observe(spent)
        if record.usage_source in ("estimated", "unknown"):
            reason = "malformed_usage" if "malformed_usage" in record.flags else record.outcome
            missing.labels(team, name, reason).inc()
        if not record.priced and record.usage_source != "none":
            unpriced.labels(name).inc()
        if record.outcome == "upstream_error":
            errors.labels(f"http_{record.upstream_status}").inc()
        elif record.outcome in ("upstream_cut", "timeout", "connect_error", "bad_response"):
            errors.labels(record.outcome).inc()


def _values(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
        and s.name.startswith(
            (
                "llm_requests",
                "llm_tokens",
                "llm_reasoning",
                "llm_tool",
                "llm_request_dur",
                "llm_time_to",
                "llm_proxy",
                "llm_usage",
                "llm_unpriced",
                "llm_upstream",
            )
        )
    }


def test_call_totals_export_what_prometheus_client_would(book: PriceBook) -> None:
    """`CallTotals` replaces prometheus_client's Counter and Histogram on the request path:
    the same traffic must give the same series and values, bucket bounds included."""
    records = _records(book, 400, seed=3)
    overheads = [(0.00005, 0.00007, 0.001, 0.2)[i % 4] for i in range(400)]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    sources = MetricSources(
        teams=["alpha", "beta"],
        book=book,
        billing_timezone=ZoneInfo("Asia/Shanghai"),
        clock=lambda: PEAK,
    )
    metrics = ProxyMetrics(ours, sources)
    for record, spent in zip(records, overheads, strict=True):
        metrics.observe(record, spent)
    _reference(theirs, records, overheads, book)
    expected = _values(theirs)
    assert {name for name, _ in expected} >= {
        "llm_tool_calls_total",
        "llm_usage_missing_total",
        "llm_unpriced_requests_total",
        "llm_upstream_errors_total",
        "llm_time_to_first_token_seconds_bucket",
    }
    _same(_values(ours), expected)


def _same(got: dict[Any, float], expected: dict[Any, float]) -> None:
    """Equal series and values; histogram sums are float sums added in another order, so they
    match to rounding only (counts, buckets and money are exact)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key[0].endswith("_sum"):
            assert got[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert got[key] == value, key


def test_workers_totals_add_up(book: PriceBook, tmp_path: Path) -> None:
    """Two workers' totals, one published as a file: a scrape of either sums both exactly."""
    records = _records(book, 300, seed=5)
    calls_one, calls_two, alone = CallTotals(), CallTotals(), CallTotals()
    one = SharedTotals(calls_one, tmp_path, worker="1")
    two = SharedTotals(calls_two, tmp_path, worker="2")
    for i, record in enumerate(records):
        model = record.model_requested if record.model_requested in book.models else "other"
        (calls_one if i % 3 else calls_two).observe(record, model, dict(record.tool_calls), 0.001)
        alone.observe(record, model, dict(record.tool_calls), 0.001)
    two.dump()
    one.dump()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["calls-1.json", "calls-2.json"]
    for totals in (one, two):
        _same(_samples(totals), _samples(alone))
    cost = {tuple(k): v for k, v in alone.tables()["llm_cost_total"].items()}
    assert sum(cost.values(), Decimal(0)) == sum(
        (sum(r.costs.values(), Decimal(0)) for r in records), Decimal(0)
    )


def _samples(collector: Collector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in collector.collect()
        for s in f.samples
    }


async def test_inflight_gauge_counts_calls_in_progress(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """Read from the admission counts at scrape time: 1 while a stream is open, 0 after."""
    fake.enqueue(Reply(usage=USAGE, content=["a", "b", "c"], chunk_interval=0.3))
    async with httpx.AsyncClient(base_url=proxy.url) as http:

        async def gauge() -> dict[str, float]:
            text = (await http.get("/metrics")).text
            return {
                s.labels["team"]: s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "llm_inflight_requests"
            }

        assert await gauge() == {"alpha": 0, "beta": 0}
        async with http.stream(
            "POST", "/chat/completions", json={**CHAT, "stream": True}, headers=auth("alpha")
        ) as response:
            chunks = response.aiter_bytes()
            await anext(chunks)
            assert await gauge() == {"alpha": 1, "beta": 0}
            async for _ in chunks:
                pass
        await proxy.sink.wait_for(1)
        assert await gauge() == {"alpha": 0, "beta": 0}
