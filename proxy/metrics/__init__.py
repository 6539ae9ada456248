"""Every Prometheus metric the proxy exports, built in one place on an injected registry.

The public contract dashboards and alerts rely on is documented in ``docs/metrics.md``. The
package keeps apart what prometheus_client keeps apart:

- `proxy.metrics.contract`: every family's name, type, help text, labels and buckets;
- `proxy.metrics.totals`: the per-call figures (`CallTotals`), summed in plain Python;
- `proxy.metrics.collectors`: figures read when Prometheus scrapes (calls in progress, the
  ledger's state, spend from the ledger, budgets, holiday calendars, reloads);
- `proxy.metrics.sharing`: ``serve --workers N``, every worker's figures summed;
- `proxy.metrics.sources`: `MetricSources`, what the figures that are not per call come from;
- `proxy.metrics.proxy_metrics`: `ProxyMetrics`, which the app builds from them, and which
  follows a reloaded configuration (`ProxyMetrics.apply`).
"""

from proxy.metrics.contract import DURATION_BUCKETS, OVERHEAD_BUCKETS, TTFT_BUCKETS
from proxy.metrics.proxy_metrics import ProxyMetrics
from proxy.metrics.sources import MetricSources, ReloadStatus
from proxy.metrics.totals import CallTotals

__all__ = [
    "DURATION_BUCKETS",
    "OVERHEAD_BUCKETS",
    "TTFT_BUCKETS",
    "CallTotals",
    "MetricSources",
    "ProxyMetrics",
    "ReloadStatus",
]
