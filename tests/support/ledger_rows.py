"""Ledger rows for the report and reprice tests: records priced as the proxy prices them,
a configuration naming a price book and a ledger, and the ledger commands run in-process."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.attribution import NO_TAGS
from proxy.ledger import commands
from proxy.pricing import PriceBook, price
from proxy.records import CallRequest, Outcome, UsageRecord, UsageSource
from proxy.usage import TokenUsage
from tests.support.config_files import KEY_HASH

BEIJING = ZoneInfo("Asia/Shanghai")


FIGURES = (
    "requests",
    "billable",
    "cache_hit",
    "cache_miss",
    "output",
    "reasoning",
    "unpriced",
    "estimated",
)
"""A report's count columns, in order, as a reader of its output names them (the tests
state them here rather than import the code's own list)."""


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
    endpoint: str = "chat",
    tags: Mapping[str, str] | None = None,
    end_user: str | None = None,
) -> UsageRecord:
    """A final record priced as `proxy.metering.build_record` prices one (at its start)."""
    start = at(started)
    tokens = (
        TokenUsage(hit, miss, out, reasoning, tools or {})
        if source in ("reported", "estimated")
        else None
    )
    pricing = price(book, model, tokens, start, endpoint) if tokens is not None else None
    priced = pricing is not None and pricing.priced
    return UsageRecord(
        request_id=request_id,
        team=team,
        key_id="k_abababab",
        endpoint=endpoint,
        stream=False,
        model_requested=model,
        tags=tags or NO_TAGS,
        end_user=end_user,
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
        client_status=200,
        upstream_trace_id=None,
        outcome=outcome,
        usage_source=source,
        priced=priced,
        unpriced_reason=None
        if priced
        else (pricing.reason if pricing else f"nothing billable: {outcome}"),
        billed_model=pricing.billed_model if pricing else None,
        price_version=pricing.version_id if pricing else None,
        schedule_version=pricing.schedule_version_id if pricing else None,
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
    call = CallRequest(request_id, team, "k_abababab", "chat", True, model, NO_TAGS, None)
    return UsageRecord.in_flight(call, at(started), book.digest)


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


def write_config(folder: Path, book_text: str, *, url: str | None = None) -> Path:
    """A config in `folder` naming its own price book and a ledger: the SQLite file beside it,
    or the PostgreSQL database at `url`."""
    (folder / "book.yaml").write_text(book_text, encoding="utf-8")
    config = folder / "proxy.yaml"
    where = "path: ledger.sqlite3" if url is None else f"url: '{url}'"
    config.write_text(
        "pricing: {book: [book.yaml]}\n"
        f"teams:\n  alpha:\n    keys: ['{KEY_HASH}']\n"
        f"  beta:\n    keys: ['sha256:{'cd' * 32}']\n"
        f"ledger: {{{where}, billing_timezone: Asia/Shanghai}}\n",
        encoding="utf-8",
    )
    return config


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
