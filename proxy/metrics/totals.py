"""Every per-call metric, summed in plain Python and exported when Prometheus scrapes.

Why not prometheus_client's `Counter` and `Histogram`: each of their updates takes a lock and
goes through several calls, and a call made about fifteen of them, which measured more than a
tenth of the proxy's own CPU per call (bench/RESULTS.md). Here a call costs one dictionary lookup
for its slot (`_Slot`) and a few additions. Only the event loop's thread calls `observe` and
`collect`, so nothing needs a lock.

Money is exact until the scrape: costs and savings are summed as `Decimal` and converted to a
float once, when Prometheus reads them, so the exported value is the float nearest the exact
total rather than the drift of many float additions.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.formats import ZERO
from proxy.metrics.contract import (
    ANOMALIES,
    CACHE_SAVINGS,
    COST,
    DURATION,
    DURATION_BUCKETS,
    OTHER,
    OVERHEAD,
    OVERHEAD_BUCKETS,
    PER_CALL,
    REASONING_TOKENS,
    REQUESTS,
    TAG_COST,
    TAG_OVERFLOW,
    TAG_REQUESTS,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
    TOOL_CALLS,
    TTFT_BUCKETS,
    UNPRICED,
    UPSTREAM_ANOMALIES,
    UPSTREAM_ERRORS,
    USAGE_MISSING,
    Bounds,
)
from proxy.metrics.tags import TagValues
from proxy.records import UsageRecord

NO_STATUS = "none"
"""The `status` label of a call whose client was sent nothing (cancelled by a stopping proxy
before its answer began)."""

Labels = tuple[str, ...]
Histogram = tuple[list[int], float]
"""A count per bucket (not cumulative, the last one +Inf) and the sum."""
Tables = dict[str, dict[Labels, Any]]
"""Family name -> label values -> an int (counter), a `Decimal` (money) or a `Histogram`."""


def _upstream_error(record: UsageRecord) -> str | None:
    if record.outcome == "upstream_error":
        return f"http_{record.upstream_status}"
    if record.outcome in ("upstream_cut", "timeout", "connect_error", "bad_response"):
        return record.outcome
    return None


class _Buckets:
    """One histogram series: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Bounds) -> None:
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


