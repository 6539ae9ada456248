"""`ProxyMetrics`: the one object the app builds, on an injected registry.

It wires the parts together (the contract's families, `CallTotals` for the per-call figures,
the scrape-time collectors, and with several workers `WorkerSharing`), and gives the request
path its two entry points: `ProxyMetrics.observe` once per finished call and
`ProxyMetrics.budget_refusals` per hard-budget refusal (and the balance poller its own,
`ProxyMetrics.balance_poll_failed`). `ProxyMetrics.apply` follows a reloaded
configuration without resetting a counter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from proxy.metrics.collectors import (
    BalanceCollector,
    BudgetCollector,
    CalendarCollector,
    InflightCollector,
    LedgerCollector,
    ReloadCollector,
    SpendCollector,
)
from proxy.metrics.contract import BALANCE_POLL_FAILURES, BUDGET_REFUSALS, OTHER, POLL_FAILURES
from proxy.metrics.sharing import WorkerSharing
from proxy.metrics.sources import MetricSources
from proxy.metrics.totals import CallTotals
from proxy.records import UsageRecord


class _Configured(Collector):
    """The collectors built from the running configuration (teams, budgets, price book),
    replaced together by `ProxyMetrics.apply`: one assignment, so a scrape sees the old set or
    the new one, never a family missing or half of each."""

    def __init__(self) -> None:
        self.collectors: tuple[Collector, ...] = ()

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


class ProxyMetrics:
    """The proxy's metrics; `observe` takes one finished record."""

    def __init__(
        self, registry: CollectorRegistry, sources: MetricSources, shared_dir: Path | None = None
    ) -> None:
        """`registry` is what ``/metrics`` exports. With `shared_dir` (``serve --workers N``),
        every worker's figures are shared through that folder and `registry` exports the sum
        over all workers (`proxy.metrics.sharing`)."""
        self._registry = registry
        self._sources = sources
        self.calls = CallTotals(sources.tag_labels)
        own = registry  # where this process's gauges and counters live
        self.sharing: WorkerSharing | None = None
        if shared_dir is not None:
            self.sharing = WorkerSharing(registry, shared_dir, self.calls, sources)
            own = self.sharing.registry
        else:
            if sources.ledger is not None:
                registry.register(LedgerCollector(sources.ledger))
            if sources.reload is not None:
                registry.register(ReloadCollector(sources.reload))
            registry.register(self.calls)
        self.budget_refusals = Counter(*BUDGET_REFUSALS.declaration, registry=own)
        self._poll_failures: Counter | None = None
        if sources.balance is not None:
            # Read from the shared ledger: every worker exports the same figures, not a sum.
            registry.register(BalanceCollector(sources.balance))
            self._poll_failures = Counter(*BALANCE_POLL_FAILURES.declaration, registry=own)
            for reason in POLL_FAILURES:
                self._poll_failures.labels(reason)
        self._configured = _Configured()
        registry.register(self._configured)
        self.apply(sources)

    def apply(self, sources: MetricSources) -> None:
        """Follow a reloaded configuration: from now on the teams, budgets, price book (models,
        tools, currencies, holiday calendars) and billing timezone are those of `sources`.

        New teams' series appear at 0; a removed team's gauges (calls in progress, spend) and a
        removed budget's series are no longer exported. Counters never reset: the per-call
        figures and budget refusals keep their values, a removed team's or model's included
        (until a restart). The callables (clock, spend, admission, ledger, reload) stay those
        given at construction: a reload keeps them. Cheap, and nothing on the request path
        changes: `observe` reads the new book's names from its next call.
        """
        current = dataclasses.replace(
            self._sources,
            teams=tuple(sources.teams),
            book=sources.book,
            billing_timezone=sources.billing_timezone,
            budgets=tuple(sources.budgets),
        )
        self._sources = current
        self._models = frozenset(current.book.models)
        self._patterns = current.book.pattern_order
        self._tools = frozenset(current.book.tool_fees)
        for team in current.teams:
            self.budget_refusals.labels(team)
        configured: list[Collector] = []
        if self.sharing is None:
            configured.append(InflightCollector(current.teams, current.in_flight))
        else:  # the workers' calls in progress are summed through the shared folder
            self.sharing.apply(current)
        configured.append(BudgetCollector(current.budgets))
        configured.append(CalendarCollector(current.book, current.clock))
        if current.spend is not None:
            configured.append(
                SpendCollector(
                    current.spend,
                    current.teams,
                    current.book.currencies,
                    current.billing_timezone,
                    current.clock,
                )
            )
        self._configured.collectors = tuple(configured)
        self.publish()

    def balance_poll_failed(self, reason: str) -> None:
        """Count a failed poll of DeepSeek's balance (`proxy.metrics.contract.POLL_FAILURES`)."""
        if self._poll_failures is not None:
            self._poll_failures.labels(reason).inc()

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
        """The `model` label of a call to `name`: the name if the running price book knows it,
        else the book's name pattern it falls under (``claude-opus*``: the labels stay the
        book's own, a bounded set, whatever names clients send), else `OTHER`."""
        if name in self._models:
            return name
        for prefix, pattern in self._patterns:
            if name.startswith(prefix):
                return pattern
        return OTHER

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
