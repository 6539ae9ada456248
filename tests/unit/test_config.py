"""The proxy config: the shipped example loads; each defect names file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.auth import authenticate, hash_key, new_key
from proxy.config import ConfigError, load_config
from proxy.listener import CANCEL_GRACE
from tests.conftest import ROOT
from tests.support.config_files import KEY_HASH, ONE_TEAM, config_with_shipped_book

SHIPPED = ROOT / "config" / "proxy.yaml"


def test_shipped_config_loads() -> None:
    config = load_config(SHIPPED)
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.upstream_base_url == "https://api.deepseek.com"
    assert config.upstream_key_env == "DEEPSEEK_API_KEY"
    assert config.price_book_files == (ROOT / "config" / "pricing" / "deepseek.yaml",)
    assert config.price_at == "request_start"
    assert config.teams == ("example",)
    client = authenticate("Bearer sk-proxy-example-change-me", config.keys)
    assert client is not None
    assert (client.team, client.key_id) == ("example", "k_a7fc859a")
    assert config.timeouts.total == 1800
    assert (config.max_queued_records, config.ledger_shutdown_timeout) == (50_000, 10.0)


def test_a_stop_ends_within_the_compose_grace_period() -> None:
    """SIGTERM ends the server within timeouts.drain plus aiohttp's two waits for cancelled
    calls, then the ledger gets ledger.shutdown_timeout: all of it must fit in the grace
    period docker-compose gives before its SIGKILL, or records would be lost."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    grace = compose["services"]["proxy"]["stop_grace_period"]
    assert grace.endswith("s")
    for path in (SHIPPED, ROOT / "config" / "proxy.docker.yaml"):
        config = load_config(path)
        stop = (
            config.timeouts.drain + 2 * CANCEL_GRACE + config.ledger_shutdown_timeout + 0.5
        )  # the writer thread's stop (proxy/serve.py)
        assert stop < float(grace[:-1]), path


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (ONE_TEAM + "listen: {port: 99999}\n", "listen.port", "expected a port number, got 99999"),
        (
            ONE_TEAM + "upstream: {base_url: 'ftp://x'}\n",
            "upstream.base_url",
            "expected an http(s) URL, got 'ftp://x'",
        ),
        (
            ONE_TEAM + "upstream: {base_url: 'https://user:pw@api.deepseek.com'}\n",
            "upstream.base_url",
            "must not carry a query, fragment or credentials",
        ),
        (
            ONE_TEAM + "upstream: {api_key_env: 'sk-live-123'}\n",
            "upstream.api_key_env",
            "expected the name of an environment variable",
        ),
        (
            ONE_TEAM + "upstream: {api_key: x}\n",
            "upstream.api_key",
            "unknown key (allowed: api_key_env, base_url)",
        ),
        (
            ONE_TEAM + "timeouts: {total: -1}\n",
            "timeouts.total",
            "expected a positive number of seconds, got -1",
        ),
        (
            ONE_TEAM.replace("[book.yaml]}", "[book.yaml], price_at: later}"),
            "pricing.price_at",
            "expected request_start or response_end, got 'later'",
        ),
        (ONE_TEAM + "pricing: {price_at: later}\n", "(file)", "duplicate key 'pricing'"),
        (ONE_TEAM.replace("book.yaml", "missing.yaml"), "pricing.book", "does not exist"),
        (
            ONE_TEAM.replace(KEY_HASH, "sha256:xyz"),
            "teams.a.keys[0]",
            "expected 'sha256:' and 64 lower-case hex digits",
        ),
        (
            ONE_TEAM + f"  b:\n    keys: ['{KEY_HASH}']\n",
            "teams.b.keys[0]",
            "the same key is already listed for team 'a'",
        ),
        ("pricing: {book: [book.yaml]}\n", "teams", "expected at least one team"),
        (ONE_TEAM + "listen: {host: 1.2.3.4, porrt: 1}\n", "listen.porrt", "unknown key"),
        (
            ONE_TEAM + "ledger: {max_queued_records: 0}\n",
            "ledger.max_queued_records",
            "expected a positive whole number, got 0",
        ),
        (
            ONE_TEAM + "ledger: {max_queued_records: 1.5}\n",
            "ledger.max_queued_records",
            "expected a positive whole number, got '1.5'",
        ),
        (
            ONE_TEAM + "ledger: {shutdown_timeout: 0}\n",
            "ledger.shutdown_timeout",
            "expected a positive number of seconds, got 0",
        ),
        (
            ONE_TEAM + "ledger: {shutdown_timeout: soon}\n",
            "ledger.shutdown_timeout",
            "expected seconds, got 'soon'",
        ),
        (
            ONE_TEAM + "ledger: {url: 'postgresql://proxy:hunter2@db/ledger'}\n",
            "ledger.url",
            "must not carry a password (the config holds no secrets): set PGPASSWORD",
        ),
        (
            ONE_TEAM + "ledger: {url: 'mysql://db/ledger'}\n",
            "ledger.url",
            "expected postgresql://user@host:port/database or sqlite:///path, got scheme 'mysql'",
        ),
        (
            ONE_TEAM + "ledger: {url: 'postgresql://db:port/ledger'}\n",
            "ledger.url",
            "not a valid URL",
        ),
        (ONE_TEAM + "ledger: {url: 'postgresql:///ledger'}\n", "ledger.url", "names no host"),
        (
            ONE_TEAM + "ledger: {url: 'sqlite:///a.db', path: b.db}\n",
            "ledger.url",
            "set ledger.path or a sqlite:/// ledger.url, not both",
        ),
        (ONE_TEAM + "ledger: {lease: -1}\n", "ledger.lease", "expected a positive number"),
        (ONE_TEAM + "reload: {watch: 0}\n", "reload.watch", "expected a positive number"),
        (ONE_TEAM + "reload: {wacth: 10}\n", "reload.wacth", "unknown key"),
        (
            ONE_TEAM + "headers: {budget_remaining: 'true'}\n",
            "headers.budget_remaining",
            "expected true or false, got 'true'",
        ),
        (
            ONE_TEAM + "headers: {budget_remaining: 1}\n",
            "headers.budget_remaining",
            "expected true or false, got 1",
        ),
        (ONE_TEAM + "headers: {remaining: true}\n", "headers.remaining", "unknown key"),
        (ONE_TEAM + "headers: [budget_remaining]\n", "headers", "expected a mapping"),
        (ONE_TEAM + "reconcile: {interval: 60}\n", "reconcile.interval", "unknown key"),
        (
            ONE_TEAM + "reconcile: {balance_interval: 0.5}\n",
            "reconcile.balance_interval",
            "expected 0 (off) or at least 1 second, got 0.5",
        ),
        (
            ONE_TEAM + "reconcile: {balance_interval: -5}\n",
            "reconcile.balance_interval",
            "expected a positive number of seconds, got -5",
        ),
        (
            ONE_TEAM + "reconcile: {balance_interval: false}\n",
            "reconcile.balance_interval",
            "expected a positive number of seconds, got False",
        ),
        (
            ONE_TEAM + "reconcile: {currencies: CNY}\n",
            "reconcile.currencies",
            "expected a list of currencies, got 'CNY'",
        ),
        (
            ONE_TEAM + "reconcile: {currencies: [RMB1]}\n",
            "reconcile.currencies",
            "'RMB1' is not a currency code",
        ),
    ],
)
def test_config_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = config_with_shipped_book(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert reason in info.value.reason


def test_authenticate_rejects_everything_else() -> None:
    key = new_key()
    keys = {hash_key(key): load_config(SHIPPED).keys[next(iter(load_config(SHIPPED).keys))]}
    assert authenticate(f"Bearer {key}", keys) is not None
    assert authenticate(f"bearer  {key} ", keys) is not None
    for header in (
        None,
        "",
        key,
        f"Basic {key}",
        "Bearer ",
        f"Bearer {key}x",
        "Bearer " + "a" * 5000,
    ):
        assert authenticate(header, keys) is None


def test_lower_case_currency_is_the_book_currency(tmp_path: Path) -> None:
    path = config_with_shipped_book(
        tmp_path, ONE_TEAM + "budgets: {a: [{period: day, amount: 1, currency: cny}]}\n"
    )
    [budget] = load_config(path).budgets
    assert budget.currency == "CNY"


def test_ledger_locations(tmp_path: Path) -> None:
    """SQLite by default, relative to the config; ``sqlite:///`` relative, ``sqlite:////``
    absolute; a PostgreSQL URL keeps ``ledger.path``'s folder for the records it could not
    write, and is named in messages as written (it holds no password)."""
    default = load_config(config_with_shipped_book(tmp_path, ONE_TEAM))
    assert (default.ledger_url, default.ledger_path) == (None, tmp_path / "../data/ledger.sqlite3")
    assert default.spill_anchor == default.ledger_path
    relative = load_config(
        config_with_shipped_book(tmp_path, ONE_TEAM + "ledger: {url: 'sqlite:///x/l.db'}\n")
    )
    assert (relative.ledger_url, relative.ledger_path) == (None, tmp_path / "x/l.db")
    absolute = load_config(
        config_with_shipped_book(tmp_path, ONE_TEAM + "ledger: {url: 'sqlite:////var/l.db'}\n")
    )
    assert absolute.ledger_path == Path("/var/l.db")
    url = "postgresql://proxy@db.internal:5432/ledger"
    shared = load_config(
        config_with_shipped_book(tmp_path, ONE_TEAM + f"ledger: {{url: '{url}', lease: 6}}\n")
    )
    assert (shared.ledger_url, shared.ledger_shown, shared.ledger_lease) == (url, url, 6.0)
    assert shared.spill_anchor == tmp_path / "../data/postgresql-ledger"


def test_budget_remaining_header_is_off_unless_set(tmp_path: Path) -> None:
    assert not load_config(config_with_shipped_book(tmp_path, ONE_TEAM)).budget_remaining_header
    on = config_with_shipped_book(tmp_path, ONE_TEAM + "headers: {budget_remaining: true}\n")
    assert load_config(on).budget_remaining_header


def test_reload_watch_is_off_unless_set(tmp_path: Path) -> None:
    assert load_config(config_with_shipped_book(tmp_path, ONE_TEAM)).reload_watch is None
    watched = config_with_shipped_book(tmp_path, ONE_TEAM + "reload: {watch: 10}\n")
    assert load_config(watched).reload_watch == 10.0


def test_the_balance_is_polled_every_5_minutes_unless_set(tmp_path: Path) -> None:
    default = load_config(config_with_shipped_book(tmp_path, ONE_TEAM))
    assert (default.balance_interval, default.reconcile_currencies) == (300.0, None)
    off = config_with_shipped_book(tmp_path, ONE_TEAM + "reconcile: {balance_interval: 0}\n")
    assert load_config(off).balance_interval is None
    chosen = config_with_shipped_book(
        tmp_path, ONE_TEAM + "reconcile: {balance_interval: 60, currencies: [cny]}\n"
    )
    assert (load_config(chosen).balance_interval, load_config(chosen).reconcile_currencies) == (
        60.0,
        frozenset({"CNY"}),
    )
