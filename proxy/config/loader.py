"""Reading ``proxy.yaml`` into a `ProxyConfig`, and checking it against the price book."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.config.attribution import read_attribution
from proxy.config.fields import Reader
from proxy.config.model import (
    DEFAULT_BALANCE_INTERVAL,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_LEASE,
    DEFAULT_LEDGER,
    DEFAULT_MAX_QUEUED_RECORDS,
    DEFAULT_SHUTDOWN_TIMEOUT,
    ConfigError,
    Limits,
    ProxyConfig,
    Timeouts,
)
from proxy.config.teams import read_budgets, read_teams
from proxy.usage import DEFAULT_TOOL_FIELDS
from proxy.yamlfile import YamlError, load_yaml

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def load_config(path: Path) -> ProxyConfig:
    """Read and validate the configuration file; raise `ConfigError` on the first defect."""
    try:
        raw = load_yaml(path)
    except YamlError as exc:
        raise ConfigError(path, "(file)", exc.reason) from exc
    reader = Reader(path)
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
            "reload",
            "attribution",
            "headers",
            "reconcile",
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
        {
            "path",
            "url",
            "flush_interval",
            "billing_timezone",
            "max_queued_records",
            "shutdown_timeout",
            "lease",
        },
    )
    reload = reader.section(raw, "reload")
    reader.keys(reload, "reload", {"watch"})
    reconcile = reader.section(raw, "reconcile")
    reader.keys(reconcile, "reconcile", {"balance_interval", "currencies"})
    headers = reader.section(raw, "headers")
    reader.keys(headers, "headers", {"budget_remaining"})
    reader.keys(listen, "listen", {"host", "port"})
    reader.keys(upstream, "upstream", {"base_url", "api_key_env"})
    reader.keys(pricing, "pricing", {"book", "price_at"})
    reader.keys(timeouts, "timeouts", set(Timeouts.__dataclass_fields__))
    reader.keys(limits, "limits", set(Limits.__dataclass_fields__))
    reader.keys(usage, "usage", {"server_tool_fields", "cache_creation"})
    cache_creation = usage.get("cache_creation", "miss")
    if cache_creation not in ("miss", "hit"):
        raise ConfigError(
            path, "usage.cache_creation", f"expected miss or hit, got {cache_creation!r}"
        )

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
    keys, teams, policies = read_teams(reader, raw.get("teams"))
    ledger_path, ledger_url = _ledger_location(reader, ledger)
    attribution, tag_labels = read_attribution(reader, raw)
    return ProxyConfig(
        path=path,
        host=reader.text(listen.get("host", "127.0.0.1"), "listen.host"),
        port=port,
        upstream_base_url=_base_url(reader, upstream.get("base_url", "https://api.deepseek.com")),
        upstream_key_env=key_env,
        price_book_files=_book_paths(reader, pricing.get("book", ["pricing"])),
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
        cache_creation=cache_creation,
        ledger_path=ledger_path,
        ledger_url=ledger_url,
        ledger_lease=reader.seconds(ledger.get("lease", DEFAULT_LEASE), "ledger.lease"),
        reload_watch=(
            reader.seconds(reload["watch"], "reload.watch") if "watch" in reload else None
        ),
        flush_interval=reader.seconds(
            ledger.get("flush_interval", DEFAULT_FLUSH_INTERVAL), "ledger.flush_interval"
        ),
        billing_timezone=_timezone(reader, ledger.get("billing_timezone", "Asia/Shanghai")),
        budgets=read_budgets(reader, raw.get("budgets"), teams),
        policies=MappingProxyType(policies),
        max_queued_records=reader.positive_int(
            ledger.get("max_queued_records", DEFAULT_MAX_QUEUED_RECORDS),
            "ledger.max_queued_records",
        ),
        ledger_shutdown_timeout=reader.seconds(
            ledger.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT), "ledger.shutdown_timeout"
        ),
        attribution=attribution,
        tag_labels=tag_labels,
        balance_interval=_balance_interval(reader, reconcile),
        reconcile_currencies=_currencies(reader, reconcile),
        budget_remaining_header=reader.flag(
            headers.get("budget_remaining", False), "headers.budget_remaining"
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


def _base_url(reader: Reader, value: Any) -> str:
    text = reader.text(value, "upstream.base_url")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.fail("upstream.base_url", f"expected an http(s) URL, got {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise reader.fail("upstream.base_url", "must not carry a query, fragment or credentials")
    return text.rstrip("/")


def _ledger_location(reader: Reader, ledger: Mapping[str, Any]) -> tuple[Path, str | None]:
    """The SQLite file (`ledger.path`, or a ``sqlite:///`` `ledger.url`) and the PostgreSQL URL.

    ``sqlite:///data/l.db`` is relative to the config file, ``sqlite:////var/l.db`` absolute
    (SQLAlchemy's spelling, which users know). A PostgreSQL URL must not carry a password: the
    config file holds no secrets, and libpq's ``PGPASSWORD`` and ``~/.pgpass`` (which asyncpg
    reads) keep it out. With PostgreSQL, `ledger.path` still names the local folder where a
    stopping proxy saves the records it could not write (`ProxyConfig.spill_anchor`).
    """
    folder = reader.path.parent
    path = folder / reader.text(ledger.get("path", DEFAULT_LEDGER), "ledger.path")
    if "url" not in ledger:
        return path, None
    url = reader.text(ledger["url"], "ledger.url")
    if url.startswith("sqlite:///"):
        if "path" in ledger:
            raise reader.fail("ledger.url", "set ledger.path or a sqlite:/// ledger.url, not both")
        return folder / url.removeprefix("sqlite:///"), None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise reader.fail("ledger.url", f"not a valid URL: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise reader.fail(
            "ledger.url",
            f"expected postgresql://user@host:port/database or sqlite:///path, got scheme "
            f"{parts.scheme or '(none)'!r}",
        )
    if parts.password is not None:
        raise reader.fail(
            "ledger.url",
            "must not carry a password (the config holds no secrets): set PGPASSWORD in "
            "the proxy's environment or use ~/.pgpass",
        )
    if not parts.hostname and "host=" not in parts.query:
        raise reader.fail("ledger.url", "names no host")
    return path, url


def _balance_interval(reader: Reader, reconcile: Mapping[str, Any]) -> float | None:
    """``reconcile.balance_interval``: seconds, 0 for off (`DEFAULT_BALANCE_INTERVAL`)."""
    value = reconcile.get("balance_interval", DEFAULT_BALANCE_INTERVAL)
    if value in (0, "0") and not isinstance(value, bool):
        return None
    seconds = reader.seconds(value, "reconcile.balance_interval")
    if seconds < 1:
        raise reader.fail(
            "reconcile.balance_interval",
            f"expected 0 (off) or at least 1 second, got {seconds:g}: each poll is a request "
            "to DeepSeek",
        )
    return seconds


def _currencies(reader: Reader, reconcile: Mapping[str, Any]) -> frozenset[str] | None:
    """``reconcile.currencies``: a list of currency codes; absent: every one."""
    if "currencies" not in reconcile:
        return None
    value = reconcile["currencies"]
    if not isinstance(value, list) or not value:
        raise reader.fail("reconcile.currencies", f"expected a list of currencies, got {value!r}")
    codes = []
    for item in value:
        code = reader.text(item, "reconcile.currencies")
        if len(code) != 3 or not (code.isascii() and code.isalpha()):
            raise reader.fail("reconcile.currencies", f"{code!r} is not a currency code")
        codes.append(code.upper())
    return frozenset(codes)


def _book_paths(reader: Reader, value: Any) -> tuple[Path, ...]:
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


def _timezone(reader: Reader, value: Any) -> ZoneInfo:
    name = reader.text(value, "ledger.billing_timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise reader.fail("ledger.billing_timezone", f"unknown timezone {name!r}") from None


def _tool_fields(reader: Reader, usage: Mapping[str, Any]) -> dict[str, str]:
    fields = usage.get("server_tool_fields", {})
    if not isinstance(fields, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
    ):
        raise reader.fail("usage.server_tool_fields", "expected a mapping of field -> tool name")
    return dict(fields)
