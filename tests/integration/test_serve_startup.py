"""Starting `serve` and `keys new` in a real interpreter: a bad configuration stops start-up
with one line naming the file, the key and why, and never echoes a secret."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.auth import hash_key, key_id_of
from tests.conftest import ROOT
from tests.support.config_files import ONE_TEAM, config_with_shipped_book


def test_serve_refuses_to_start_without_the_key(tmp_path: Path) -> None:
    path = config_with_shipped_book(tmp_path, ONE_TEAM)
    result = serve(path, env_key="")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"cannot start: {path}: upstream.api_key_env: environment variable DEEPSEEK_API_KEY "
        "is not set (it must hold the DeepSeek API key)"
    )


def test_serve_refuses_a_bad_price_book(tmp_path: Path) -> None:
    path = config_with_shipped_book(tmp_path, ONE_TEAM)
    (tmp_path / "book.yaml").write_text("currencies: [CNY]\nmodels: {x: []}\n")
    result = serve(path)
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
    path = config_with_shipped_book(tmp_path, ONE_TEAM + extra + "\n")
    result = serve(path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"cannot start: {path}: {key}: {reason}"]


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = config_with_shipped_book(
            tmp_path,
            ONE_TEAM
            + f"listen: {{host: 127.0.0.1, port: {port}}}\nledger: {{path: ledger.sqlite3}}\n",
        )
        result = serve(path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"cannot start: {path}: listen: cannot listen on 127.0.0.1:{port}: address already in use"
    )
    assert "Traceback" not in result.stderr


def test_a_key_pasted_into_api_key_env_is_never_echoed(tmp_path: Path) -> None:
    canary = "sk-canary-0123456789abcdef"
    path = config_with_shipped_book(tmp_path, ONE_TEAM + f"upstream: {{api_key_env: '{canary}'}}\n")
    result = serve(path)
    assert result.returncode == 2
    assert "upstream.api_key_env" in result.stderr
    assert canary not in result.stderr + result.stdout and canary[-8:] not in result.stderr
