"""``report --by`` every key, on both ledgers: each groups the rows as the records themselves
say, and SQLite and PostgreSQL print the same text; weeks and months split at the billing
timezone's Monday and first of the month; the period is echoed in that timezone; every
currency of the price book is a column even when the period holds only unpriced calls.

The same records (tests/support/ledger_rows.py's `sample_rows`, and four around the end of
November in Beijing) are written by the real stores into a SQLite file and a fresh PostgreSQL
database once for the module. The expected lines are computed here from the records, in
Python (`expected_lines`): the billing day from ``started_at`` in Beijing, the week by
`proxy.periods`, the sums as `Decimal`; the report computes them in SQL from the stored
``billing_day``. A few are also pinned by hand.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.formats import ZERO, decimal_text
from proxy.ledger.pg_store import PostgresLedger
from proxy.ledger.report_groups import GROUPS
from proxy.ledger.store import SQLiteLedger
from proxy.periods import period_start
from proxy.pricing import PriceBook
from proxy.records import UsageRecord
from tests.conftest import SHIPPED_BOOK
from tests.support.ledger_rows import (
    BEIJING,
    FIGURES,
    record,
    report_json,
    run,
    sample_rows,
    write_config,
)
from tests.support.postgres import Postgres

CURRENCIES = ("CNY", "USD")


def billing_day(r: UsageRecord) -> date:
    return r.started_at.astimezone(BEIJING).date()


LABELS: dict[str, Callable[[UsageRecord], str | None]] = {
    "team": lambda r: r.team,
    "key": lambda r: r.key_id,
    "model": lambda r: r.model_requested,
    "billed_model": lambda r: r.billed_model,
    "endpoint": lambda r: r.endpoint,
    "tier": lambda r: r.tier,
    "outcome": lambda r: r.outcome,
    "unpriced_reason": lambda r: r.unpriced_reason,
    "user": lambda r: r.end_user,
    "tag:project": lambda r: r.tags.get("project"),
    "day": lambda r: billing_day(r).isoformat(),
    "week": lambda r: period_start(billing_day(r), "week").isoformat(),
    "month": lambda r: billing_day(r).isoformat()[:7],
}
"""Each ``--by`` key's label of a record, worked out from the record alone."""


def end_of_november(book: PriceBook) -> list[UsageRecord]:
    """Four calls around the last week and month boundary of November 2026 in Beijing."""
    return [
        # Sunday 29 Nov 23:59:59 Beijing: the week of Monday 23 Nov. Another key, FIM.
        dataclasses.replace(
            record(
                book,
                "g1",
                "alpha",
                "deepseek-flash",
                "2026-11-29T15:59:59+00:00",
                miss=1_000,
                endpoint="fim",
                tags={"project": "ranker", "env": "prod"},
                end_user="u-1",
            ),
            key_id="k_cdcdcdcd",
        ),
        # Monday 30 Nov 23:59:59: the week of 30 Nov, still November.
        dataclasses.replace(
            record(
                book,
                "g2",
                "beta",
                "deepseek-v4-pro",
                "2026-11-30T15:59:59+00:00",
                hit=2_000,
                miss=1_000,
                tags={"project": "search"},
                end_user="u-2",
            ),
            key_id="k_cdcdcdcd",
        ),
        # Tuesday 1 Dec 00:00: December, same week. DeepSeek refused it: not billable.
        record(
            book,
            "g3",
            "alpha",
            "deepseek-flash",
            "2026-11-30T16:00:00+00:00",
            source="none",
            outcome="upstream_error",
            tags={"env": "prod"},
            end_user="u-1",
        ),
        # A model the book does not know: unpriced, in December.
        record(book, "g4", "beta", "deepseek-next", "2026-12-01T02:00:00+00:00", miss=10),
    ]


@dataclass(frozen=True, slots=True)
class Ledgers:
    records: tuple[UsageRecord, ...]
    configs: dict[str, Path]
    """Backend -> the config naming that ledger."""


@pytest.fixture(scope="module")
def ledgers(
    tmp_path_factory: pytest.TempPathFactory, postgres: Postgres, book: PriceBook
) -> Iterator[Ledgers]:
    pending, final = sample_rows(book)
    final += end_of_november(book)
    shipped = SHIPPED_BOOK.read_text(encoding="utf-8")
    folder = tmp_path_factory.mktemp("groups")
    url = postgres.new_database()
    (folder / "sqlite").mkdir()
    (folder / "pg").mkdir()
    configs = {
        "sqlite": write_config(folder / "sqlite", shipped),
        "postgresql": write_config(folder / "pg", shipped, url=url),
    }
    for store in (
        SQLiteLedger(folder / "sqlite" / "ledger.sqlite3", BEIJING),
        PostgresLedger(url, BEIJING),
    ):
        store.write(pending, final)
        store.close()
    yield Ledgers((*pending, *final), configs)


