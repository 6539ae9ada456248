"""Every Prometheus metric the proxy exports, built in one place on an injected registry.

This is the public contract dashboards and alerts rely on (documented in ``docs/metrics.md``).
Label values come only from bounded, server-side sets: teams from the config, models and tools
from the price book (anything else is ``other``), tiers as the price book names them, statuses
as numbers. A client sending random model names cannot grow the number of series.

Money is exact until the scrape: costs and savings are summed as `Decimal` and converted to a
float once, when Prometheus reads them (`CallTotals`), so the exported value is the float
nearest the exact total rather than the drift of many float additions. `llm_team_spend` is read
from the ledger at scrape time, so it is right after a restart; the ``llm_ledger_*`` figures
(whether the ledger commits, what waits for it) are read from its writer at scrape time too.
"""

from __future__ import annotations

import itertools
import json
import os
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.config import Budget
from proxy.formats import ZERO as _ZERO
from proxy.ledger.store import SpendReader
from proxy.ledger.writer import LedgerStatus
from proxy.periods import PERIODS, period_start
from proxy.pricing import PriceBook
from proxy.pricing.engine import schedule_version_at, to_micros
from proxy.records import UsageRecord

OTHER = "other"
ANOMALIES = frozenset(
    {
        "usage_exceeds_bound",
        "data_after_done",
        "oversized_event",
        "response_body_too_large",
        "undecodable_body",
        "unprintable_upstream_field",
    }
)
"""Record flags (`proxy.metering`, `proxy.forward`, `proxy.answer`) counted by
``llm_upstream_anomalies_total``: a fixed set, so the label stays bounded."""
Bounds = tuple[float, ...]
DURATION_BUCKETS: Bounds = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TTFT_BUCKETS: Bounds = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
OVERHEAD_BUCKETS: Bounds = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
)


class ProxyMetrics:
    """The proxy's metrics; `observe` takes one finished record."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        teams: Sequence[str],
        models: Collection[str],
        tools: Collection[str],
        currencies: Sequence[str],
        spend: SpendReader | None,
        billing_timezone: ZoneInfo,
        clock: Callable[[], datetime],
        budgets: Sequence[Budget] = (),
        book: PriceBook | None = None,
        shared_dir: Path | None = None,
        in_flight: Callable[[], Mapping[str, int]] = dict,
        ledger: Callable[[], LedgerStatus] | None = None,
    ) -> None:
        """`registry` is what ``/metrics`` exports. With `shared_dir` (``serve --workers N``),
        every worker's figures are shared through that folder and `registry` exports the sum
        over all workers: per-call totals as files this module writes (`CallTotals`), gauges
        and rare counters through prometheus_client's multiprocess mode. `in_flight` gives
        the calls in progress per team (`proxy.admission.Admission.in_flight`); `ledger` the
        ledger writer's figures (`proxy.ledger.writer.LedgerWriter.status`)."""
        self._models = frozenset(models)
        self._tools = frozenset(tools)
        exported = registry
        if shared_dir is not None:
            MultiProcessCollector(exported, path=str(shared_dir))  # type: ignore[no-untyped-call]
            registry = CollectorRegistry()  # the metric objects; their values are in the files
        self._teams = tuple(teams)
        self._in_flight = in_flight
        self._shared = shared_dir is not None
        self._ledger = ledger
        self._ledger_gauges: _SharedLedgerGauges | None = None
        if ledger is not None and self._shared:  # each worker sets its own (`publish`)
            self._ledger_gauges = _SharedLedgerGauges(registry)
        elif ledger is not None:  # read at scrape time
            exported.register(_LedgerCollector(ledger))
        if self._shared:  # each worker sets its own (`publish`); the scrape sums live workers
            self._inflight_gauge = Gauge(
                "llm_inflight_requests",
                _INFLIGHT_HELP,
                ["team"],
                registry=registry,
                multiprocess_mode="livesum",
            )
        else:  # read at scrape time: the request path does no gauge updates
            exported.register(_InflightCollector(self._teams, in_flight))
        self.budget_refusals = Counter(
            "llm_budget_refusals_total",
            "Calls refused (HTTP 402) because of a hard budget",
            ["team"],
            registry=registry,
        )
        budget = Gauge(
            "llm_team_budget",
            "A team's budget for a billing period",
            ["team", "period", "currency"],
            registry=registry,
            multiprocess_mode="max",
        )
        threshold = Gauge(
            "llm_team_budget_threshold",
            "Spend at which a soft budget threshold is crossed; `threshold` is the percentage",
            ["team", "period", "currency", "threshold"],
            registry=registry,
            multiprocess_mode="max",
        )
        for entry in budgets:
            budget.labels(entry.team, entry.period, entry.currency).set(float(entry.amount))
            for percent in entry.soft:
                threshold.labels(
                    entry.team, entry.period, entry.currency, format(percent.normalize(), "f")
                ).set(float(entry.amount * percent / 100))
        for team in teams:
            self.budget_refusals.labels(team)
        self.calls = CallTotals(shared_dir)
        exported.register(self.calls)
        if book is not None:
            exported.register(_CalendarCollector(book, clock))
        if spend is not None:
            exported.register(_SpendCollector(spend, teams, currencies, billing_timezone, clock))
        self.publish()

    def publish(self) -> None:
        """Share this worker's figures with the others (with ``serve --workers N``; a no-op
        otherwise): its calls in progress and its per-call totals. Called every second, before
        each scrape this worker answers, and at exit."""
        if not self._shared:
            return
        counts = self._in_flight()
        for team in self._teams:
            self._inflight_gauge.labels(team).set(counts.get(team, 0))
        if self._ledger is not None and self._ledger_gauges is not None:
            self._ledger_gauges.set(self._ledger())
        self.calls.dump()

    def model(self, name: str) -> str:
        return name if name in self._models else OTHER

    def observe(self, record: UsageRecord, overhead: float) -> None:
        model = self.model(record.model_requested)
        tools = (
            {
                tool if tool in self._tools else OTHER: count
                for tool, count in record.tool_calls.items()
            }
            if record.tool_calls
            else None
        )
        self.calls.observe(record, model, tools, overhead)


