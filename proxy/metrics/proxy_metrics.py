"""`ProxyMetrics`: the one object the app builds, on an injected registry.

It wires the parts together (the contract's families, `CallTotals` for the per-call figures,
the scrape-time collectors, and with several workers `WorkerSharing`), and gives the request
path its two entry points: `ProxyMetrics.observe` once per finished call and
`ProxyMetrics.budget_refusals` per hard-budget refusal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from proxy.config import Budget
from proxy.formats import decimal_text
from proxy.metrics.collectors import (
    CalendarCollector,
    InflightCollector,
    LedgerCollector,
    ReloadCollector,
    SpendCollector,
)
from proxy.metrics.contract import BUDGET_REFUSALS, BUDGET_THRESHOLD, OTHER, TEAM_BUDGET
from proxy.metrics.sharing import WorkerSharing
from proxy.metrics.sources import MetricSources
from proxy.metrics.totals import CallTotals
from proxy.records import UsageRecord


class ProxyMetrics:
    """The proxy's metrics; `observe` takes one finished record."""

    def __init__(
        self, registry: CollectorRegistry, sources: MetricSources, shared_dir: Path | None = None
    ) -> None:
        """`registry` is what ``/metrics`` exports. With `shared_dir` (``serve --workers N``),
        every worker's figures are shared through that folder and `registry` exports the sum
        over all workers (`proxy.metrics.sharing`)."""
        self._registry = registry
        self._models = frozenset(sources.book.models)
        self._tools = frozenset(sources.book.tool_fees)
        self.calls = CallTotals()
        own = registry  # where this process's gauges and counters live
        self.sharing: WorkerSharing | None = None
        if shared_dir is not None:
            self.sharing = WorkerSharing(registry, shared_dir, self.calls, sources)
            own = self.sharing.registry
        else:
            registry.register(InflightCollector(sources.teams, sources.in_flight))
            if sources.ledger is not None:
                registry.register(LedgerCollector(sources.ledger))
            if sources.reload is not None:
                registry.register(ReloadCollector(sources.reload))
            registry.register(self.calls)
        self.budget_refusals = _budget_metrics(own, sources.teams, sources.budgets)
        registry.register(CalendarCollector(sources.book, sources.clock))
        if sources.spend is not None:
            registry.register(
                SpendCollector(
                    sources.spend,
                    sources.teams,
                    sources.book.currencies,
                    sources.billing_timezone,
                    sources.clock,
                )
            )
        self.publish()

    def publish(self) -> None:
        """Share this worker's figures with the others (with ``serve --workers N``; a no-op
        otherwise). Called every second, before each scrape this worker answers, and at exit."""
        if self.sharing is not None:
            self.sharing.publish()

    def exposition(self) -> bytes:
        """What ``/metrics`` answers: every family in Prometheus' text format, this worker's
        own figures current."""
        self.publish()
        return generate_latest(self._registry)

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


def _budget_metrics(
    registry: CollectorRegistry, teams: Sequence[str], budgets: Sequence[Budget]
) -> Counter:
    """The budgets from the config as gauges (the workers agree on them: their maximum is
    exported); returns the refusals counter, each team's series at 0."""
    budget = Gauge(*TEAM_BUDGET.declaration, registry=registry, multiprocess_mode="max")
    threshold = Gauge(*BUDGET_THRESHOLD.declaration, registry=registry, multiprocess_mode="max")
    for entry in budgets:
        budget.labels(entry.team, entry.period, entry.currency).set(float(entry.amount))
        for percent in entry.soft:
            threshold.labels(entry.team, entry.period, entry.currency, decimal_text(percent)).set(
                float(entry.amount * percent / 100)
            )
    refusals = Counter(*BUDGET_REFUSALS.declaration, registry=registry)
    for team in teams:
        refusals.labels(team)
    return refusals