BACKENDS = ("sqlite", "postgresql")


def expected_lines(records: tuple[UsageRecord, ...], key: str) -> list[dict[str, Any]]:
    """The report's JSON rows for ``--by key``, summed here from the records."""
    groups: dict[str | None, list[UsageRecord]] = {}
    for r in records:
        groups.setdefault(LABELS[key](r), []).append(r)
    lines = []
    for label in sorted(groups, key=lambda k: (k is None, k or "")):
        rows = groups[label]
        lines.append(
            {
                key: label,
                "requests": len(rows),
                "billable": sum(r.billable for r in rows),
                "cache_hit": sum(r.cache_hit_tokens or 0 for r in rows),
                "cache_miss": sum(r.cache_miss_tokens or 0 for r in rows),
                "output": sum(r.output_tokens or 0 for r in rows),
                "reasoning": sum(r.reasoning_tokens or 0 for r in rows),
                "unpriced": sum(r.billable and not r.priced for r in rows),
                "estimated": sum(r.usage_source == "estimated" for r in rows),
                "cost": {
                    c: decimal_text(sum((r.costs.get(c, ZERO) for r in rows), ZERO))
                    for c in CURRENCIES
                },
                "cache_savings": {
                    c: decimal_text(sum((r.cache_savings.get(c, ZERO) for r in rows), ZERO))
                    for c in CURRENCIES
                },
            }
        )
    return lines


