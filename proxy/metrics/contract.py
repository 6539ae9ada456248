"""The metrics contract: every family the proxy exports, in one table.

Dashboards and alerts rely on these names, types, label names and buckets, so they are declared
once, here, and every part of the package builds its families from this table (help text
included). ``docs/metrics.md`` explains each one to people; ``tests/unit/test_metrics_contract.py``
checks that page against what a fresh registry exposes, so the two cannot drift apart.

Label values come only from bounded, server-side sets: teams from the config, models and tools
from the price book (anything else is `OTHER`), tiers as the price book names them, statuses as
numbers, anomalies from `ANOMALIES`. A client sending random model names cannot grow the number
of series.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

OTHER = "other"
"""The label value for a model or tool the price book does not know, and a call without tier."""
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
"""Record flags (`proxy.metering`, `proxy.relay`, `proxy.upstream`) counted by
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

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family as Prometheus shows it."""

    name: str
    """As exposed: a counter's ends in ``_total`` (prometheus_client drops the suffix from
    the family and puts it back on the sample)."""
    kind: Kind
    help: str
    label_list: str = ""
    """The label names as docs/metrics.md's table lists them (``team, model``)."""
    buckets: Bounds = ()
    """A histogram's upper bounds, ``+Inf`` left out."""

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.label_list.split(", ")) if self.label_list else ()

    @property
    def declaration(self) -> tuple[str, str, tuple[str, ...]]:
        """Name, help and label names: the first arguments of prometheus_client's `Counter`
        and `Gauge`, for the figures a process sets itself."""
        return (self.name, self.help, self.labels)

    # Empty families, for a collector to fill when Prometheus scrapes.
    def counter(self) -> CounterMetricFamily:
        assert self.kind == "counter", self.name
        return CounterMetricFamily(self.name, self.help, labels=self.labels)

    def gauge(self) -> GaugeMetricFamily:
        assert self.kind == "gauge", self.name
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)

    def histogram(self) -> HistogramMetricFamily:
        assert self.kind == "histogram", self.name
        return HistogramMetricFamily(self.name, self.help, labels=self.labels)


