"""The proxy config: the shipped example loads; each defect names file, key and reason."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.auth import authenticate, hash_key, key_id_of, new_key
from proxy.config import ConfigError, load_config
from proxy.listener import CANCEL_GRACE
from tests.conftest import ROOT

SHIPPED = ROOT / "config" / "proxy.yaml"
HASH = "sha256:" + "ab" * 32


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


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "book.yaml").write_text((ROOT / "config/pricing/deepseek.yaml").read_text())
    path = tmp_path / "proxy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


BASE = f"pricing: {{book: [book.yaml]}}\nteams:\n  a:\n    keys: ['{HASH}']\n"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (BASE + "listen: {port: 99999}\n", "listen.port", "expected a port number, got 99999"),
        (
            BASE + "upstream: {base_url: 'ftp://x'}\n",
            "upstream.base_url",
            "expected an http(s) URL, got 'ftp://x'",
        ),
        (
            BASE + "upstream: {base_url: 'https://user:pw@api.deepseek.com'}\n",
            "upstream.base_url",
            "must not carry a query, fragment or credentials",
        ),
        (
            BASE + "upstream: {api_key_env: 'sk-live-123'}\n",
            "upstream.api_key_env",
            "expected the name of an environment variable",
        ),
        (
            BASE + "upstream: {api_key: x}\n",
            "upstream.api_key",
            "unknown key (allowed: api_key_env, base_url)",
        ),
        (
            BASE + "timeouts: {total: -1}\n",
            "timeouts.total",
            "expected a positive number of seconds, got -1",
        ),
        (
            BASE.replace("[book.yaml]}", "[book.yaml], price_at: later}"),
            "pricing.price_at",
            "expected request_start or response_end, got 'later'",
        ),
        (BASE + "pricing: {price_at: later}\n", "(file)", "duplicate key 'pricing'"),
        (BASE.replace("book.yaml", "missing.yaml"), "pricing.book", "does not exist"),
        (
            BASE.replace(HASH, "sha256:xyz"),
            "teams.a.keys[0]",
            "expected 'sha256:' and 64 lower-case hex digits",
        ),
        (
            BASE + f"  b:\n    keys: ['{HASH}']\n",
            "teams.b.keys[0]",
            "the same key is already listed for team 'a'",
        ),
        ("pricing: {book: [book.yaml]}\n", "teams", "expected at least one team"),
        (BASE + "listen: {host: 1.2.3.4, porrt: 1}\n", "listen.porrt", "unknown key"),
        (
            BASE + "ledger: {max_queued_records: 0}\n",
            "ledger.max_queued_records",
            "expected a positive whole number, got 0",
        ),
        (
            BASE + "ledger: {max_queued_records: 1.5}\n",
            "ledger.max_queued_records",
            "expected a positive whole number, got '1.5'",
        ),
        (
            BASE + "ledger: {shutdown_timeout: 0}\n",
            "ledger.shutdown_timeout",
            "expected a positive number of seconds, got 0",
        ),
        (
            BASE + "ledger: {shutdown_timeout: soon}\n",
            "ledger.shutdown_timeout",
            "expected seconds, got 'soon'",
        ),
    ],
)
def test_config_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert reason in info.value.reason


def test_serve_refuses_to_start_without_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    env = {"PATH": "/usr/bin:/bin", "DEEPSEEK_API_KEY": ""}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"cannot start: {path}: upstream.api_key_env: environment variable DEEPSEEK_API_KEY "
        "is not set (it must hold the DeepSeek API key)"
    )


def test_serve_refuses_a_bad_price_book(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    (tmp_path / "book.yaml").write_text("currencies: [CNY]\nmodels: {x: []}\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "DEEPSEEK_API_KEY": "sk-fake"},
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'book.yaml'}: models.x: expected a non-empty list" in result.stderr


def test_keys_new_prints_a_working_config_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "new", "--team", "search"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    key = lines[1].strip()
    assert key.startswith("sk-proxy-") and len(key) > 40
    digest = hash_key(key)
    assert lines[-1].strip() == f"- sha256:{digest}   # {key_id_of(digest)}"
    assert key not in lines[-1]


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


def serve(path: Path, env_key: str = "sk-fake-test") -> subprocess.CompletedProcess[str]:
    """``serve`` that is expected to refuse to start (60 s would be a hang)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "DEEPSEEK_API_KEY": env_key},
    )


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        (
            "budgets: {a: [{period: day, amount: 1, currency: EUR}]}",
            "budgets.a[0].currency",
            "'EUR' is not a currency of the price book (it has CNY, USD)",
        ),
        (
            "budgets: {a: [{period: day, amount: 1, currency: CNY}, "
            "{period: month, amount: 1, currency: RMB}]}",
            "budgets.a[1].currency",
            "'RMB' is not a currency of the price book (it has CNY, USD)",
        ),
        (
            "usage: {server_tool_fields: {image_search_requests: image_search}}",
            "usage.server_tool_fields.image_search_requests",
            "'image_search' is not a tool of the price book (it has fetch, search)",
        ),
    ],
)
def test_config_is_checked_against_the_book_before_listening(
    tmp_path: Path, extra: str, key: str, reason: str
) -> None:
    """Once, a budget in EUR started fine and then failed every call of its team with a bare
    500 (KeyError: 'EUR'). Now the proxy does not start, and says why in one line."""
    path = write(tmp_path, BASE + extra + "\n")
    result = serve(path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"cannot start: {path}: {key}: {reason}"]


def test_lower_case_currency_is_the_book_currency(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "budgets: {a: [{period: day, amount: 1, currency: cny}]}\n")
    [budget] = load_config(path).budgets
    assert budget.currency == "CNY"


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(
            tmp_path,
            BASE + f"listen: {{host: 127.0.0.1, port: {port}}}\nledger: {{path: ledger.sqlite3}}\n",
        )
        result = serve(path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"cannot start: {path}: listen: cannot listen on 127.0.0.1:{port}: address already in use"
    )
    assert "Traceback" not in result.stderr


def test_a_key_pasted_into_api_key_env_is_never_echoed(tmp_path: Path) -> None:
    canary = "sk-canary-0123456789abcdef"
    path = write(tmp_path, BASE + f"upstream: {{api_key_env: '{canary}'}}\n")
    result = serve(path)
    assert result.returncode == 2
    assert "upstream.api_key_env" in result.stderr
    assert canary not in result.stderr + result.stdout and canary[-8:] not in result.stderr
