"""``statement``: a team's month, as text and as an HTML page, on both ledgers.

Its figures are ``report``'s for the same team and month, exactly (each section against the
report grouped by the same key, as JSON); the text is the same from either ledger; the HTML
page escapes every string the ledger holds (a model named ``<script>...`` stays text), which
is checked on the page as a browser builds it (headless Chromium, `test_statement_browser`)
and here with the standard library's parser.

The ledgers hold test_report_groups.py's records: `sample_rows` and four calls around the end
of November in Beijing.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.config import load_config
from proxy.ledger.command_support import open_ledger
from proxy.ledger.pg_store import PostgresLedger
from proxy.ledger.statement import Section, Statement, build_statement, sections
from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook
from tests.conftest import ROOT, SHIPPED_BOOK
from tests.integration.test_report_groups import end_of_november
from tests.support.ledger_rows import (
    BEIJING,
    FIGURES,
    record,
    report_json,
    run,
    sample_rows,
    write_config,
)
from tests.support.page import Page, read_page
from tests.support.postgres import Postgres

BACKENDS = ("sqlite", "postgresql")
NOVEMBER = ("--since", "2026-11-01", "--until", "2026-12-01")


@pytest.fixture(scope="module")
def configs(
    tmp_path_factory: pytest.TempPathFactory, postgres: Postgres, book: PriceBook
) -> Iterator[dict[str, Path]]:
    """Backend -> a config naming a ledger of that kind, holding the same records."""
    pending, final = sample_rows(book)
    final += end_of_november(book)
    shipped = SHIPPED_BOOK.read_text(encoding="utf-8")
    folder = tmp_path_factory.mktemp("statement")
    url = postgres.new_database()
    (folder / "sqlite").mkdir()
    (folder / "pg").mkdir()
    for store in (
        SQLiteLedger(folder / "sqlite" / "ledger.sqlite3", BEIJING),
        PostgresLedger(url, BEIJING),
    ):
        store.write(pending, final)
        store.close()
    yield {
        "sqlite": write_config(folder / "sqlite", shipped),
        "postgresql": write_config(folder / "pg", shipped, url=url),
    }


def statement_of(config: Path, team: str, top: int = 10) -> Statement:
    """The statement of `team` for November 2026, built as the command builds it."""
    with closing(open_ledger(load_config(config))) as queries:
        return build_statement(queries, team, date(2026, 11, 1), BEIJING, ("CNY", "USD"), top)


def section(statement: Statement, slug: str) -> Section:
    return next(s for s in sections(statement) if s.slug == slug)


def report_rows(report: dict[str, Any], key: str) -> list[tuple[str, ...]]:
    """A report's lines and total as a statement section shows them (no label: ``-``)."""
    rows = report["rows"]
    assert isinstance(rows, list)

    def cells(line: dict[str, Any]) -> tuple[str, ...]:
        return (
            *(str(line[f]) for f in FIGURES),
            line["cost"]["CNY"],
            line["cost"]["USD"],
        )

    return [
        *((r[key] if r[key] is not None else "-", *cells(r)) for r in rows),
        ("TOTAL", *cells(report["total"])),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("team", ["alpha", "beta"])
def test_statement_figures_are_the_reports(
    capsys: pytest.CaptureFixture[str], configs: dict[str, Path], backend: str, team: str
) -> None:
    """Each section equals ``report --team T --since 2026-11-01 --until 2026-12-01 --by K``."""
    config = configs[backend]
    statement = statement_of(config, team)

    def report(key: str) -> dict[str, Any]:
        return report_json(capsys, config, "--team", team, *NOVEMBER, "--by", key)

    for slug, key in (("tiers", "tier"), ("models", "model"), ("keys", "key"), ("days", "day")):
        assert list(section(statement, slug).rows) == report_rows(report(key), key), slug
    # Each tag the team's calls carried in November has its section: alpha's FIM call of 29
    # November is tagged project=ranker, env=prod; beta's of 30 November project=search.
    tags = {"alpha": ["env", "project"], "beta": ["project"]}[team]
    assert [name for name, _ in statement.by_tags] == tags
    for name in tags:
        expected = report_rows(report(f"tag:{name}"), f"tag:{name}")
        rows = list(section(statement, f"tag-{name}").rows)  # ranked by spend, not by label
        assert sorted(rows[:-1]) == sorted(expected[:-1]) and rows[-1] == expected[-1], name
    total = report("team")["total"]
    assert isinstance(total, dict)
    assert section(statement, "totals").rows == (
        ("cost", total["cost"]["CNY"], total["cost"]["USD"]),
        ("cache savings", total["cache_savings"]["CNY"], total["cache_savings"]["USD"]),
    )
    for currency in ("CNY", "USD"):
        assert statement.total.costs[currency] == Decimal(total["cost"][currency])
        assert statement.total.savings[currency] == Decimal(total["cache_savings"][currency])
    assert section(statement, "calls").rows == (tuple(str(total[f]) for f in FIGURES),)
    for slug, key, count in (
        ("unpriced", "unpriced_reason", "unpriced"),
        ("estimated", "outcome", "estimated"),
    ):
        lines = report(key)["rows"]
        assert isinstance(lines, list)
        assert list(section(statement, slug).rows) == [
            *((r[key], str(r[count])) for r in lines if r[count]),
            ("TOTAL", str(total[count])),
        ]


def test_statement_text_is_the_same_from_either_ledger(
    capsys: pytest.CaptureFixture[str], configs: dict[str, Path]
) -> None:
    argv = ("statement", "--team", "beta", "--month", "2026-11")
    sqlite = run(capsys, argv[0], "--config", str(configs["sqlite"]), *argv[1:])
    pg = run(capsys, argv[0], "--config", str(configs["postgresql"]), *argv[1:])
    assert pg == sqlite
    code, out, _ = sqlite
    assert code == 0
    lines = out.splitlines()
    # r3 (peak), r4 (peak, estimated), r5 (unpriced), r6 (refused) and g2 (off-peak).
    assert lines[:2] == [
        "Statement of team beta for 2026-11",
        "Calls started from 2026-11-01T00:00:00+08:00 until 2026-12-01T00:00:00+08:00 "
        "(exclusive); billing timezone Asia/Shanghai",
    ]
    assert lines[6:9] == [
        "                   CNY        USD",
        "cost           0.02184  0.0032032",
        "cache savings   0.0174   0.002552",
    ]
    assert lines[13:15] == [
        "requests  billable  cache_hit  cache_miss  output  reasoning  unpriced  estimated",
        "       5         4       3000        2600     130          0         1          1",
    ]
    tiers = lines.index("Peak and off-peak")
    assert lines[tiers + 2 : tiers + 7] == [
        "tier      requests  billable  cache_hit  cache_miss  output  reasoning  unpriced"
        "  estimated      CNY        USD",
        "off_peak         1         1       2000        1000       0          0         0"
        "          0   0.0048   0.000704",
        "peak             2         2       1000        1500     120          0         0"
        "          1  0.01704  0.0024992",
        "-                2         1          0         100      10          0         1"
        "          0        0          0",
        "TOTAL            5         4       3000        2600     130          0         1"
        "          1  0.02184  0.0032032",
    ]
    unpriced = lines.index("Unpriced calls")
    assert lines[unpriced + 3 : unpriced + 6] == [
        "unpriced_reason                                 calls",
        "model 'deepseek-next' is not in the price book      1",
        "TOTAL                                               1",
    ]
    estimated = lines.index("Estimated usage")
    assert lines[estimated + 3 :] == [
        "outcome       calls",
        "upstream_cut      1",
        "TOTAL             1",
    ]


def test_statement_html_is_the_same_from_either_ledger(
    capsys: pytest.CaptureFixture[str], configs: dict[str, Path]
) -> None:
    pages = [html_statement(capsys, configs[backend]) for backend in BACKENDS]
    assert pages[0] == pages[1]
    page = read_page(pages[0])
    assert page.tables["days"][1:] == [list(row) for row in statement_rows(configs, "days")]


def statement_rows(configs: dict[str, Path], slug: str) -> tuple[tuple[str, ...], ...]:
    return section(statement_of(configs["sqlite"], "alpha"), slug).rows


def test_statement_subprocess(configs: dict[str, Path]) -> None:
    """``python -m proxy statement`` in a real interpreter, through `proxy.cli`."""
    argv = ("--config", str(configs["sqlite"]), "--team", "beta", "--month", "2026-11")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "statement", *argv, "--format", "html"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert read_page(result.stdout).tables["totals"][1] == ["cost", "0.02184", "0.0032032"]


def test_top_keys_sum_the_rest_in_one_line(configs: dict[str, Path]) -> None:
    """alpha: k_abababab (r1, r2, r7) spent 0.0192 CNY, k_cdcdcdcd (g1) 0.001."""
    keys = section(statement_of(configs["sqlite"], "alpha", top=1), "keys").rows
    assert keys == (
        ("k_abababab", "3", "3", "10000", "3000", "1500", "100", "1", "0", "0.0192", "0.00288"),
        ("(1 other key)", "1", "1", "0", "1000", "0", "0", "0", "0", "0.001", "0.00015"),
        ("TOTAL", "4", "4", "10000", "4000", "1500", "100", "1", "0", "0.0202", "0.00303"),
    )


def test_every_day_of_the_month_is_charted(configs: dict[str, Path]) -> None:
    days = statement_of(configs["sqlite"], "beta").day_costs("CNY")
    assert len(days) == 30
    assert [(d.isoformat(), str(a)) for d, a in days if a] == [
        ("2026-11-02", "0.01704"),
        ("2026-11-30", "0.0048"),
    ]


def test_a_team_neither_configured_nor_in_the_ledger_exits_2(
    capsys: pytest.CaptureFixture[str], configs: dict[str, Path]
) -> None:
    """A mistyped team would otherwise be a statement of zeros."""
    config = str(configs["sqlite"])
    code, out, err = run(
        capsys, "statement", "--config", config, "--team", "alpah", "--month", "2026-11"
    )
    assert (code, out) == (2, "")
    assert err == f"unknown team 'alpah': not in {config} and not in the ledger\n"


@pytest.mark.parametrize(
    "argv",
    [
        ("--team", "alpha", "--month", "2026-13"),
        ("--team", "alpha", "--month", "2026-11-01"),
        ("--team", "alpha", "--month", "November"),
        ("--team", "alpha", "--month", "2026-11", "--top", "0"),
        ("--month", "2026-11"),
        ("--team", "alpha", "--month", "2026-11", "--format", "pdf"),
    ],
)
def test_bad_statement_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], configs: dict[str, Path], argv: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "statement", "--config", str(configs["sqlite"]), *argv)
    assert exit_info.value.code == 2


