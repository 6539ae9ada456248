"""``python -m proxy prices ...`` as a user runs it: a real subprocess, exit codes and output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


QUOTE_NEW_YEAR_2027 = [
    "deepseek-flash at 2027-01-01T02:00:00Z",
    "  billed as deepseek-flash, version deepseek-flash@2026-09-10T04:00:00Z",
    "  tier      off_peak (peak-hours@2026-09-20T16:00:00Z)",
    "                          CNY             USD",
    "  cache_hit                 0               0",
    "  cache_miss                1            0.15",
    "  output                    0               0",
    "  tool_calls                0               0",
    "  total                     1            0.15",
    "  confidence CNY third-party, USD third-party; "
    "source https://api-docs.deepseek.com/quick_start/pricing",
    "  flags     holiday_calendar_provisional",
]
"""1M cache-miss tokens at 10:00 Beijing on Friday 2027-01-01: off-peak (1 CNY, 0.15 USD per
1M) rather than peak (2 CNY, 0.30 USD)."""


def test_check_passes_on_the_shipped_book() -> None:
    result = run("prices", "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 file(s), 6 models, 27 dated entries")
    assert result.stdout.rstrip().endswith(", 2 name patterns, 1 endpoint fallbacks")


def test_check_reports_each_problem_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "currencies: [CNY]\nmodels:\n  x:\n    - from: 2026-01-01\n"
        "      rates: {CNY: -1 / 1 / 1}\n      source: https://e.x/\n"
        "      confidence: verified\n",
        encoding="utf-8",
    )
    result = run("prices", "check", str(bad))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{bad}: models.x[0].from: instant '2026-01-01' has no timezone offset; add Z or +08:00",
        f"{bad}: models.x[0].rates.CNY.cache_hit: negative rate '-1'",
    ]


def test_quote_json_contract() -> None:
    result = run(
        "prices",
        "quote",
        "--model",
        "deepseek-chat",
        "--at",
        "2025-03-01T01:00:00+08:00",
        "--hit",
        "1000",
        "--miss",
        "2000",
        "--output",
        "3000",
        "--reasoning",
        "100",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    cny, usd = json.loads(result.stdout)
    assert cny == {
        "model": "deepseek-chat",
        "billed_model": "deepseek-chat",
        "currency": "CNY",
        "at": "2025-02-28T17:00:00Z",
        "version": "deepseek-chat@2025-02-26T16:30:00Z",
        "schedule_version": "night-discount@2025-02-26T16:30:00Z",
        "tier": "night_discount",
        "priced": True,
        "components": {
            "cache_hit": "0.00025",
            "cache_miss": "0.002",
            "output": "0.012",
            "tool_calls": "0",
        },
        "total": "0.01425",
        "confidence": "third-party",  # rates read on DeepSeek's page, start instant third-party
        "source": "https://api-docs.deepseek.com/quick_start/pricing",
        "flags": [],
    }
    assert usd["currency"] == "USD"
    assert usd["total"] == "0.001955"  # 0.000035 + 0.00027 + 0.00165
    assert usd["components"]["output"] == "0.00165"


def test_quote_one_currency_with_tools_in_text() -> None:
    result = run(
        "prices",
        "quote",
        "--model",
        "deepseek-flash",
        "--at",
        "2026-11-02T01:30:00Z",
        "--miss",
        "1000000",
        "--tool-calls",
        "search=3,fetch=1",
        "--currency",
        "usd",
    )
    assert result.returncode == 0, result.stderr
    assert "tier      peak (peak-hours@2026-09-20T16:00:00Z)" in result.stdout
    assert "total 0.303" in " ".join(result.stdout.split())


def test_quote_new_years_day_2027_is_off_peak_by_law() -> None:
    """2027 has no State Council calendar in the book yet; 1 January is a holiday by law, so a
    Friday-morning call is off-peak, flagged provisional."""
    result = run(
        "prices",
        "quote",
        "--model",
        "deepseek-flash",
        "--at",
        "2027-01-01T10:00:00+08:00",
        "--miss",
        "1000000",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == QUOTE_NEW_YEAR_2027


def test_quote_unpriced_exits_3_with_reason() -> None:
    result = run(
        "prices",
        "quote",
        "--model",
        "deepseek-reasoner",
        "--at",
        "2026-11-01T00:00:00Z",
        "--output",
        "10",
        "--format",
        "json",
        "--currency",
        "CNY",
    )
    assert result.returncode == 3
    [obj] = json.loads(result.stdout)
    assert obj["priced"] is False
    assert obj["reason"] == (
        "model 'deepseek-reasoner' was retired at 2026-07-24T15:59:00Z: "
        "requests with this name fail upstream"
    )
    assert obj["total"] is None


def test_quote_claude_name_shows_the_billed_model() -> None:
    """An Anthropic model name is billed through the book's patterns: the quote keeps the name
    asked for and shows the DeepSeek model billed, at that model's price."""
    args = ("--at", "2026-11-02T09:30:00+08:00", "--miss", "1000000", "--currency", "CNY")
    result = run("prices", "quote", "--model", "claude-sonnet-4", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        "claude-sonnet-4 at 2026-11-02T01:30:00Z",
        "  billed as deepseek-flash, version deepseek-flash@2026-09-10T04:00:00Z",
    ]
    assert "total 2" in " ".join(result.stdout.split())  # peak miss: 2 CNY per 1M

    as_json = run("prices", "quote", "--model", "claude-opus-4-1", *args, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    [obj] = json.loads(as_json.stdout)
    assert (obj["model"], obj["billed_model"], obj["total"]) == (
        "claude-opus-4-1",
        "deepseek-v4-pro",
        "9",
    )


def test_show_lists_name_patterns() -> None:
    result = run("prices", "show", "--at", "2026-11-02T09:30:00+08:00", "--currency", "CNY")
    assert result.returncode == 0, result.stderr
    rows = [line.split()[:3] for line in result.stdout.splitlines() if line.startswith("claude")]
    assert rows == [
        ["claude-opus*", "deepseek-v4-pro", "off_peak"],
        ["claude*", "deepseek-flash", "off_peak"],
    ]


def test_quote_rejects_naive_instant() -> None:
    result = run("prices", "quote", "--model", "deepseek-flash", "--at", "2026-11-02T09:30:00")
    assert result.returncode == 2
    assert "has no timezone offset" in result.stderr


def test_show_marks_the_tier_in_force() -> None:
    result = run("prices", "show", "--at", "2026-10-01T10:00:00+08:00", "--currency", "CNY")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "Prices in force at 2026-10-01T02:00:00Z, per 1M tokens: cache hit / cache miss / output"
    )
    flash = next(i for i, line in enumerate(lines) if line.startswith("deepseek-flash "))
    assert lines[flash].split()[:6] == [
        "deepseek-flash",
        "deepseek-flash",
        "off_peak*",
        "0.02",
        "/",
        "1",
    ]
    assert lines[flash + 1].split()[:2] == ["peak", "0.04"]
    assert "tool search: 5 CNY per 1000 calls (search@2026-10-31T16:00:00Z)" not in lines
    assert "tool search: not billed yet" in lines