# Per call, summed by `proxy.metrics.totals.CallTotals` in the order it exports them.
REQUESTS = Family(
    "llm_requests_total",
    "counter",
    "Calls dispatched to DeepSeek, by the HTTP status returned",
    "team, model, endpoint, status",
)
TOKENS = Family(
    "llm_tokens_total",
    "counter",
    "Tokens billed (reported, or estimated when usage was lost)",
    "team, model, type",
)
REASONING_TOKENS = Family(
    "llm_reasoning_tokens_total",
    "counter",
    "Reasoning tokens (already inside output tokens)",
    "team, model",
)
TOOL_CALLS = Family(
    "llm_tool_calls_total",
    "counter",
    "Server-side tool calls billed (web search, fetch)",
    "team, model, tool",
)
COST = Family(
    "llm_cost_total",
    "counter",
    "Spend as priced by the price book",
    "team, model, currency, tier",
)
CACHE_SAVINGS = Family(
    "llm_cache_savings_total",
    "counter",
    "What cache-hit tokens would have cost at the cache-miss price, minus what they cost",
    "team, model, currency",
)
DURATION = Family(
    "llm_request_duration_seconds",
    "histogram",
    "From request received to response finished",
    "team, model, stream",
    DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Family(
    "llm_time_to_first_token_seconds",
    "histogram",
    "From request received to DeepSeek's first data (keep-alives excluded)",
    "team, model",
    TTFT_BUCKETS,
)
OVERHEAD = Family(
    "llm_proxy_overhead_seconds",
    "histogram",
    "Time spent in the proxy itself per call, waiting on DeepSeek and on the client excluded",
    buckets=OVERHEAD_BUCKETS,
)
USAGE_MISSING = Family(
    "llm_usage_missing_total",
    "counter",
    "Calls without reported usage (estimated or unknown)",
    "team, model, reason",
)
UNPRICED = Family(
    "llm_unpriced_requests_total", "counter", "Calls the price book could not price", "model"
)
UPSTREAM_ERRORS = Family(
    "llm_upstream_errors_total",
    "counter",
    "DeepSeek errors, cuts, timeouts and connect failures",
    "reason",
)
UPSTREAM_ANOMALIES = Family(
    "llm_upstream_anomalies_total",
    "counter",
    "Answers from DeepSeek the proxy did not take as they came "
    "(usage past the request's bounds, data after [DONE], ...)",
    "reason",
)
TAG_REQUESTS = Family(
    "llm_tag_requests_total",
    "counter",
    "Calls by attribution tag, for the tag keys the config exports as labels (values past "
    "the key's cap are 'other')",
    "team, tag, value",
)
TAG_COST = Family(
    "llm_tag_cost_total",
    "counter",
    "Spend by attribution tag, as llm_tag_requests_total labels it",
    "team, tag, value, currency",
)
TAG_OVERFLOW = Family(
    "llm_tag_values_overflow_total",
    "counter",
    "Calls whose tag value was counted as 'other' because the key's distinct values reached "
    "their cap",
    "tag",
)
PER_CALL = (
    REQUESTS,
    TOKENS,
    REASONING_TOKENS,
    TOOL_CALLS,
    COST,
    CACHE_SAVINGS,
    DURATION,
    TIME_TO_FIRST_TOKEN,
    OVERHEAD,
    USAGE_MISSING,
    UNPRICED,
    UPSTREAM_ERRORS,
    UPSTREAM_ANOMALIES,
    TAG_REQUESTS,
    TAG_COST,
    TAG_OVERFLOW,
)

# Read when Prometheus scrapes (`proxy.metrics.collectors`), or set by each worker.
INFLIGHT = Family("llm_inflight_requests", "gauge", "Calls in progress", "team")
TEAM_SPEND = Family(
    "llm_team_spend",
    "gauge",
    "Spend in the current billing day, week (from Monday) or month, read from the ledger",
    "team, period, currency",
)
TEAM_BUDGET = Family(
    "llm_team_budget",
    "gauge",
    "A team's budget for a billing period",
    "team, period, currency",
)
BUDGET_THRESHOLD = Family(
    "llm_team_budget_threshold",
    "gauge",
    "Spend at which a soft budget threshold is crossed; `threshold` is the percentage",
    "team, period, currency, threshold",
)
BUDGET_REFUSALS = Family(
    "llm_budget_refusals_total",
    "counter",
    "Calls refused (HTTP 402) because of a hard budget",
    "team",
)
LEDGER_COMMITTING = Family(
    "llm_ledger_committing",
    "gauge",
    "1 while the ledger commits; 0 from a failed write until one succeeds, "
    "and for good once its file was deleted or replaced",
)
LEDGER_QUEUED = Family(
    "llm_ledger_queued_records",
    "gauge",
    "Usage records waiting for the ledger (queued, or held for retry)",
)
LEDGER_MAX_QUEUED = Family(
    "llm_ledger_max_queued_records",
    "gauge",
    "Records waiting at which every call is refused (ledger.max_queued_records)",
)
LEDGER_WRITE_ERRORS = Family(
    "llm_ledger_write_errors_total", "counter", "Failed ledger write attempts"
)
LEDGER_LAST_COMMIT = Family(
    "llm_ledger_last_commit_timestamp_seconds",
    "gauge",
    "Unix time of the ledger's last commit",
)
HOLIDAY_CALENDAR_MISSING = Family(
    "llm_holiday_calendar_missing",
    "gauge",
    "1 if the schedule's rule in force lacks a holiday calendar for the current year",
    "schedule",
)

# DeepSeek's balance and the drift of the bill from the ledger (`proxy.reconcile`), read from
# the ledger at scrape time, so every worker and replica exports the same figures.
BALANCE = Family(
    "llm_deepseek_balance",
    "gauge",
    "DeepSeek's balance at the last poll, by currency and kind (total, granted, topped_up)",
    "currency, kind",
)
BALANCE_LAST_POLL = Family(
    "llm_deepseek_balance_last_poll_timestamp_seconds",
    "gauge",
    "Unix time of the last successful poll of DeepSeek's balance (by any process)",
)
BALANCE_POLL_FAILURES = Family(
    "llm_deepseek_balance_poll_failures_total",
    "counter",
    "Polls of DeepSeek's balance that failed, by reason",
    "reason",
)
BILL_DRIFT = Family(
    "llm_deepseek_bill_drift",
    "gauge",
    "The last window between two balance polls: what the balance fell by (top-ups and grants "
    "apart) minus the ledger's cost of the calls that ended in it",
    "currency",
)
BILL_DRIFT_RATIO = Family(
    "llm_deepseek_bill_drift_ratio",
    "gauge",
    "The last window's drift divided by its ledger cost (absent when that cost is 0)",
    "currency",
)
BILL_DRIFT_RUNNING = Family(
    "llm_deepseek_bill_drift_running",
    "gauge",
    "Drift summed over every window since the currency's first balance poll",
    "currency",
)
BILL_COST_RUNNING = Family(
    "llm_deepseek_bill_ledger_cost_running",
    "gauge",
    "The ledger's cost summed over the same windows as llm_deepseek_bill_drift_running",
    "currency",
)
BALANCE_KINDS = ("total", "granted", "topped_up")
"""``llm_deepseek_balance``'s `kind` label."""
POLL_FAILURES = ("unreachable", "http_error", "bad_answer", "ledger", "clock", "internal")
"""``llm_deepseek_balance_poll_failures_total``'s `reason` (`proxy.reconcile.poller`): DeepSeek
could not be reached or did not answer in time; it answered with a status other than 200; its
answer is not a balance; the ledger could not take the lease or the snapshot; the ledger has a
snapshot at or after this one's instant (a clock gone back, or behind another replica's: not
stored); anything else (a bug, logged with its traceback)."""

# The live configuration (`proxy.metrics.sources.ReloadStatus`): what runs, and whether it is
# what is on disk.
CONFIG_RELOADS = Family(
    "llm_config_reload_total",
    "counter",
    "Reloads of the config file and price book since start: applied (success) or refused (failure)",
    "result",
)
CONFIG_LOADED = Family(
    "llm_config_last_reload_success_timestamp_seconds",
    "gauge",
    "Unix time the running configuration was loaded (start-up, or the last successful reload)",
)
CONFIG_INFO = Family(
    "llm_config_info",
    "gauge",
    "Always 1: the running config file's and price book's digests (SHA-256, first 12 hex "
    "digits) are the labels",
    "config_digest, book_digest",
)
CONFIG_STALE = Family(
    "llm_config_stale",
    "gauge",
    "1 while the config file or price book on disk is not the one running (not reloaded yet, "
    "its reload refused, or a changed key that needs a restart), else 0",
)
DIGEST_DIGITS = 12
"""How much of a SHA-256 digest ``llm_config_info`` shows: enough to tell files apart. The
book's is the prefix ``python -m proxy reprice`` prints and the ledger's ``price_book`` column
starts with."""
RELOAD_RESULTS = ("success", "failure")
"""``llm_config_reload_total``'s `result` label, both series exported from the start."""

FAMILIES = (
    *PER_CALL,
    INFLIGHT,
    TEAM_SPEND,
    TEAM_BUDGET,
    BUDGET_THRESHOLD,
    BUDGET_REFUSALS,
    LEDGER_COMMITTING,
    LEDGER_QUEUED,
    LEDGER_MAX_QUEUED,
    LEDGER_WRITE_ERRORS,
    LEDGER_LAST_COMMIT,
    HOLIDAY_CALENDAR_MISSING,
    BALANCE,
    BALANCE_LAST_POLL,
    BALANCE_POLL_FAILURES,
    BILL_DRIFT,
    BILL_DRIFT_RATIO,
    BILL_DRIFT_RUNNING,
    BILL_COST_RUNNING,
    CONFIG_RELOADS,
    CONFIG_LOADED,
    CONFIG_INFO,
    CONFIG_STALE,
)
"""Every family, in the order of docs/metrics.md's table."""