_INFLIGHT_HELP = "Calls in progress"


class _InflightCollector(Collector):
    """`llm_inflight_requests` read from the admission counts when Prometheus scrapes."""

    def __init__(self, teams: Sequence[str], in_flight: Callable[[], Mapping[str, int]]) -> None:
        self._teams = teams
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        counts = self._in_flight()
        gauge = GaugeMetricFamily("llm_inflight_requests", _INFLIGHT_HELP, labels=["team"])
        for team in self._teams:
            gauge.add_metric([team], float(counts.get(team, 0)))
        yield gauge


_LEDGER_HELP = {
    "llm_ledger_committing": "1 while the ledger commits; 0 from a failed write until one "
    "succeeds, and for good once its file was deleted or replaced",
    "llm_ledger_queued_records": "Usage records waiting for the ledger (queued, or held for retry)",
    "llm_ledger_max_queued_records": "Records waiting at which every call is refused "
    "(ledger.max_queued_records)",
    "llm_ledger_write_errors": "Failed ledger write attempts",
    "llm_ledger_last_commit_timestamp_seconds": "Unix time of the ledger's last commit",
}


def _ledger_values(status: LedgerStatus) -> dict[str, float]:
    return {
        "llm_ledger_committing": float(status.committing),
        "llm_ledger_queued_records": float(status.waiting),
        "llm_ledger_max_queued_records": float(status.capacity),
        "llm_ledger_write_errors": float(status.write_errors),
        "llm_ledger_last_commit_timestamp_seconds": status.last_commit,
    }


