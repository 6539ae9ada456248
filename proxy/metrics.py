"""Every Prometheus metric the proxy exports, built in one place on an injected registry.

This is the public contract dashboards and alerts rely on (documented in ``docs/metrics.md``).
Label values come only from bounded, server-side sets: teams from the config, models and tools
from the price book (anything else is ``other``), tiers as the price book names them, statuses
as numbers. A client sending random model names cannot grow the number of series.

Money is exact until the scrape: costs and savings are summed as `Decimal` and converted to a
float once, when Prometheus reads them (`_MoneyCollector`), so the exported value is the float
nearest the exact total rather than the drift of many float additions. `llm_team_spend` is read
from the ledger at scrape time, so it is right after a restart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy.config import Budget
from proxy.ledger.store import SpendReader
from proxy.periods import PERIODS, period_start
from proxy.pricing import PriceBook
from proxy.pricing.engine import schedule_version_at, to_micros
from proxy.records import UsageRecord

OTHER = "other"
_Labelled = Counter | Gauge | Histogram
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)



class ProxyMetrics:
    """The proxy's metrics; `observe` takes one finished record."""

    def __init__(self, registry: CollectorRegistry, *, teams: Sequence[str],
                 models: Collection[str], tools: Collection[str], currencies: Sequence[str],
                 spend: SpendReader | None, billing_timezone: ZoneInfo,
                 clock: Callable[[], datetime], budgets: Sequence[Budget] = (),
                 book: PriceBook | None = None, shared_dir: Path | None = None) -> None:
        """`registry` is what ``/metrics`` exports. With `shared_dir` (``serve --workers N``,
        prometheus_client's multiprocess mode), the standard metrics live in files there and
        `registry` exports the sum over all workers."""
        self._models = frozenset(models)
        self._tools = frozenset(tools)
        self._children: dict[tuple[object, ...], Any] = {}
        exported = registry
        if shared_dir is not None:
            MultiProcessCollector(exported, path=str(shared_dir))  # type: ignore[no-untyped-call]
            registry = CollectorRegistry()  # the metric objects; their values are in the files
        self.requests = Counter(
            "llm_requests_total", "Calls dispatched to DeepSeek, by the HTTP status returned",
            ["team", "model", "endpoint", "status"], registry=registry)
        self.tokens = Counter(
            "llm_tokens_total", "Tokens billed (reported, or estimated when usage was lost)",
            ["team", "model", "type"], registry=registry)
        self.reasoning = Counter(
            "llm_reasoning_tokens_total", "Reasoning tokens (already inside output tokens)",
            ["team", "model"], registry=registry)
        self.tool_calls = Counter(
            "llm_tool_calls_total", "Server-side tool calls billed (web search, fetch)",
            ["team", "model", "tool"], registry=registry)
        self.duration = Histogram(
            "llm_request_duration_seconds", "From request received to response finished",
            ["team", "model", "stream"], buckets=DURATION_BUCKETS, registry=registry)
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds", "From request received to DeepSeek's first data "
            "(keep-alives excluded)", ["team", "model"], buckets=TTFT_BUCKETS, registry=registry)
        self.overhead = Histogram(
            "llm_proxy_overhead_seconds", "Time spent in the proxy itself per call, waiting on "
            "DeepSeek and on the client excluded", buckets=OVERHEAD_BUCKETS, registry=registry)
        self.usage_missing = Counter(
            "llm_usage_missing_total", "Calls without reported usage (estimated or unknown)",
            ["team", "model", "reason"], registry=registry)
        self.unpriced = Counter(
            "llm_unpriced_requests_total", "Calls the price book could not price",
            ["model"], registry=registry)
        self.upstream_errors = Counter(
            "llm_upstream_errors_total", "DeepSeek errors, cuts, timeouts and connect failures",
            ["reason"], registry=registry)
        self.inflight = Gauge(
            "llm_inflight_requests", "Calls in progress", ["team"], registry=registry,
            multiprocess_mode="livesum")
        self.budget_refusals = Counter(
            "llm_budget_refusals_total", "Calls refused (HTTP 402) because of a hard budget",
            ["team"], registry=registry)
        budget = Gauge("llm_team_budget", "A team's budget for a billing period",
                       ["team", "period", "currency"], registry=registry,
                       multiprocess_mode="max")
        threshold = Gauge(
            "llm_team_budget_threshold", "Spend at which a soft budget threshold is crossed; "
            "`threshold` is the percentage", ["team", "period", "currency", "threshold"],
            registry=registry, multiprocess_mode="max")
        for entry in budgets:
            budget.labels(entry.team, entry.period, entry.currency).set(float(entry.amount))
            for percent in entry.soft:
                threshold.labels(entry.team, entry.period, entry.currency,
                                 format(percent.normalize(), "f")).set(
                    float(entry.amount * percent / 100))
        for team in teams:
            self.budget_refusals.labels(team)
        self.money = _MoneyCollector(shared_dir)
        exported.register(self.money)
        if book is not None:
            exported.register(_CalendarCollector(book, clock))
        if spend is not None:
            exported.register(_SpendCollector(spend, teams, currencies, billing_timezone,
                                              clock))
        for team in teams:
            self.inflight.labels(team).set(0)

    def model(self, name: str) -> str:
        return name if name in self._models else OTHER

    def child(self, metric: _Labelled, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: prometheus_client validates and locks on every
        `labels()` call, and every request makes about ten of them. Label values come from
        bounded sets, so the cache is bounded too."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe(self, record: UsageRecord, overhead: float) -> None:
        child = self.child
        team, model = record.team, self.model(record.model_requested)
        child(self.requests, team, model, record.endpoint, str(_status(record))).inc()
        if record.cache_hit_tokens is not None:
            child(self.tokens, team, model, "input_cache_hit").inc(record.cache_hit_tokens)
            child(self.tokens, team, model, "input_cache_miss").inc(
                record.cache_miss_tokens or 0)
            child(self.tokens, team, model, "output").inc(record.output_tokens or 0)
            child(self.reasoning, team, model).inc(record.reasoning_tokens or 0)
        for tool, count in record.tool_calls.items():
            child(self.tool_calls, team, model, tool if tool in self._tools else OTHER).inc(count)
        self.money.add(team, model, record)
        child(self.duration, team, model, "true" if record.stream else "false").observe(
            (record.ended_at - record.started_at).total_seconds())
        if record.first_byte_at is not None:
            child(self.ttft, team, model).observe(
                (record.first_byte_at - record.started_at).total_seconds())
        self.overhead.observe(overhead)
        if record.usage_source in ("estimated", "unknown"):
            reason = "malformed_usage" if "malformed_usage" in record.flags else record.outcome
            child(self.usage_missing, team, model, reason).inc()
        if not record.priced and record.usage_source != "none":
            child(self.unpriced, model).inc()
        error = _upstream_error(record)
        if error is not None:
            child(self.upstream_errors, error).inc()


def _status(record: UsageRecord) -> int:
    """The status the client received: DeepSeek's, or the proxy's 502/504 when it had none."""
    if record.upstream_status is not None and not 300 <= record.upstream_status < 400:
        return record.upstream_status
    return 504 if record.outcome == "timeout" else 502


def _upstream_error(record: UsageRecord) -> str | None:
    if record.outcome == "upstream_error":
        return f"http_{record.upstream_status}"
    if record.outcome in ("upstream_cut", "timeout", "connect_error", "bad_response"):
        return record.outcome
    return None


class _MoneyCollector(Collector):
    """`llm_cost_total` and `llm_cache_savings_total`, summed exactly, exported as floats.

    With several workers each one writes its exact totals to ``money-<pid>.json`` in the shared
    folder (`dump`, every second and at exit), and a scrape adds the other workers' files to its
    own live totals, so the sum stays exact; other workers' figures lag by up to a second.
    """

    def __init__(self, shared_dir: Path | None = None) -> None:
        self.cost: dict[tuple[str, ...], Decimal] = {}
        self.savings: dict[tuple[str, ...], Decimal] = {}
        self._shared_dir = shared_dir
        self._own = f"money-{os.getpid()}.json"

    def dump(self) -> None:
        if self._shared_dir is None:
            return
        data = {"cost": [[*k, str(v)] for k, v in self.cost.items()],
                "savings": [[*k, str(v)] for k, v in self.savings.items()]}
        temporary = self._shared_dir / f".{self._own}.tmp"
        temporary.write_text(json.dumps(data), encoding="utf-8")
        temporary.replace(self._shared_dir / self._own)

    def _totals(self) -> tuple[dict[tuple[str, ...], Decimal], dict[tuple[str, ...], Decimal]]:
        cost, savings = dict(self.cost), dict(self.savings)
        if self._shared_dir is None:
            return cost, savings
        for path in self._shared_dir.glob("money-*.json"):
            if path.name == self._own:
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a worker is replacing its file right now; next scrape has it
            for target, rows in ((cost, data["cost"]), (savings, data["savings"])):
                for *key, amount in rows:
                    target[tuple(key)] = target.get(tuple(key), Decimal(0)) + Decimal(amount)
        return cost, savings

    def add(self, team: str, model: str, record: UsageRecord) -> None:
        tier = record.tier or OTHER
        for currency, amount in record.costs.items():
            key = (team, model, currency, tier)
            self.cost[key] = self.cost.get(key, Decimal(0)) + amount
        for currency, amount in record.cache_savings.items():
            skey = (team, model, currency)
            self.savings[skey] = self.savings.get(skey, Decimal(0)) + amount

    def collect(self) -> Iterator[Metric]:
        costs, savings_totals = self._totals()
        cost = CounterMetricFamily("llm_cost_total", "Spend as priced by the price book",
                                   labels=["team", "model", "currency", "tier"])
        for key, amount in sorted(costs.items()):
            cost.add_metric(list(key), float(amount))
        savings = CounterMetricFamily(
            "llm_cache_savings_total", "What cache-hit tokens would have cost at the cache-miss "
            "price, minus what they cost", labels=["team", "model", "currency"])
        for skey, amount in sorted(savings_totals.items()):
            savings.add_metric(list(skey), float(amount))
        yield cost
        yield savings


class _SpendCollector(Collector):
    """`llm_team_spend`: today's and this month's spend per team, from the ledger."""

    def __init__(self, spend: SpendReader, teams: Sequence[str], currencies: Sequence[str],
                 billing_timezone: ZoneInfo, clock: Callable[[], datetime]) -> None:
        self._spend = spend
        self._teams = teams
        self._currencies = currencies
        self._tz = billing_timezone
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        today = self._clock().astimezone(self._tz).date()
        starts = {period: period_start(today, period) for period in PERIODS}
        totals = {(team, period, currency): Decimal(0) for team in self._teams
                  for period in PERIODS for currency in self._currencies}
        for row in self._spend(min(starts.values()), today):
            for period, start in starts.items():
                key = (row.team, period, row.currency)
                if row.day >= start and key in totals:
                    totals[key] += row.amount
        gauge = GaugeMetricFamily(
            "llm_team_spend", "Spend in the current billing day, week (from Monday) or month, "
            "read from the ledger",
            labels=["team", "period", "currency"])
        for key, amount in totals.items():
            gauge.add_metric(list(key), float(amount))
        yield gauge


class _CalendarCollector(Collector):
    """`llm_holiday_calendar_missing`: 1 while a schedule's rule in force uses a holiday
    calendar that does not cover the current local year (its prices then follow the weekday
    rule and are flagged), so someone adds the new year's holidays before it matters."""

    def __init__(self, book: PriceBook, clock: Callable[[], datetime]) -> None:
        self._book = book
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        gauge = GaugeMetricFamily(
            "llm_holiday_calendar_missing", "1 if the schedule's rule in force lacks a holiday "
            "calendar for the current year", labels=["schedule"])
        for name in sorted(self._book.schedules):
            rule = schedule_version_at(self._book, name, to_micros(now))
            missing = 0.0
            if rule is not None and rule.holiday_calendar is not None:
                year = now.astimezone(rule.timezone).year
                missing = float(year not in self._book.calendars[rule.holiday_calendar].years)
            gauge.add_metric([name], missing)
        yield gauge