HOSTILE_MODEL = "<script>alert(1)</script>"
HOSTILE_KEY = 'k_"><img src=x onerror=alert(2)>'


def hostile_ledger(folder: Path, book: PriceBook) -> Path:
    """A ledger whose model name and key id (a model is the client's choice; a key id could
    come from a tampered ledger) are HTML: r1, and a call under the hostile model and key,
    unpriced (the book has no such model), whose unpriced reason names the model."""
    config = write_config(folder, SHIPPED_BOOK.read_text(encoding="utf-8"))
    _, final = sample_rows(book)
    hostile = record(book, "x1", "alpha", HOSTILE_MODEL, "2026-11-02T02:00:00+00:00", miss=1)
    hostile.key_id = HOSTILE_KEY
    store = SQLiteLedger(folder / "ledger.sqlite3", BEIJING)
    store.write([], [final[0], hostile])
    store.close()
    return config


def html_statement(capsys: pytest.CaptureFixture[str], config: Path) -> str:
    code, out, err = run(
        capsys,
        "statement",
        "--config",
        str(config),
        "--team",
        "alpha",
        "--month",
        "2026-11",
        "--format",
        "html",
    )
    assert code == 0, err
    return out


def check_page(page: Page, report: dict[str, Any]) -> None:
    """What a statement page must be, however it was read: no element but the page's own
    (no script, no image), nothing fetched, the hostile strings as table text, and the totals
    of the report for the same team and month."""
    assert page.tags <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "h2",
        "p",
        "section",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "svg",
        "line",
        "text",
        "rect",
    }, page.tags
    assert not page.fetches, page.fetches
    assert page.policy == "default-src 'none'; style-src 'unsafe-inline'"
    models = [row[0] for row in page.tables["models"][1:]]
    assert HOSTILE_MODEL in models
    assert HOSTILE_KEY in [row[0] for row in page.tables["keys"][1:]]
    total = report["total"]
    assert page.tables["totals"] == [
        ["", "CNY", "USD"],
        ["cost", total["cost"]["CNY"], total["cost"]["USD"]],
        ["cache savings", total["cache_savings"]["CNY"], total["cache_savings"]["USD"]],
    ]
    assert page.tables["models"][-1][-2:] == [total["cost"]["CNY"], total["cost"]["USD"]]
    assert len(page.bars) == 30  # one per day of November


def test_html_escapes_every_ledger_string(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, book: PriceBook
) -> None:
    config = hostile_ledger(tmp_path, book)
    html = html_statement(capsys, config)
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    report = report_json(capsys, config, "--team", "alpha", *NOVEMBER, "--by", "team")
    check_page(read_page(html), report)
    total = report["total"]
    assert isinstance(total, dict)
    assert total["cost"] == {"CNY": "0.0042", "USD": "0.00063"}  # r1's; x1 is unpriced