class _LedgerCollector(Collector):
    """The ``llm_ledger_*`` figures, read from the ledger's writer when Prometheus scrapes:
    the writer keeps them as plain attributes, so they cost the request path nothing."""

    def __init__(self, status: Callable[[], LedgerStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        for name, value in _ledger_values(self._status()).items():
            if name == "llm_ledger_write_errors":
                yield CounterMetricFamily(name, _LEDGER_HELP[name], value=value)
            else:
                yield GaugeMetricFamily(name, _LEDGER_HELP[name], value=value)


class _SharedLedgerGauges:
    """The ``llm_ledger_*`` figures with several workers, each worker its own ledger writer.

    How a scrape combines the live workers: committing is their minimum (one worker that
    cannot commit refuses its hard-budget calls, so the service does), records waiting and
    the bound are sums (what all of them hold in memory, against what all of them may), the
    last commit the newest; write errors are a counter, summed over every worker that ran.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, mode: Literal["livemin", "livesum", "livemax"]) -> Gauge:
            return Gauge(name, _LEDGER_HELP[name], registry=registry, multiprocess_mode=mode)

        self._gauges = {
            "llm_ledger_committing": gauge("llm_ledger_committing", "livemin"),
            "llm_ledger_queued_records": gauge("llm_ledger_queued_records", "livesum"),
            "llm_ledger_max_queued_records": gauge("llm_ledger_max_queued_records", "livesum"),
            "llm_ledger_last_commit_timestamp_seconds": gauge(
                "llm_ledger_last_commit_timestamp_seconds", "livemax"
            ),
        }
        self._errors = Counter(
            "llm_ledger_write_errors", _LEDGER_HELP["llm_ledger_write_errors"], registry=registry
        )
        self._errors_published = 0

    def set(self, status: LedgerStatus) -> None:
        for name, value in _ledger_values(status).items():
            if name in self._gauges:
                self._gauges[name].set(value)
        self._errors.inc(status.write_errors - self._errors_published)
        self._errors_published = status.write_errors


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


class _Buckets:
    """One histogram series: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bucket's bound is inclusive
        self.total += value


class _Slot:
    """What `CallTotals.observe` adds for one (team, model, endpoint, status, stream): the
    counters and histograms every call touches, behind one dictionary lookup."""

    __slots__ = (
        "duration",
        "hit",
        "miss",
        "output",
        "reasoning",
        "requests",
        "ttft",
        "with_tokens",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.with_tokens = 0  # calls with token counts: their series exist from the first one
        self.hit = self.miss = self.output = self.reasoning = 0
        self.duration = _Buckets(DURATION_BUCKETS)
        self.ttft = _Buckets(TTFT_BUCKETS)


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    """Without ``_total`` for counters (the exposition adds it)."""
    kind: str
    """``counter``, ``histogram`` or ``money`` (a counter summed as `Decimal`)."""
    help: str
    labels: tuple[str, ...]
    bounds: tuple[float, ...] = ()


_FAMILIES = (
    _Family(
        "llm_requests",
        "counter",
        "Calls dispatched to DeepSeek, by the HTTP status returned",
        ("team", "model", "endpoint", "status"),
    ),
    _Family(
        "llm_tokens",
        "counter",
        "Tokens billed (reported, or estimated when usage was lost)",
        ("team", "model", "type"),
    ),
    _Family(
        "llm_reasoning_tokens",
        "counter",
        "Reasoning tokens (already inside output tokens)",
        ("team", "model"),
    ),
    _Family(
        "llm_tool_calls",
        "counter",
        "Server-side tool calls billed (web search, fetch)",
        ("team", "model", "tool"),
    ),
    _Family(
        "llm_request_duration_seconds",
        "histogram",
        "From request received to response finished",
        ("team", "model", "stream"),
        DURATION_BUCKETS,
    ),
    _Family(
        "llm_time_to_first_token_seconds",
        "histogram",
        "From request received to DeepSeek's first data (keep-alives excluded)",
        ("team", "model"),
        TTFT_BUCKETS,
    ),
    _Family(
        "llm_proxy_overhead_seconds",
        "histogram",
        "Time spent in the proxy itself per call, waiting on DeepSeek and on the client excluded",
        (),
        OVERHEAD_BUCKETS,
    ),
    _Family(
        "llm_usage_missing",
        "counter",
        "Calls without reported usage (estimated or unknown)",
        ("team", "model", "reason"),
    ),
    _Family("llm_unpriced_requests", "counter", "Calls the price book could not price", ("model",)),
    _Family(
        "llm_upstream_errors",
        "counter",
        "DeepSeek errors, cuts, timeouts and connect failures",
        ("reason",),
    ),
    _Family(
        "llm_upstream_anomalies",
        "counter",
        "Answers from DeepSeek the proxy did not "
        "take as they came (usage past the request's bounds, data after [DONE], ...)",
        ("reason",),
    ),
    _Family(
        "llm_cost",
        "money",
        "Spend as priced by the price book",
        ("team", "model", "currency", "tier"),
    ),
    _Family(
        "llm_cache_savings",
        "money",
        "What cache-hit tokens would have cost at the cache-miss price, minus what they cost",
        ("team", "model", "currency"),
    ),
)
_LE = {
    bounds: [*(floatToGoString(b) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]
    for bounds in (DURATION_BUCKETS, TTFT_BUCKETS, OVERHEAD_BUCKETS)
}

Labels = tuple[str, ...]
Histogram = tuple[list[int], float]
Tables = dict[str, dict[Labels, Any]]
"""Family name -> label values -> an int (counter), a `Decimal` (money) or a `Histogram`."""


class CallTotals(Collector):
    """Every per-call metric, summed in plain Python and exported at scrape time.

    Why not prometheus_client's `Counter` and `Histogram`: each of their updates takes a lock
    and goes through several calls, and a call made about fifteen of them, which measured
    more than a tenth of the proxy's own CPU per call (bench/RESULTS.md). Here a call costs
    one dictionary lookup for its slot (`_Slot`) and a few additions. Only the event loop's
    thread calls `observe` and `collect`, so nothing needs a lock.

    Money is exact until the scrape: costs and savings are summed as `Decimal` and converted
    to a float once, when Prometheus reads them, so the exported value is the float nearest
    the exact total rather than the drift of many float additions.

    With several workers each one writes its totals to ``calls-<pid>.json`` in the shared
    folder (`dump`, every second and at exit), and a scrape adds the other workers' files to
    its own live totals: sums stay exact, other workers' figures lag by up to a second, and
    the totals of a worker that exited stay in (counters never go down).
    """

    def __init__(self, shared_dir: Path | None = None, worker: str | None = None) -> None:
        """`worker` names this process's file in `shared_dir` (default: the process id)."""
        self._slots: dict[tuple[str, str, str, int, bool], _Slot] = {}
        self._counters: dict[str, dict[Labels, int]] = {
            "llm_tool_calls": {},
            "llm_usage_missing": {},
            "llm_unpriced_requests": {},
            "llm_upstream_errors": {},
            "llm_upstream_anomalies": {},
        }
        self._cost: dict[Labels, Decimal] = {}
        self._savings: dict[Labels, Decimal] = {}
        self._overhead = _Buckets(OVERHEAD_BUCKETS)
        self._shared_dir = shared_dir
        self._own = f"calls-{worker or os.getpid()}.json"

    def observe(
        self, record: UsageRecord, model: str, tools: dict[str, int] | None, overhead: float
    ) -> None:
        team = record.team
        status = record.upstream_status
        if status is None or 300 <= status < 400:
            status = _status(record)
        key = (team, model, record.endpoint, status, record.stream)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        slot.requests += 1
        if record.cache_hit_tokens is not None:
            slot.with_tokens += 1
            slot.hit += record.cache_hit_tokens
            slot.miss += record.cache_miss_tokens or 0
            slot.output += record.output_tokens or 0
            slot.reasoning += record.reasoning_tokens or 0
        started = record.started_at
        slot.duration.observe((record.ended_at - started).total_seconds())
        if record.first_byte_at is not None:
            slot.ttft.observe((record.first_byte_at - started).total_seconds())
        self._overhead.observe(overhead)
        if record.costs:
            tier = record.tier or OTHER
            cost, savings = self._cost, self._savings
            for currency, amount in record.costs.items():
                ckey = (team, model, currency, tier)
                cost[ckey] = cost.get(ckey, _ZERO) + amount
            for currency, amount in record.cache_savings.items():
                skey = (team, model, currency)
                savings[skey] = savings.get(skey, _ZERO) + amount
        if tools:
            for tool, count in tools.items():
                self._count("llm_tool_calls", (team, model, tool), count)
        if record.usage_source in ("estimated", "unknown"):
            reason = "malformed_usage" if "malformed_usage" in record.flags else record.outcome
            self._count("llm_usage_missing", (team, model, reason))
        if not record.priced and record.usage_source != "none":
            self._count("llm_unpriced_requests", (model,))
        if record.outcome != "complete":
            error = _upstream_error(record)
            if error is not None:
                self._count("llm_upstream_errors", (error,))
        if record.flags:
            for flag in record.flags:
                if flag in ANOMALIES:
                    self._count("llm_upstream_anomalies", (flag,))

    def _count(self, family: str, labels: Labels, amount: int = 1) -> None:
        table = self._counters[family]
        table[labels] = table.get(labels, 0) + amount

    def tables(self) -> Tables:
        """This process's totals, by family and label values."""
        tables: Tables = {f.name: {} for f in _FAMILIES}
        for (team, model, endpoint, status, stream), slot in self._slots.items():
            _add(tables["llm_requests"], (team, model, endpoint, str(status)), slot.requests)
            if slot.with_tokens:
                for kind, amount in (
                    ("input_cache_hit", slot.hit),
                    ("input_cache_miss", slot.miss),
                    ("output", slot.output),
                ):
                    _add(tables["llm_tokens"], (team, model, kind), amount)
                _add(tables["llm_reasoning_tokens"], (team, model), slot.reasoning)
            _add(
                tables["llm_request_duration_seconds"],
                (team, model, "true" if stream else "false"),
                (slot.duration.counts, slot.duration.total),
            )
            if any(slot.ttft.counts):
                _add(
                    tables["llm_time_to_first_token_seconds"],
                    (team, model),
                    (slot.ttft.counts, slot.ttft.total),
                )
        if any(self._overhead.counts):
            tables["llm_proxy_overhead_seconds"][()] = (
                list(self._overhead.counts),
                self._overhead.total,
            )
        for family, counts in self._counters.items():
            tables[family].update(counts)
        tables["llm_cost"].update(self._cost)
        tables["llm_cache_savings"].update(self._savings)
        return tables

    def dump(self) -> None:
        """Publish this worker's totals for the other workers' scrapes."""
        if self._shared_dir is None:
            return
        data = {
            name: [[*labels, _encode(value)] for labels, value in table.items()]
            for name, table in self.tables().items()
        }
        temporary = self._shared_dir / f".{self._own}.tmp"
        temporary.write_text(json.dumps(data), encoding="utf-8")
        temporary.replace(self._shared_dir / self._own)

    def _all_tables(self) -> Tables:
        tables = self.tables()
        if self._shared_dir is None:
            return tables
        kinds = {f.name: f.kind for f in _FAMILIES}
        for path in self._shared_dir.glob("calls-*.json"):
            if path.name == self._own:
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a worker is replacing its file right now; next scrape has it
            for name, rows in data.items():
                if name not in tables:
                    continue
                for *labels, value in rows:
                    _add(tables[name], tuple(labels), _decode(kinds[name], value))
        return tables

    def collect(self) -> Iterator[Metric]:
        tables = self._all_tables()
        for family in _FAMILIES:
            table = tables[family.name]
            metric: Metric
            if family.kind == "histogram":
                histogram = HistogramMetricFamily(
                    family.name, family.help, labels=list(family.labels)
                )
                for labels, (counts, total) in sorted(table.items()):
                    cumulative = list(itertools.accumulate(counts))
                    histogram.add_metric(
                        list(labels), list(zip(_LE[family.bounds], cumulative, strict=True)), total
                    )
                metric = histogram
            else:
                counter = CounterMetricFamily(family.name, family.help, labels=list(family.labels))
                for labels, value in sorted(table.items()):
                    counter.add_metric(list(labels), float(value))
                metric = counter
            yield metric


def _add(table: dict[Labels, Any], labels: Labels, value: Any) -> None:
    """Add a counter, money or histogram value into a table (histograms are copied)."""
    found = table.get(labels)
    if found is None:
        table[labels] = (list(value[0]), value[1]) if isinstance(value, tuple) else value
    elif isinstance(value, tuple):
        counts, total = found
        table[labels] = ([a + b for a, b in zip(counts, value[0], strict=True)], total + value[1])
    else:
        table[labels] = found + value


def _encode(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, tuple):
        return [value[0], value[1]]
    return value


def _decode(kind: str, value: Any) -> Any:
    if kind == "money":
        return Decimal(value)
    if kind == "histogram":
        return (value[0], float(value[1]))
    return value


class _SpendCollector(Collector):
    """`llm_team_spend`: today's and this month's spend per team, from the ledger."""

    def __init__(
        self,
        spend: SpendReader,
        teams: Sequence[str],
        currencies: Sequence[str],
        billing_timezone: ZoneInfo,
        clock: Callable[[], datetime],
    ) -> None:
        self._spend = spend
        self._teams = teams
        self._currencies = currencies
        self._tz = billing_timezone
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        today = self._clock().astimezone(self._tz).date()
        starts = {period: period_start(today, period) for period in PERIODS}
        totals = {
            (team, period, currency): Decimal(0)
            for team in self._teams
            for period in PERIODS
            for currency in self._currencies
        }
        for row in self._spend(min(starts.values()), today):
            for period, start in starts.items():
                key = (row.team, period, row.currency)
                if row.day >= start and key in totals:
                    totals[key] += row.amount
        gauge = GaugeMetricFamily(
            "llm_team_spend",
            "Spend in the current billing day, week (from Monday) or month, read from the ledger",
            labels=["team", "period", "currency"],
        )
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
            "llm_holiday_calendar_missing",
            "1 if the schedule's rule in force lacks a holiday calendar for the current year",
            labels=["schedule"],
        )
        for name in sorted(self._book.schedules):
            rule = schedule_version_at(self._book, name, to_micros(now))
            missing = 0.0
            if rule is not None and rule.holiday_calendar is not None:
                year = now.astimezone(rule.timezone).year
                missing = float(year not in self._book.calendars[rule.holiday_calendar].years)
            gauge.add_metric([name], missing)
        yield gauge
