"""The README's report, statement and re-price commands work as written: each runs, from a
folder holding a copy of the shipped ``config/`` (so the default ``--config`` is the shipped
file) and a ledger of its team ``example``, through a shell, redirections included."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook
from tests.conftest import ROOT
from tests.support.ledger_rows import BEIJING, sample_rows

SECTION = "**Report, statement and re-price:**"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index(SECTION) :].split("```")[1]
    return [
        line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("python")
    ]


@pytest.mark.slow  # seven interpreters, about ten seconds
def test_readme_report_commands_work_as_written(tmp_path: Path, book: PriceBook) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    config = load_config(tmp_path / "config" / "proxy.yaml")
    assert config.teams == ("example",)
    _, final = sample_rows(book)
    config.ledger_path.parent.mkdir(parents=True, exist_ok=True)
    store = SQLiteLedger(config.ledger_path, BEIJING)
    rows = [dataclasses.replace(r, team="example") for r in final]
    rows = [  # every other call tagged, with an end user: `--by tag:project,user` has both
        dataclasses.replace(r, tags={"project": "ranker"}, end_user="u-1") if i % 2 else r
        for i, r in enumerate(rows)
    ]
    store.write([], rows)
    store.close()
    commands = readme_commands()
    assert len(commands) == 8
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in commands:
        result = subprocess.run(
            ["/bin/sh", "-c", command.replace("python", f"'{sys.executable}'", 1)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, (command, result.stderr)
    assert (tmp_path / "november.csv").read_text(encoding="utf-8").startswith("team,week,")
    page = (tmp_path / "example-2026-11.html").read_text(encoding="utf-8")
    assert "<h1>Statement of team example for 2026-11</h1>" in page
