"""docs/metrics.md is the contract dashboards and alerts rely on: every family its table lists,
and no other, is what a registry exposes, with that type and those labels; and
`proxy.metrics.contract` declares exactly that table."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Budget, Limits
from proxy.ledger.writer import LedgerStatus
from proxy.metering import build_record
from proxy.metrics import MetricSources, ProxyMetrics, ReloadStatus
from proxy.metrics.contract import FAMILIES
from proxy.outcome import Failure
from proxy.pricing import PriceBook, Pricer
from proxy.reconcile.balance import Balance
from proxy.reconcile.book import Figures, Reconciled
from proxy.reconcile.drift import Running, Snapshot, window
from proxy.records import UsageRecord
from tests.support.calls import call_meter
from tests.support.proxy_harness import PEAK

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(?P<name>llm_\w+)` \| (?P<kind>\w+) \| (?P<labels>[^|]+?) \|")
Shape = tuple[str, tuple[str, ...]]
"""A family's type and label names."""
Seen = tuple[str, frozenset[str]]
"""A family's type and label names as a scrape shows them (label names sorted)."""


def documented() -> dict[str, Shape]:
    """The families docs/metrics.md's table lists, in its order."""
    rows: dict[str, Shape] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match is not None:
            labels = match["labels"]
            assert match["name"] not in rows, f"{match['name']} is listed twice"
            rows[match["name"]] = (
                match["kind"],
                () if labels == "-" else tuple(labels.split(", ")),
            )
    return rows


def exposed(registry: CollectorRegistry) -> dict[str, Seen]:
    """What a scrape shows: each family's name as Prometheus shows it, its type, and the label
    names of its samples (``le`` is the histograms' own).

    A counter prometheus_client keeps itself comes with a ``<name>_created`` gauge, its
    start time: that series belongs to the counter, not to the contract."""
    families: dict[str, Seen] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        if name.endswith("_created") and f"{name.removesuffix('_created')}_total" in families:
            continue
        labels = {label for s in family.samples for label in s.labels}
        families[name] = (family.type, frozenset(labels - {"le"}))
    return families


def balance_figures() -> Figures:
    """Two balance snapshots a minute apart, and the window between them."""
    before = Snapshot(PEAK, Balance("CNY", Decimal(110), Decimal(10), Decimal(100)))
    after = Snapshot(
        PEAK + timedelta(minutes=1), Balance("CNY", Decimal(109), Decimal(9), Decimal(100))
    )
    last = window(before, after, Decimal("0.9"))
    return Figures((after,), (Reconciled(last, Running().plus(last)),), after.taken_at)


def sources(book: PriceBook) -> MetricSources:
    """A source for every family: budgets with a soft threshold, a spend reader, a ledger, a
    reloader, DeepSeek's balance."""
    return MetricSources(
        teams=("alpha", "beta"),
        book=book,
        billing_timezone=ZoneInfo("Asia/Shanghai"),
        clock=lambda: PEAK,
        budgets=(Budget("alpha", "month", Decimal(100), "USD", (Decimal(80),), hard=True),),
        spend=lambda first, last: [],
        in_flight=dict,
        ledger=lambda: LedgerStatus(
            committing=True, waiting=0, capacity=10, write_errors=0, last_commit=0.0
        ),
        reload=lambda: ReloadStatus(
            successes=0,
            failures=0,
            loaded_at=0.0,
            config_digest="0" * 64,
            book_digest=book.digest,
            stale=False,
        ),
        tag_labels={"project": 1},
        balance=balance_figures,
    )


USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 20,
    "prompt_cache_hit_tokens": 60,
    "prompt_cache_miss_tokens": 40,
    "completion_tokens_details": {"reasoning_tokens": 5},
    "server_tool_use": {"web_search_requests": 1},
}


def call(
    book: PriceBook,
    failure: Failure | None,
    model: str,
    status: int,
    usage: object = None,
    tags: dict[str, str] | None = None,
) -> UsageRecord:
    meter = call_meter(
        failure or f"http_{status}",
        stream=True,
        model=model,
        payload={"messages": [{"role": "user", "content": "hi"}]},
        failure=failure,
        upstream_status=status,
        first_byte_at=PEAK + timedelta(seconds=0.2),
        tags=tags or {},
    )
    if usage is not None:
        meter.take_usage(usage, {"web_search_requests": "search"})
        meter.flag("data_after_done")
    return build_record(meter, PEAK + timedelta(seconds=1), Pricer(book), "request_start", Limits())


def traffic(book: PriceBook) -> list[UsageRecord]:
    """Calls that between them give every per-call family a series: one complete with usage,
    a tool call, an anomaly and a tag; a DeepSeek error whose tag value is past the cap; a cut
    call of a model the book lacks."""
    return [
        call(book, None, "deepseek-flash", 200, USAGE, {"project": "ranker"}),
        call(book, None, "deepseek-flash", 429, tags={"project": "search"}),
        call(book, "cut", "someone-else", 200),
    ]


def test_the_contract_declares_the_documented_table() -> None:
    """Same families, same order, same types, same labels in the same order."""
    declared = {f.name: (f.kind, f.labels) for f in FAMILIES}
    assert list(declared.items()) == list(documented().items())
    assert all((f.kind == "histogram") == bool(f.buckets) for f in FAMILIES)


def test_a_fresh_registry_exposes_every_documented_family(book: PriceBook) -> None:
    """Before any call: every family is there with its type (series come with traffic)."""
    registry = CollectorRegistry()
    ProxyMetrics(registry, sources(book))
    assert {name: kind for name, (kind, _) in exposed(registry).items()} == {
        name: kind for name, (kind, _) in documented().items()
    }


def test_after_traffic_every_family_has_the_documented_labels(
    book: PriceBook, shared_dir: Path | None
) -> None:
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, sources(book), shared_dir)
    for record in traffic(book):
        metrics.observe(record, 0.0001)
    assert exposed(registry) == {
        name: (kind, frozenset(labels)) for name, (kind, labels) in documented().items()
    }
    bounds = {
        family.name: {float(s.labels["le"]) for s in family.samples if "le" in s.labels}
        for family in registry.collect()
        if family.type == "histogram"
    }
    assert bounds == {f.name: {*f.buckets, math.inf} for f in FAMILIES if f.kind == "histogram"}
