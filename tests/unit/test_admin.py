"""The operator's commands for live changes: ``keys new`` refuses a team name the config would
refuse, ``keys list`` tells which key id is which line, ``config check`` reads a config and its
price book exactly as ``serve`` and a reload do (for CI before a change reaches a proxy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.auth import key_id_of
from proxy.cli import main
from tests.support.config_files import KEY_HASH, ONE_TEAM, config_with_shipped_book


@pytest.mark.parametrize("team", ["Search", "search team", "search\n", "-search", "a" * 64, ""])
def test_keys_new_refuses_a_team_name_the_config_would_refuse(
    team: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new", f"--team={team}"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "team names are 1 to 63 lower-case letters, digits" in err


def test_keys_new_prints_a_line_the_config_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new", "--team", "search.v2"]) == 0
    out = capsys.readouterr().out
    line = next(x.strip() for x in out.splitlines() if x.strip().startswith("- sha256:"))
    digest = line.removeprefix("- sha256:").split()[0]
    config = config_with_shipped_book(
        tmp_path,
        f"pricing: {{book: [book.yaml]}}\nteams:\n  search.v2:\n    keys: ['sha256:{digest}']\n",
    )
    assert main(["config", "check", "--config", str(config)]) == 0
    assert main(["keys", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert f"search.v2:\n  {key_id_of(digest)}  (sha256:{digest[:16]}...)" in listing


def test_config_check_names_the_file_key_and_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = config_with_shipped_book(tmp_path, ONE_TEAM)
    assert main(["config", "check", "--config", str(good)]) == 0
    assert f"{good}: valid: 1 team(s), 1 key(s), 0 budget(s)" in capsys.readouterr().out
    bad = config_with_shipped_book(
        tmp_path, ONE_TEAM + "budgets:\n  a:\n    - {period: day, amount: 1, currency: EUR}\n"
    )
    assert main(["config", "check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"invalid: {bad}: budgets.a[0].currency: 'EUR' is not a currency")
    assert KEY_HASH[7:] not in err