class CallTotals(Collector):
    """This process's per-call totals (`proxy.metrics.sharing.SharedTotals` adds the other
    workers' to them with ``serve --workers N``)."""

    def __init__(self, tag_labels: Mapping[str, int] | None = None) -> None:
        self._slots: dict[tuple[str, str, str, int | None, bool], _Slot] = {}
        self._counters: dict[str, dict[Labels, int]] = {
            TOOL_CALLS.name: {},
            USAGE_MISSING.name: {},
            UNPRICED.name: {},
            UPSTREAM_ERRORS.name: {},
            UPSTREAM_ANOMALIES.name: {},
            TAG_REQUESTS.name: {},
            TAG_OVERFLOW.name: {},
        }
        self._tags = TagValues(tag_labels or {})
        self._tag_cost: dict[Labels, Decimal] = {}
        self._cost: dict[Labels, Decimal] = {}
        self._savings: dict[Labels, Decimal] = {}
        self._overhead = _Buckets(OVERHEAD_BUCKETS)

    def observe(
        self, record: UsageRecord, model: str, tools: dict[str, int] | None, overhead: float
    ) -> None:
        team = record.team
        key = (team, model, record.endpoint, record.client_status, record.stream)
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
                cost[ckey] = cost.get(ckey, ZERO) + amount
            for currency, amount in record.cache_savings.items():
                skey = (team, model, currency)
                savings[skey] = savings.get(skey, ZERO) + amount
        if tools:
            for tool, count in tools.items():
                self._count(TOOL_CALLS.name, (team, model, tool), count)
        if record.usage_source in ("estimated", "unknown"):
            reason = "malformed_usage" if "malformed_usage" in record.flags else record.outcome
            self._count(USAGE_MISSING.name, (team, model, reason))
        if not record.priced and record.billable:
            self._count(UNPRICED.name, (model,))
        if record.outcome != "complete":
            error = _upstream_error(record)
            if error is not None:
                self._count(UPSTREAM_ERRORS.name, (error,))
        if record.flags:
            for flag in record.flags:
                if flag in ANOMALIES:
                    self._count(UPSTREAM_ANOMALIES.name, (flag,))
        if record.tags and self._tags:
            self._observe_tags(record)

    def _observe_tags(self, record: UsageRecord) -> None:
        team = record.team
        for key, value, overflowed in self._tags.labels(record.tags):
            self._count(TAG_REQUESTS.name, (team, key, value))
            if overflowed:
                self._count(TAG_OVERFLOW.name, (key,))
            for currency, amount in record.costs.items():
                ckey = (team, key, value, currency)
                self._tag_cost[ckey] = self._tag_cost.get(ckey, ZERO) + amount

    def _count(self, family: str, labels: Labels, amount: int = 1) -> None:
        table = self._counters[family]
        table[labels] = table.get(labels, 0) + amount

    def tables(self) -> Tables:
        """This process's totals, by family and label values."""
        tables: Tables = {f.name: {} for f in PER_CALL}
        for (team, model, endpoint, status, stream), slot in self._slots.items():
            label = NO_STATUS if status is None else str(status)
            add(tables[REQUESTS.name], (team, model, endpoint, label), slot.requests)
            if slot.with_tokens:
                for kind, amount in (
                    ("input_cache_hit", slot.hit),
                    ("input_cache_miss", slot.miss),
                    ("output", slot.output),
                ):
                    add(tables[TOKENS.name], (team, model, kind), amount)
                add(tables[REASONING_TOKENS.name], (team, model), slot.reasoning)
            add(
                tables[DURATION.name],
                (team, model, "true" if stream else "false"),
                (slot.duration.counts, slot.duration.total),
            )
            if any(slot.ttft.counts):
                add(
                    tables[TIME_TO_FIRST_TOKEN.name],
                    (team, model),
                    (slot.ttft.counts, slot.ttft.total),
                )
        if any(self._overhead.counts):
            tables[OVERHEAD.name][()] = (list(self._overhead.counts), self._overhead.total)
        for family, counts in self._counters.items():
            tables[family].update(counts)
        tables[COST.name].update(self._cost)
        tables[TAG_COST.name].update(self._tag_cost)
        tables[CACHE_SAVINGS.name].update(self._savings)
        return tables

    def collect(self) -> Iterator[Metric]:
        return export(self.tables())


def add(table: dict[Labels, Any], labels: Labels, value: Any) -> None:
    """Add a counter, money or histogram value into a table (histograms are copied)."""
    found = table.get(labels)
    if found is None:
        table[labels] = (list(value[0]), value[1]) if isinstance(value, tuple) else value
    elif isinstance(value, tuple):
        counts, total = found
        table[labels] = ([a + b for a, b in zip(counts, value[0], strict=True)], total + value[1])
    else:
        table[labels] = found + value


_LE = {
    bounds: [*(floatToGoString(b) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]
    for bounds in (DURATION_BUCKETS, TTFT_BUCKETS, OVERHEAD_BUCKETS)
}


def export(tables: Tables) -> Iterator[Metric]:
    """The per-call families as Prometheus reads them, label values in sorted order."""
    for family in PER_CALL:
        table = sorted(tables[family.name].items())
        if family.kind == "histogram":
            histogram = family.histogram()
            for labels, (counts, total) in table:
                buckets = zip(_LE[family.buckets], itertools.accumulate(counts), strict=True)
                histogram.add_metric(list(labels), list(buckets), total)
            yield histogram
        else:
            counter = family.counter()
            for labels, value in table:
                counter.add_metric(list(labels), float(value))
            yield counter
