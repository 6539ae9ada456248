"""The request state: everything a request handler needs, and the holder a reload swaps it in.

Apart from `proxy.app` so that the relay (`proxy.relay`) can name the state it is handed
without importing the app that builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from proxy.admission import Admission
from proxy.budgets import BudgetGuard
from proxy.config import ProxyConfig
from proxy.ledger.store import TeamSpendReader
from proxy.metrics import ProxyMetrics
from proxy.pricing import Pricer
from proxy.records import ALWAYS_HEALTHY, LedgerHealth, RecordSink
from proxy.upstream import Upstream


@dataclass(frozen=True, slots=True)
class ProxyState:
    """Everything a request handler needs, built once at start-up by `create_app`."""

    config: ProxyConfig
    pricer: Pricer
    """The price book in use (`pricer.book`) and its memo of lookups."""
    upstream: Upstream
    sink: RecordSink
    metrics: ProxyMetrics
    budgets: BudgetGuard
    admission: Admission
    clock: Callable[[], datetime]
    ledger: LedgerHealth = ALWAYS_HEALTHY
    """Whether the ledger can take the call's record (see `proxy.relay.call`)."""
    team_spend: TeamSpendReader | None = None
    """A team's daily spend from the ledger, for the spend API (`proxy.spend`); None without
    a ledger."""


class Live:
    """The request state in force: `proxy.reload` replaces `state` whole, in one assignment on
    the event loop; a call reads it once, when it starts, and keeps that state to its end."""

    __slots__ = ("state",)
    state: ProxyState