def test_every_key_is_tested() -> None:
    assert set(LABELS) == {*GROUPS, "tag:project"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", list(LABELS))
def test_every_key_groups_as_the_records_say(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, backend: str, key: str
) -> None:
    report = report_json(capsys, ledgers.configs[backend], "--by", key)
    assert report["rows"] == expected_lines(ledgers.records, key)
    total = report["total"]
    assert isinstance(total, dict)
    assert (total["requests"], total["billable"]) == (11, 9)
    assert total["cost"] == {"CNY": "0.04204", "USD": "0.0062332"}


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_every_key_is_the_same_text_from_either_ledger(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, fmt: str
) -> None:
    for key in GROUPS:
        other = "model" if key == "team" else "team"
        argv = ("report", "--by", f"{key},{other}", "--format", fmt)
        sqlite = run(capsys, argv[0], "--config", str(ledgers.configs["sqlite"]), *argv[1:])
        pg = run(capsys, argv[0], "--config", str(ledgers.configs["postgresql"]), *argv[1:])
        assert sqlite[0] == 0, sqlite[2]
        assert pg == sqlite, key


def requests_by(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> list[Any]:
    rows = report_json(capsys, config, *argv)["rows"]
    assert isinstance(rows, list)
    return [(*(r[k] for k in r if k not in LINE_FIGURES), r["requests"]) for r in rows]


LINE_FIGURES = {*FIGURES, "cost", "cache_savings"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_weeks_start_on_monday_and_months_on_the_first_in_beijing(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, backend: str
) -> None:
    """r1 (Sunday 1 Nov 23:59:59 Beijing) is in the week of 26 Oct, r2 one second later in
    the week of 2 Nov; g1 (Sunday 29 Nov) in the week of 23 Nov; g2 (Monday 30 Nov) and g3
    (Tuesday 1 Dec, 00:00) in the week of 30 Nov, but in two months."""
    config = ledgers.configs[backend]
    assert requests_by(capsys, config, "--by", "week") == [
        ("2026-10-26", 1),
        ("2026-11-02", 6),
        ("2026-11-23", 1),
        ("2026-11-30", 3),
    ]
    assert requests_by(capsys, config, "--by", "month") == [("2026-11", 9), ("2026-12", 2)]
    assert requests_by(capsys, config, "--by", "month,week") == [
        ("2026-11", "2026-10-26", 1),
        ("2026-11", "2026-11-02", 6),
        ("2026-11", "2026-11-23", 1),
        ("2026-11", "2026-11-30", 1),
        ("2026-12", "2026-11-30", 2),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_period_is_shown_in_the_billing_timezone(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, backend: str
) -> None:
    """Issue 16: ``--since 2026-12-01`` was echoed as 2026-11-30T16:00:00Z."""
    config = str(ledgers.configs[backend])
    code, out, _ = run(
        capsys, "report", "--config", config, "--since", "2026-12-01", "--until", "2027-01-01"
    )
    assert code == 0
    assert out.splitlines()[0] == (
        "Calls started from 2026-12-01T00:00:00+08:00 until 2027-01-01T00:00:00+08:00 "
        "(exclusive); billing timezone Asia/Shanghai"
    )
    report = report_json(capsys, ledgers.configs[backend], "--since", "2026-11-30T16:00:00Z")
    assert (report["since"], report["until"], report["timezone"]) == (
        "2026-12-01T00:00:00+08:00",
        None,
        "Asia/Shanghai",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_book_currency_is_a_column_when_nothing_was_priced(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, backend: str
) -> None:
    """December holds g3 (refused: not billable) and g4 (unpriced) only: both currencies are
    still columns, at 0, in every format; g3 and g4 have no tier (an empty CSV cell)."""
    config = ledgers.configs[backend]
    december = ("--since", "2026-12-01", "--by", "tier,outcome")
    report = report_json(capsys, config, *december)
    assert report["currencies"] == ["CNY", "USD"]
    assert report["rows"] == [
        {
            "tier": None,
            "outcome": "complete",
            "requests": 1,
            "billable": 1,
            "cache_hit": 0,
            "cache_miss": 10,
            "output": 0,
            "reasoning": 0,
            "unpriced": 1,
            "estimated": 0,
            "cost": {"CNY": "0", "USD": "0"},
            "cache_savings": {"CNY": "0", "USD": "0"},
        },
        {
            "tier": None,
            "outcome": "upstream_error",
            "requests": 1,
            "billable": 0,
            "cache_hit": 0,
            "cache_miss": 0,
            "output": 0,
            "reasoning": 0,
            "unpriced": 0,
            "estimated": 0,
            "cost": {"CNY": "0", "USD": "0"},
            "cache_savings": {"CNY": "0", "USD": "0"},
        },
    ]
    code, out, _ = run(capsys, "report", "--config", str(config), *december, "--format", "csv")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [
        ["tier", "outcome", *FIGURES, "CNY", "USD"],
        ["", "complete", "1", "1", "0", "10", "0", "0", "1", "0", "0", "0"],
        ["", "upstream_error", "1", "0", "0", "0", "0", "0", "0", "0", "0", "0"],
    ]
    code, out, _ = run(capsys, "report", "--config", str(config), *december)
    assert out.splitlines()[1:] == [
        "tier   outcome         requests  billable  cache_hit  cache_miss  output  reasoning"
        "  unpriced  estimated  CNY  USD",
        "-      complete               1         1          0          10       0          0"
        "         1          0    0    0",
        "-      upstream_error         1         0          0           0       0          0"
        "         0          0    0    0",
        "TOTAL                         2         1          0          10       0          0"
        "         1          0    0    0",
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ledger_that_never_priced_a_call_still_has_the_books_currencies(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    postgres: Postgres,
    book: PriceBook,
    backend: str,
) -> None:
    url = postgres.new_database() if backend == "postgresql" else None
    config = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"), url=url)
    store = (
        SQLiteLedger(tmp_path / "ledger.sqlite3", BEIJING)
        if url is None
        else PostgresLedger(url, BEIJING)
    )
    unpriced = record(book, "u1", "alpha", "deepseek-next", "2026-11-02T02:00:00+00:00", miss=5)
    store.write([], [unpriced])
    store.close()
    report = report_json(capsys, config, "--by", "team")
    assert report["currencies"] == ["CNY", "USD"]
    total = report["total"]
    assert isinstance(total, dict)
    assert total["cost"] == {"CNY": "0", "USD": "0"}
    assert total["unpriced"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_team_only(capsys: pytest.CaptureFixture[str], ledgers: Ledgers, backend: str) -> None:
    report = report_json(capsys, ledgers.configs[backend], "--team", "beta", "--by", "model")
    assert report["team"] == "beta"
    beta = tuple(r for r in ledgers.records if r.team == "beta")
    assert report["rows"] == expected_lines(beta, "model")
    total = report["total"]
    assert isinstance(total, dict)
    assert Decimal(total["cost"]["CNY"]) == sum((r.costs.get("CNY", ZERO) for r in beta), ZERO)
