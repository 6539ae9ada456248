"""Where the figures that are not per call come from: what `ProxyMetrics` is built from."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from proxy.config import Budget
from proxy.ledger.store import SpendReader
from proxy.ledger.writer import LedgerStatus
from proxy.pricing import PriceBook
from proxy.reconcile.book import Figures


@dataclass(frozen=True, slots=True)
class ReloadStatus:
    """The live configuration's figures (`proxy.reload`), read at scrape time."""

    successes: int
    """Reloads applied since start (the start-up load not counted)."""
    failures: int
    """Reloads refused (a config or price book that failed its checks) since start."""
    loaded_at: float
    """Unix time the running configuration was loaded (start-up, or the last success)."""
    config_digest: str
    """SHA-256 (hex) of the running config file's bytes."""
    book_digest: str
    """The running price book's digest (`proxy.pricing.PriceBook.digest`)."""
    stale: bool
    """The files on disk are not the ones running: changed and not reloaded yet, or their
    reload was refused, or a changed key needs a restart."""


@dataclass(frozen=True, slots=True)
class MetricSources:
    """What the app hands the metrics from its config, price book, admission and ledger; a
    test builds one with only what it needs, the rest left at its default (absent)."""

    teams: Sequence[str]
    """Every team's series exists from the start (at 0)."""
    book: PriceBook
    """Bounds the model, tool and currency labels; its holiday calendars are watched."""
    billing_timezone: ZoneInfo
    """Where billing days, weeks and months start (``llm_team_spend``)."""
    clock: Callable[[], datetime]
    budgets: Sequence[Budget] = ()
    spend: SpendReader | None = None
    """Daily spend from the ledger; without one there is no ``llm_team_spend``."""
    in_flight: Callable[[], Mapping[str, int]] = dict
    """Calls in progress per team (`proxy.admission.Admission.in_flight`)."""
    ledger: Callable[[], LedgerStatus] | None = None
    """The ledger writer's figures (`proxy.ledger.writer.LedgerWriter.status`); without it
    there are no ``llm_ledger_*`` metrics."""
    reload: Callable[[], ReloadStatus] | None = None
    """The live configuration's figures (`proxy.reload.Reloader.status`); without it there are
    no ``llm_config_*`` metrics."""
    balance: Callable[[], Figures] | None = None
    """DeepSeek's balance and the bill's drift as the ledger has them
    (`proxy.reconcile.live.LiveBook.figures`); without it there are no ``llm_deepseek_*``
    metrics."""
    tag_labels: Mapping[str, int] = field(default_factory=dict)
    """Tag key -> its cap, for the tags exported as labels (`proxy.metrics.tags`); read once,
    when the metrics are built (a restart applies a change)."""
