"""`ProxyMetrics.apply`: after a reload, /metrics follows the new teams, budgets and price book,
and no counter resets; in one process, and in a worker of ``serve --workers N`` (its figures
in the shared folder, where prometheus_client cannot forget a series)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry

from proxy.config import Budget, Limits
from proxy.ledger.store import SpendRow
from proxy.metering import build_record
from proxy.metrics import MetricSources, ProxyMetrics
from proxy.pricing import PriceBook, Pricer
from proxy.records import UsageRecord
from tests.support.calls import call_meter
from tests.support.exposition import Labels, series
from tests.support.proxy_harness import PEAK

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEXT_YEAR = datetime(2027, 3, 1, 1, 30, tzinfo=UTC)
"""A Monday in a year the shipped book's holiday calendar does not cover."""
USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 20,
    "prompt_cache_hit_tokens": 60,
    "prompt_cache_miss_tokens": 40,
    "server_tool_use": {"web_search_requests": 2},
}
COUNTERS = (
    "llm_requests_total",
    "llm_tokens_total",
    "llm_tool_calls_total",
    "llm_cost_total",
    "llm_unpriced_requests_total",
    "llm_request_duration_seconds_count",
    "llm_budget_refusals_total",
)


def month(team: str, amount: int, *soft: int) -> Budget:
    return Budget(team, "month", Decimal(amount), "CNY", tuple(map(Decimal, soft)), hard=False)


BEFORE = ("alpha", "beta"), (month("alpha", 100, 50, 80), month("beta", 30))
AFTER = ("alpha", "gamma"), (month("alpha", 200, 90), month("gamma", 10))
"""The reload drops team beta and its budget, adds gamma, and changes alpha's budget."""


def reloaded(book: PriceBook) -> PriceBook:
    """The shipped book as a reload may bring it: deepseek-chat dropped, a new model
    deepseek-v5, the search tool dropped, CNY only, and the holiday calendar extended to
    2027."""
    models = {name: eras for name, eras in book.models.items() if name != "deepseek-chat"}
    starts = {name: s for name, s in book.model_starts.items() if name != "deepseek-chat"}
    return dataclasses.replace(
        book,
        currencies=("CNY",),
        models={**models, "deepseek-v5": book.models["deepseek-flash"]},
        model_starts={**starts, "deepseek-v5": book.model_starts["deepseek-flash"]},
        tool_fees={name: v for name, v in book.tool_fees.items() if name != "search"},
        tool_fee_starts={name: s for name, s in book.tool_fee_starts.items() if name != "search"},
        calendars={
            name: dataclasses.replace(calendar, years=calendar.years | {2027})
            for name, calendar in book.calendars.items()
        },
        digest="0" * 64,
    )


class World:
    """What the metrics read when Prometheus scrapes, set by the test."""

    def __init__(self) -> None:
        self.now = PEAK
        self.in_flight: dict[str, int] = {}
        self.spend: list[SpendRow] = []

    def sources(
        self, book: PriceBook, config: tuple[Sequence[str], Sequence[Budget]]
    ) -> MetricSources:
        teams, budgets = config
        return MetricSources(
            teams=teams,
            book=book,
            billing_timezone=SHANGHAI,
            clock=lambda: self.now,
            budgets=budgets,
            spend=lambda first, last: self.spend,
            in_flight=lambda: self.in_flight,
        )


Build = Callable[[MetricSources], ProxyMetrics]


@pytest.fixture
def build(shared_dir: Path | None) -> Build:
    """Builds the metrics of one process, or of worker 1 of ``serve --workers N``."""
    return lambda sources: ProxyMetrics(CollectorRegistry(), sources, shared_dir)


def call(book: PriceBook, team: str, model: str) -> UsageRecord:
    """A complete call with usage and two web searches."""
    meter = call_meter(team=team, model=model, upstream_status=200, client_status=200)
    meter.take_usage(USAGE, {"web_search_requests": "search"})
    return build_record(meter, PEAK + timedelta(seconds=1), Pricer(book), "request_start", Limits())


def labels(**values: str) -> Labels:
    return tuple(sorted(values.items()))


def test_counters_keep_their_values(build: Build, book: PriceBook) -> None:
    world = World()
    metrics = build(world.sources(book, BEFORE))
    for team, model in (("alpha", "deepseek-flash"), ("alpha", "deepseek-flash"), ("beta", "x")):
        metrics.observe(call(book, team, model), 0.0001)
    metrics.budget_refusals.labels("beta").inc(3)
    text = metrics.exposition()
    before = {name: series(text, name) for name in COUNTERS}
    assert before["llm_requests_total"] == {
        labels(team="alpha", model="deepseek-flash", endpoint="chat", status="200"): 2,
        labels(team="beta", model="other", endpoint="chat", status="200"): 1,
    }
    assert before["llm_budget_refusals_total"] == {
        labels(team="alpha"): 0,
        labels(team="beta"): 3,
    }

    metrics.apply(world.sources(reloaded(book), AFTER))
    text = metrics.exposition()
    after = {name: series(text, name) for name in COUNTERS}
    # Beta's counters stay, unchanged; gamma's refusals start at 0.
    refusals = after.pop("llm_budget_refusals_total")
    assert refusals == {**before.pop("llm_budget_refusals_total"), labels(team="gamma"): 0}
    assert after == before
    assert all(after.values())


