"""The configuration's shape: frozen dataclasses and the defaults of every key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from zoneinfo import ZoneInfo

from proxy.attribution import DEFAULT_ATTRIBUTION, AttributionConfig
from proxy.auth import ClientKey
from proxy.periods import Period

DEFAULT_CONFIG = Path("config/proxy.yaml")
DEFAULT_LEDGER = "../data/ledger.sqlite3"
"""Relative to the config file: ``config/proxy.yaml`` -> ``data/ledger.sqlite3``."""
DEFAULT_FLUSH_INTERVAL = 0.1
DEFAULT_LEASE = 15.0
"""Seconds a replica's claim on its calls and budget holds lasts in a PostgreSQL ledger unless
renewed (every third of it): a replica that dies is released by the survivors within
`lease` plus a third of it (`proxy.ledger.leases`)."""
DEFAULT_MAX_QUEUED_RECORDS = 50_000
"""Records kept in memory while the ledger cannot commit, before every call is refused. A
record takes about 1.5 KB, so about 75 MB at the bound: minutes of traffic for someone to
free the disk, against memory that a proxy with 1,000 open streams uses anyway."""
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
"""Seconds a stopping proxy waits for the ledger to commit. With `timeouts.drain` (30 s) it
stays below the 60 s an orchestrator gives (docker-compose's ``stop_grace_period``), so the
records it gives up on are saved rather than killed with the process."""
DEFAULT_BALANCE_INTERVAL = 300.0
"""Seconds between two polls of DeepSeek's balance (`proxy.reconcile`): on by default, since
proving the bill is the ledger's purpose and one small GET every 5 minutes (288 a day, by one
process however many workers and replicas run) costs nothing against the calls it checks.
DeepSeek documents no rate limit for ``/user/balance``; 5 minutes keeps each window's drift
readable (few calls straddle a snapshot) without polling what changes call by call."""

PriceAt = Literal["request_start", "response_end"]
CacheCreation = Literal["miss", "hit"]


class ConfigError(Exception):
    """A configuration defect: which file, which key, and why."""

    def __init__(self, file: Path | str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file = str(file)
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed for each stage of an upstream call.

    `first_byte` bounds the wait for the first real data (DeepSeek's keep-alive blank lines and
    ``: keep-alive`` comments do not count, since they can go on for minutes); `idle` bounds the
    silence between any two reads; `total` is an absolute cap that nothing extends;
    `client_disconnect_grace` is how long the proxy keeps reading a stream whose client left, to
    learn the real usage that DeepSeek bills anyway.
    """

    connect: float = 10.0
    first_byte: float = 660.0
    idle: float = 120.0
    total: float = 1800.0
    client_disconnect_grace: float = 60.0
    client_header: float = 15.0
    """A client must send a request's headers within this many seconds of connecting (or of
    its previous response): the defence against slowloris."""
    client_body: float = 60.0
    """... and its body within this many seconds once the headers are in (else 408)."""
    drain: float = 30.0
    """On SIGTERM, how long running calls may take to finish before they are cancelled."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes and concurrency the proxy accepts; past them it refuses at once, without asking
    DeepSeek (413, 431, 503 with Retry-After)."""

    max_request_bytes: int = 16 * 2**20
    max_header_bytes: int = 16 * 2**10
    max_output_tokens: int = 393_216
    """DeepSeek V4's maximum output (384K tokens): what a hard budget reserves for a call
    without ``max_tokens``."""
    max_inflight: int = 1000
    """Calls in progress across all teams (DeepSeek limits concurrency per account)."""
    max_inflight_per_team: int = 250
    """... and per team, so one team cannot starve the others."""
    max_context_tokens: int = 1_048_576
    """DeepSeek V4's context window (1M tokens): no call's prompt can be billed beyond it, so
    it caps what a hard budget reserves and what reported usage the proxy trusts."""
    image_prompt_tokens: int = 8192
    """Prompt tokens counted for each image part (`proxy.bounds` says why this figure)."""
    max_server_tool_calls: int = 32
    """Server-side tool calls (search, fetch) one call is believed to make, all tools
    together; more reported by DeepSeek are recorded at this figure and flagged. DeepSeek's
    agentic search makes a handful per answer; 32 is generous, and keeps a broken report from
    billing millions of searches."""


OverBudget = Literal["refuse", "lower_max_tokens"]


