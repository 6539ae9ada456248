"""The statement's HTML page as a browser builds it: headless Chromium (Debian's ``chromium``)
loads the file and dumps its DOM, which must hold the ledger's totals, every day's bar, and
the hostile names as text, never as elements (no script, no image: nothing would run or be
fetched).

Skipped where Chromium is missing, except in CI (``CI`` set), which installs it (``.ci/run``)
and must run these tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.formats import ZERO, decimal_text
from proxy.pricing import PriceBook
from tests.integration.test_statement import (
    HOSTILE_KEY,
    HOSTILE_MODEL,
    NOVEMBER,
    check_page,
    hostile_ledger,
    html_statement,
)
from tests.support.ledger_rows import report_json, sample_rows
from tests.support.page import read_page

MISSING = "Chromium is not installed (Debian: apt-get install chromium)"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{MISSING}; CI must run the browser tests")
        pytest.skip(f"{MISSING}; CI runs these tests")
    return found


def rendered_dom(page: Path, profile: Path) -> str:
    """The DOM Chromium builds from `page` (a file: no network), as HTML."""
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--disable-gpu",
            "--no-sandbox",  # tests run as root in CI
            f"--user-data-dir={profile}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<body>" in result.stdout, result.stderr[-2000:]
    return result.stdout


def test_rendered_statement_shows_the_ledgers_totals_and_hostile_names_as_text(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, book: PriceBook
) -> None:
    config = hostile_ledger(tmp_path, book)
    page_file = tmp_path / "statement.html"
    page_file.write_text(html_statement(capsys, config), encoding="utf-8")
    page = read_page(rendered_dom(page_file, tmp_path / "profile"))

    report = report_json(capsys, config, "--team", "alpha", *NOVEMBER, "--by", "team")
    check_page(page, report)
    # The totals are the ledger's: r1, the one priced call of alpha it holds.
    r1 = sample_rows(book)[1][0]
    for column, currency in ((1, "CNY"), (2, "USD")):
        assert page.tables["totals"][1][column] == decimal_text(r1.costs[currency])
        assert Decimal(page.tables["totals"][2][column]) == r1.cache_savings[currency]
    assert [tip for tip in page.bars if not tip.endswith(": 0 CNY")] == [
        f"2026-11-01: {decimal_text(r1.costs['CNY'])} CNY"
    ]
    # The hostile strings, as the browser holds them: text in cells, in the unpriced reason too.
    cells = [cell for rows in page.tables.values() for row in rows for cell in row]
    assert HOSTILE_MODEL in cells and HOSTILE_KEY in cells
    assert f"model '{HOSTILE_MODEL}' is not in the price book" in cells
    assert sum((Decimal(tip.split()[1]) for tip in page.bars), ZERO) == r1.costs["CNY"]