def test_new_teams_appear_and_removed_teams_gauges_go(build: Build, book: PriceBook) -> None:
    world = World()
    world.in_flight = {"alpha": 1, "beta": 2}
    day = PEAK.astimezone(SHANGHAI).date()
    world.spend = [
        SpendRow("alpha", day, "CNY", Decimal("1.5")),
        SpendRow("beta", day, "CNY", Decimal("0.25")),
    ]
    metrics = build(world.sources(book, BEFORE))
    text = metrics.exposition()
    assert series(text, "llm_inflight_requests") == {
        labels(team="alpha"): 1,
        labels(team="beta"): 2,
    }
    spend = series(text, "llm_team_spend")
    assert spend[labels(team="beta", period="day", currency="CNY")] == 0.25

    # A call of beta still runs across the reload: its team is gone all the same.
    metrics.apply(world.sources(book, AFTER))
    text = metrics.exposition()
    assert series(text, "llm_inflight_requests") == {
        labels(team="alpha"): 1,
        labels(team="gamma"): 0,
    }
    spend = series(text, "llm_team_spend")
    assert {dict(key)["team"] for key in spend} == {"alpha", "gamma"}
    assert len(spend) == 2 * 3 * 2  # teams, periods, currencies
    assert spend[labels(team="alpha", period="month", currency="CNY")] == 1.5
    assert spend[labels(team="gamma", period="day", currency="CNY")] == 0


def test_budgets_are_the_running_configurations(build: Build, book: PriceBook) -> None:
    world = World()
    metrics = build(world.sources(book, BEFORE))
    text = metrics.exposition()
    assert series(text, "llm_team_budget") == {
        labels(team="alpha", period="month", currency="CNY"): 100,
        labels(team="beta", period="month", currency="CNY"): 30,
    }
    assert series(text, "llm_team_budget_threshold") == {
        labels(team="alpha", period="month", currency="CNY", threshold="50"): 50,
        labels(team="alpha", period="month", currency="CNY", threshold="80"): 80,
    }

    metrics.apply(world.sources(book, AFTER))
    text = metrics.exposition()
    assert series(text, "llm_team_budget") == {
        labels(team="alpha", period="month", currency="CNY"): 200,
        labels(team="gamma", period="month", currency="CNY"): 10,
    }
    assert series(text, "llm_team_budget_threshold") == {
        labels(team="alpha", period="month", currency="CNY", threshold="90"): 180,
    }


def test_model_and_tool_labels_follow_the_new_book(build: Build, book: PriceBook) -> None:
    world = World()
    metrics = build(world.sources(book, BEFORE))
    assert (metrics.model("deepseek-chat"), metrics.model("deepseek-v5")) == (
        "deepseek-chat",
        "other",
    )
    metrics.observe(call(book, "alpha", "deepseek-v5"), 0.0001)

    metrics.apply(world.sources(reloaded(book), BEFORE))
    assert (metrics.model("deepseek-chat"), metrics.model("deepseek-v5")) == (
        "other",
        "deepseek-v5",
    )
    metrics.observe(call(book, "alpha", "deepseek-v5"), 0.0001)
    assert series(metrics.exposition(), "llm_tool_calls_total") == {
        labels(team="alpha", model="other", tool="search"): 2,  # before the reload
        labels(team="alpha", model="deepseek-v5", tool="other"): 2,
    }


def test_spend_currencies_and_calendars_follow_the_new_book(build: Build, book: PriceBook) -> None:
    world = World()
    world.now = NEXT_YEAR
    day = NEXT_YEAR.astimezone(SHANGHAI).date()
    world.spend = [
        SpendRow("alpha", day, "CNY", Decimal("1.5")),
        SpendRow("alpha", day, "USD", Decimal("0.2")),
    ]
    metrics = build(world.sources(book, BEFORE))
    text = metrics.exposition()
    assert {dict(key)["currency"] for key in series(text, "llm_team_spend")} == {"CNY", "USD"}
    assert series(text, "llm_holiday_calendar_missing") == {
        labels(schedule="night-discount"): 0,
        labels(schedule="peak-hours"): 1,
    }

    metrics.apply(world.sources(reloaded(book), BEFORE))
    text = metrics.exposition()
    spend = series(text, "llm_team_spend")
    assert {dict(key)["currency"] for key in spend} == {"CNY"}
    assert spend[labels(team="alpha", period="day", currency="CNY")] == 1.5
    assert series(text, "llm_holiday_calendar_missing") == {
        labels(schedule="night-discount"): 0,
        labels(schedule="peak-hours"): 0,
    }