@dataclass(frozen=True, slots=True)
class TeamPolicy:
    """How the proxy treats a team's requests beyond authenticating them.

    `default_max_tokens` is written into the team's requests that set no ``max_tokens``: a
    hard budget then reserves that many output tokens instead of DeepSeek's maximum (393,216),
    so many more calls run side by side. `over_budget` says what a hard budget does with a
    call whose worst case no longer fits: ``refuse`` it (402), or ``lower_max_tokens`` to what
    the budget can still pay for and admit it (`proxy.budgets`).
    """

    default_max_tokens: int | None = None
    over_budget: OverBudget = "refuse"


DEFAULT_POLICY = TeamPolicy()


@dataclass(frozen=True, slots=True)
class Budget:
    """A team's spending limit for a calendar period in the billing timezone.

    `soft` thresholds (percentages) only feed alerts; a `hard` budget also refuses calls
    (HTTP 402) once what is spent plus what running calls may still cost would pass `amount`.
    """

    team: str
    period: Period
    amount: Decimal
    currency: str
    soft: tuple[Decimal, ...]
    hard: bool


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    path: Path
    host: str
    port: int
    upstream_base_url: str
    upstream_key_env: str
    price_book_files: tuple[Path, ...]
    price_at: PriceAt
    keys: Mapping[str, ClientKey]
    """SHA-256 hex of a client key -> the key's team and id."""
    teams: tuple[str, ...]
    timeouts: Timeouts
    limits: Limits
    tool_fields: Mapping[str, str]
    ledger_path: Path
    flush_interval: float
    billing_timezone: ZoneInfo
    budgets: tuple[Budget, ...] = ()
    policies: Mapping[str, TeamPolicy] = field(default_factory=lambda: MappingProxyType({}))
    """Team -> its policy; a team not listed has `DEFAULT_POLICY`."""
    max_queued_records: int = DEFAULT_MAX_QUEUED_RECORDS
    """Records kept in memory while the ledger cannot commit; past it every call gets 503."""
    ledger_shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    """On SIGTERM, after the drain, how long the ledger may take to commit before the records
    it could not write are saved to a spill file beside it."""
    ledger_url: str | None = None
    """A PostgreSQL ledger (``postgresql://user@host:port/db``, never with a password: libpq's
    ``PGPASSWORD`` or ``~/.pgpass`` give it), shared by every replica; None: the SQLite file at
    `ledger_path`."""
    ledger_lease: float = DEFAULT_LEASE
    """With a PostgreSQL ledger: seconds a replica's claim on its calls and holds lasts unless
    renewed (`DEFAULT_LEASE`)."""
    cache_creation: CacheCreation = "miss"
    """How the Anthropic format's ``cache_creation_input_tokens`` are billed: as cache-miss
    input (the default: DeepSeek caches on its own; `proxy.dialects.anthropic` gives the
    reading) or as cache hits, should DeepSeek's bill say otherwise."""
    attribution: AttributionConfig = DEFAULT_ATTRIBUTION
    """Which tags clients may send (`proxy.attribution`)."""
    tag_labels: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Tag key -> the most distinct values it exports as Prometheus labels (``attribution.
    metric_labels``; `proxy.metrics.tags`); a restart applies a change."""
    reload_watch: float | None = None
    """Seconds between two looks at the config file and price book on disk, reloading them
    when they changed (`proxy.reload`); None: only SIGHUP reloads (the default)."""
    balance_interval: float | None = None
    """Seconds between two polls of DeepSeek's balance (``reconcile.balance_interval``);
    None: this process does not poll (the file's default is `DEFAULT_BALANCE_INTERVAL`; 0
    there turns polling off). A restart applies a change."""
    reconcile_currencies: frozenset[str] | None = None
    """The balance's currencies reconciled with the ledger (``reconcile.currencies``); None:
    every one the balance lists. An account billed in one currency whose balance also lists
    another would otherwise show that other's drift as minus the ledger's cost in it."""
    budget_remaining_header: bool = False
    """Whether the metered calls of a team with a hard budget answer with
    ``x-proxy-budget-remaining`` (`proxy.budgets.guard.remaining_header`): off by default."""

    @property
    def spill_anchor(self) -> Path:
        """The path whose folder and name the files of records the ledger could not take are
        named after (``<anchor>.unwritten-...jsonl``): the SQLite file itself; for a
        PostgreSQL ledger, ``postgresql-ledger`` in the folder `ledger.path` names, a local
        disk the server's outage cannot take away."""
        if self.ledger_url is None:
            return self.ledger_path
        return self.ledger_path.with_name("postgresql-ledger")

    @property
    def ledger_shown(self) -> str:
        """The ledger as logs and messages name it."""
        return str(self.ledger_path) if self.ledger_url is None else self.ledger_url

    def policy(self, team: str) -> TeamPolicy:
        return self.policies.get(team, DEFAULT_POLICY)
