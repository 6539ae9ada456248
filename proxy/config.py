"""The proxy's configuration file, read once at start-up into frozen dataclasses.

Every defect fails start-up with the file, the key and the reason (`ConfigError`). Relative paths
in the file are relative to the file's own folder, so the proxy behaves the same whatever the
working directory. Secrets never sit in the file: it names the environment variable that holds
the DeepSeek key, and client keys appear only as SHA-256 hashes. Only the entry point reads the
environment (`proxy.serve`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.auth import ClientKey, key_id_of
from proxy.ledger.writer import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_QUEUED_RECORDS,
    DEFAULT_SHUTDOWN_TIMEOUT,
)
from proxy.usage import DEFAULT_TOOL_FIELDS
from proxy.yamlfile import YamlError, load_yaml

DEFAULT_CONFIG = Path("config/proxy.yaml")
DEFAULT_LEDGER = "../data/ledger.sqlite3"
"""Relative to the config file: ``config/proxy.yaml`` -> ``data/ledger.sqlite3``."""
_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TEAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")

PriceAt = Literal["request_start", "response_end"]


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


Period = Literal["day", "week", "month"]


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
    price_book: tuple[Path, ...]
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

    def policy(self, team: str) -> TeamPolicy:
        return self.policies.get(team, DEFAULT_POLICY)


def load_config(path: Path) -> ProxyConfig:
    """Read and validate the configuration file; raise `ConfigError` on the first defect."""
    try:
        raw = load_yaml(path)
    except YamlError as exc:
        raise ConfigError(path, "(file)", exc.reason) from exc
    reader = _Reader(path)
    reader.keys(
        raw,
        "(file)",
        {
            "listen",
            "upstream",
            "pricing",
            "teams",
            "timeouts",
            "limits",
            "usage",
            "ledger",
            "budgets",
        },
    )
    listen = reader.section(raw, "listen")
    upstream = reader.section(raw, "upstream")
    pricing = reader.section(raw, "pricing")
    timeouts = reader.section(raw, "timeouts")
    limits = reader.section(raw, "limits")
    usage = reader.section(raw, "usage")
    ledger = reader.section(raw, "ledger")
    reader.keys(
        ledger,
        "ledger",
        {"path", "flush_interval", "billing_timezone", "max_queued_records", "shutdown_timeout"},
    )
    reader.keys(listen, "listen", {"host", "port"})
    reader.keys(upstream, "upstream", {"base_url", "api_key_env"})
    reader.keys(pricing, "pricing", {"book", "price_at"})
    reader.keys(timeouts, "timeouts", set(Timeouts.__dataclass_fields__))
    reader.keys(limits, "limits", set(Limits.__dataclass_fields__))
    reader.keys(usage, "usage", {"server_tool_fields"})

    port = listen.get("port", 8080)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(path, "listen.port", f"expected a port number, got {port!r}")
    key_env = upstream.get("api_key_env", "DEEPSEEK_API_KEY")
    if not isinstance(key_env, str) or not _ENV_NAME.match(key_env):
        # Never echoed: the likeliest mistake is pasting the key itself here.
        raise ConfigError(
            path,
            "upstream.api_key_env",
            "expected the name of an environment variable (letters, digits and "
            "'_'), such as DEEPSEEK_API_KEY; the value is not shown in case it is "
            "a key: never put the key itself in the config",
        )
    price_at = pricing.get("price_at", "request_start")
    if price_at not in ("request_start", "response_end"):
        raise ConfigError(
            path, "pricing.price_at", f"expected request_start or response_end, got {price_at!r}"
        )
    keys, teams, policies = _teams(reader, raw.get("teams"))
    return ProxyConfig(
        path=path,
        host=reader.text(listen.get("host", "127.0.0.1"), "listen.host"),
        port=port,
        upstream_base_url=_base_url(reader, upstream.get("base_url", "https://api.deepseek.com")),
        upstream_key_env=key_env,
        price_book=_book_paths(reader, pricing.get("book", ["pricing"])),
        price_at=price_at,
        keys=MappingProxyType(keys),
        teams=teams,
        timeouts=Timeouts(
            **{name: reader.seconds(value, f"timeouts.{name}") for name, value in timeouts.items()}
        ),
        limits=Limits(
            **{name: reader.positive_int(value, f"limits.{name}") for name, value in limits.items()}
        ),
        tool_fields=MappingProxyType({**DEFAULT_TOOL_FIELDS, **_tool_fields(reader, usage)}),
        ledger_path=path.parent / reader.text(ledger.get("path", DEFAULT_LEDGER), "ledger.path"),
        flush_interval=reader.seconds(
            ledger.get("flush_interval", DEFAULT_FLUSH_INTERVAL), "ledger.flush_interval"
        ),
        billing_timezone=_timezone(reader, ledger.get("billing_timezone", "Asia/Shanghai")),
        budgets=_budgets(reader, raw.get("budgets"), teams),
        policies=MappingProxyType(policies),
        max_queued_records=reader.positive_int(
            ledger.get("max_queued_records", DEFAULT_MAX_QUEUED_RECORDS),
            "ledger.max_queued_records",
        ),
        ledger_shutdown_timeout=reader.seconds(
            ledger.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT), "ledger.shutdown_timeout"
        ),
    )


def check_references(
    config: ProxyConfig, *, currencies: Collection[str], tools: Collection[str]
) -> None:
    """Check what the configuration names against the price book it will run with.

    Run before the proxy listens: a budget in a currency the book has no prices in (``EUR``,
    ``RMB``) would otherwise fail every call of its team, and a tool name the book has no fee
    for would leave those calls unpriced. Raises `ConfigError` naming the file, key and reason.
    """
    known = ", ".join(currencies)
    for team in config.teams:
        for index, budget in enumerate(b for b in config.budgets if b.team == team):
            if budget.currency not in currencies:
                raise ConfigError(
                    config.path,
                    f"budgets.{team}[{index}].currency",
                    f"{budget.currency!r} is not a currency of the price book (it has {known})",
                )
    for field_name, tool in config.tool_fields.items():
        if tool not in tools:
            raise ConfigError(
                config.path,
                f"usage.server_tool_fields.{field_name}",
                f"{tool!r} is not a tool of the price book (it has "
                f"{', '.join(sorted(tools)) or 'none'})",
            )


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def section(self, raw: Any, key: str) -> Mapping[str, Any]:
        value = raw.get(key) if isinstance(raw, Mapping) else None
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value

    def keys(self, raw: Any, key: str, allowed: set[str]) -> None:
        if raw is None:
            return
        if not isinstance(raw, Mapping):
            raise self.fail(key, f"expected a mapping, got {type(raw).__name__}")
        for name in raw:
            if name not in allowed:
                raise self.fail(
                    f"{key}.{name}" if key != "(file)" else str(name),
                    f"unknown key (allowed: {', '.join(sorted(allowed))})",
                )

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected text, got {value!r}")
        return value.strip()

    def seconds(self, value: Any, key: str) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise self.fail(key, f"expected seconds, got {value!r}") from None
        if isinstance(value, bool) or not seconds > 0:
            raise self.fail(key, f"expected a positive number of seconds, got {value!r}")
        return seconds

    def positive_int(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, f"expected a positive whole number, got {value!r}")
        return value


def _base_url(reader: _Reader, value: Any) -> str:
    text = reader.text(value, "upstream.base_url")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.fail("upstream.base_url", f"expected an http(s) URL, got {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise reader.fail("upstream.base_url", "must not carry a query, fragment or credentials")
    return text.rstrip("/")


def _book_paths(reader: _Reader, value: Any) -> tuple[Path, ...]:
    items = value if isinstance(value, list) else [value]
    paths: list[Path] = []
    for item in items:
        path = reader.path.parent / reader.text(item, "pricing.book")
        if path.is_dir():
            found = sorted(path.glob("*.yaml"))
            if not found:
                raise reader.fail("pricing.book", f"folder {path} holds no *.yaml files")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise reader.fail("pricing.book", f"{path} does not exist")
    return tuple(paths)


def _teams(
    reader: _Reader, raw: Any
) -> tuple[dict[str, ClientKey], tuple[str, ...], dict[str, TeamPolicy]]:
    if not isinstance(raw, Mapping) or not raw:
        raise reader.fail(
            "teams",
            "expected at least one team with client keys "
            "(create one with: python -m proxy keys new --team NAME)",
        )
    keys: dict[str, ClientKey] = {}
    policies: dict[str, TeamPolicy] = {}
    for team, spec in raw.items():
        where = f"teams.{team}"
        if not isinstance(team, str) or not _TEAM_NAME.match(team):
            raise reader.fail(where, "team names are lower-case letters, digits, '_', '.', '-'")
        reader.keys(spec, where, {"keys", "default_max_tokens", "over_budget"})
        policy = _policy(reader, spec, where)
        if policy != DEFAULT_POLICY:
            policies[team] = policy
        entries = spec.get("keys") if isinstance(spec, Mapping) else None
        if not isinstance(entries, list) or not entries:
            raise reader.fail(f"{where}.keys", "expected a list of 'sha256:<hex>' key hashes")
        for index, entry in enumerate(entries):
            match = _HASH.match(entry.strip()) if isinstance(entry, str) else None
            if match is None:
                raise reader.fail(
                    f"{where}.keys[{index}]", "expected 'sha256:' and 64 lower-case hex digits"
                )
            digest = match.group(1)
            if digest in keys:
                raise reader.fail(
                    f"{where}.keys[{index}]",
                    f"the same key is already listed for team {keys[digest].team!r}",
                )
            keys[digest] = ClientKey(team=team, key_id=key_id_of(digest))
    return keys, tuple(raw), policies


def _policy(reader: _Reader, spec: Mapping[str, Any], where: str) -> TeamPolicy:
    default = spec.get("default_max_tokens")
    if default is not None:
        default = reader.positive_int(default, f"{where}.default_max_tokens")
    over_budget = spec.get("over_budget", "refuse")
    if over_budget not in ("refuse", "lower_max_tokens"):
        raise reader.fail(
            f"{where}.over_budget", f"expected refuse or lower_max_tokens, got {over_budget!r}"
        )
    return TeamPolicy(default_max_tokens=default, over_budget=over_budget)


def _budgets(reader: _Reader, raw: Any, teams: tuple[str, ...]) -> tuple[Budget, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise reader.fail("budgets", "expected a mapping of team -> list of budgets")
    budgets: list[Budget] = []
    for team, entries in raw.items():
        if team not in teams:
            raise reader.fail(f"budgets.{team}", "not a team defined under 'teams'")
        if not isinstance(entries, list) or not entries:
            raise reader.fail(f"budgets.{team}", "expected a list of budgets")
        periods: set[str] = set()
        for index, entry in enumerate(entries):
            budgets.append(_budget(reader, str(team), entry, f"budgets.{team}[{index}]"))
            if budgets[-1].period in periods:
                raise reader.fail(
                    f"budgets.{team}[{index}].period",
                    f"team {team!r} already has a {budgets[-1].period} budget",
                )
            periods.add(budgets[-1].period)
    return tuple(budgets)


def _budget(reader: _Reader, team: str, entry: Any, where: str) -> Budget:
    reader.keys(entry, where, {"period", "amount", "currency", "soft", "hard"})
    if not isinstance(entry, Mapping):
        raise reader.fail(where, "expected a mapping")
    period = entry.get("period")
    if period not in ("day", "week", "month"):
        raise reader.fail(f"{where}.period", f"expected day, week or month, got {period!r}")
    amount = _decimal(reader, entry.get("amount"), f"{where}.amount")
    if amount <= 0:
        raise reader.fail(f"{where}.amount", "must be positive")
    currency = reader.text(entry.get("currency"), f"{where}.currency").upper()
    soft_raw = entry.get("soft", [])
    if not isinstance(soft_raw, list):
        raise reader.fail(f"{where}.soft", "expected a list of percentages such as [50, 80]")
    soft = tuple(sorted(_decimal(reader, s, f"{where}.soft") for s in soft_raw))
    if any(not 0 < s < 100 for s in soft):
        raise reader.fail(f"{where}.soft", "percentages must lie between 0 and 100")
    hard = entry.get("hard", False)
    if not isinstance(hard, bool):
        raise reader.fail(f"{where}.hard", f"expected true or false, got {hard!r}")
    return Budget(team, period, amount, currency, soft, hard)


def _decimal(reader: _Reader, value: Any, key: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise reader.fail(key, f"expected a number, got {value!r}")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise reader.fail(key, f"not a number: {value!r}") from None
    if not number.is_finite():
        raise reader.fail(key, f"not a finite number: {value!r}")
    return number


def _timezone(reader: _Reader, value: Any) -> ZoneInfo:
    name = reader.text(value, "ledger.billing_timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise reader.fail("ledger.billing_timezone", f"unknown timezone {name!r}") from None


def _tool_fields(reader: _Reader, usage: Mapping[str, Any]) -> dict[str, str]:
    fields = usage.get("server_tool_fields", {})
    if not isinstance(fields, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
    ):
        raise reader.fail("usage.server_tool_fields", "expected a mapping of field -> tool name")
    return dict(fields)
