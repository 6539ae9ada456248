"""`proxy.reload.Reloader` without a server: what a reload reads, keeps and counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ProxyConfig, load_config
from proxy.pricing import PriceBook, load_price_book
from proxy.reload import Reloader, ReloadRefused
from tests.support.config_files import ONE_TEAM, config_with_shipped_book


def loaded(tmp_path: Path) -> tuple[ProxyConfig, PriceBook]:
    config = load_config(config_with_shipped_book(tmp_path, ONE_TEAM))
    return config, load_price_book(config.price_book_files)


async def test_a_failing_apply_is_counted_and_changes_nothing(tmp_path: Path) -> None:
    """What the app cannot take (`ReloadRefused`) and a bug alike: counted as a failure, the
    running configuration kept, the proxy never ended."""
    config, book = loaded(tmp_path)
    outcomes = [ReloadRefused("teams: no room"), RuntimeError("a bug")]

    def apply(new: ProxyConfig, new_book: PriceBook) -> None:
        raise outcomes.pop(0)

    reloader = Reloader(config, book, apply)
    assert await reloader.reload() is False
    assert await reloader.reload() is False
    status = reloader.status()
    assert (status.successes, status.failures) == (0, 2)
    assert reloader.config is config


async def test_restart_only_keys_keep_their_running_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, book = loaded(tmp_path)
    applied: list[ProxyConfig] = []
    reloader = Reloader(config, book, lambda new, _: applied.append(new))
    config_with_shipped_book(tmp_path, ONE_TEAM + "listen: {port: 9999}\nledger: {lease: 7}\n")
    assert await reloader.reload() is True
    [new] = applied
    assert (new.port, new.ledger_lease) == (config.port, config.ledger_lease)
    assert "except listen.port, ledger.lease: changing these needs a restart" in caplog.text
    assert reloader.status().stale  # what runs is not what the file says
