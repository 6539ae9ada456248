"""``report``, ``reprice`` and ``ledger-replay`` on a PostgreSQL ledger: the same text as on the
SQLite ledger for the same records, the same rows written, and one clear line when the database
cannot be used.

Each test writes `sample_rows` (tests/support/ledger_rows.py) to a SQLite ledger and to a fresh
PostgreSQL database through the real stores, then runs the real commands against two configs
that differ only in ``ledger``. The SQLite outputs are pinned to exact values by test_report.py
and test_reprice.py; equality here pins the PostgreSQL ones to the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.ledger import pg_schema
from proxy.ledger.pg_store import PostgresLedger
from proxy.ledger.spill import spill
from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook
from tests.conftest import SHIPPED_BOOK
from tests.integration.test_reprice import EXPECTED_DIFF, corrected_text, diff_cells
from tests.support.ledger_rows import (
    BEIJING,
    in_flight,
    record,
    report_json,
    run,
    sample_rows,
    write_config,
)
from tests.support.ledger_tables import Tables, pg_execute, pg_tables, sqlite_tables
from tests.support.postgres import Postgres, free_port

NOW = datetime(2026, 11, 3, 1, 2, 3, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Ledgers:
    """The same records in a SQLite ledger and a PostgreSQL one, and a config for each."""

    sqlite: Path
    pg: Path
    url: str

    @property
    def file(self) -> Path:
        return self.sqlite.parent / "ledger.sqlite3"

    def book(self, text: str) -> None:
        for config in (self.sqlite, self.pg):
            (config.parent / "book.yaml").write_text(text, encoding="utf-8")


@pytest.fixture
def ledgers(tmp_path: Path, postgres: Postgres, book: PriceBook) -> Ledgers:
    url = postgres.new_database()
    (tmp_path / "sqlite").mkdir()
    (tmp_path / "pg").mkdir()
    shipped = SHIPPED_BOOK.read_text(encoding="utf-8")
    both = Ledgers(
        write_config(tmp_path / "sqlite", shipped),
        write_config(tmp_path / "pg", shipped, url=url),
        url,
    )
    for store in (SQLiteLedger(both.file, BEIJING), PostgresLedger(url, BEIJING)):
        store.write(*sample_rows(book))
        store.close()
    return both


def both(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, *argv: str
) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """A command on the SQLite ledger, then the same on the PostgreSQL one."""
    command, *rest = argv
    sqlite = run(capsys, command, "--config", str(ledgers.sqlite), *rest)
    pg = run(capsys, command, "--config", str(ledgers.pg), *rest)
    return sqlite, pg


def without_stamps(tables: Tables) -> Tables:
    """The tables with ``cost_history.replaced_at`` (the instant a re-pricing ran) left out."""
    history = [(*row[:5], row[6]) for row in tables["cost_history"]]
    return {**tables, "cost_history": history}


@pytest.mark.parametrize(
    "argv",
    [
        (),
        ("--format", "csv"),
        ("--format", "json"),
        ("--by", "day"),
        ("--by", "day,team,model", "--format", "csv"),
        ("--by", "team", "--since", "2026-11-02", "--until", "2026-11-02T03:00:00Z"),
        ("--since", "2026-11-03", "--format", "json"),
        ("--currency", "usd", "--by", "model", "--format", "json"),
        ("--currency", "EUR"),
        ("--by", "key,billed_model,endpoint", "--format", "csv", "--total"),
        ("--by", "tier,outcome,unpriced_reason", "--format", "json"),
        ("--by", "week,month", "--team", "beta"),
    ],
)
def test_report_is_the_same_text_from_either_ledger(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, argv: tuple[str, ...]
) -> None:
    sqlite, pg = both(capsys, ledgers, "report", *argv)
    assert pg == sqlite
    assert pg[0] == (2 if "EUR" in argv else 0)


def test_report_totals_from_postgresql_are_exact(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers
) -> None:
    """The amounts test_report.py works out by hand, summed by PostgreSQL's ``numeric``."""
    report = report_json(capsys, ledgers.pg, "--by", "day")
    rows = report["rows"]
    assert isinstance(rows, list)
    assert [(r["day"], r["requests"], r["cost"]) for r in rows] == [
        ("2026-11-01", 1, {"CNY": "0.0042", "USD": "0.00063"}),
        ("2026-11-02", 6, {"CNY": "0.03204", "USD": "0.0047492"}),
    ]
    assert report["total"] == {
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
    }


def test_reprice_dry_run_is_the_same_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers
) -> None:
    ledgers.book(corrected_text())
    before = pg_tables(ledgers.url)
    sqlite, pg = both(capsys, ledgers, "reprice")
    assert pg == sqlite
    assert diff_cells(pg[1]) == EXPECTED_DIFF
    assert pg[1].splitlines()[-1] == "dry run; nothing changed"
    assert pg_tables(ledgers.url) == before


@pytest.mark.parametrize("argv", [(), ("--since", "2026-11-02", "--until", "2026-11-02T03:00:00Z")])
def test_reprice_apply_writes_the_same_rows_history_and_spend(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, argv: tuple[str, ...]
) -> None:
    ledgers.book(corrected_text())
    sqlite, pg = both(capsys, ledgers, "reprice", "--apply", *argv)
    assert pg == sqlite
    assert pg[0] == 0
    after = pg_tables(ledgers.url)
    assert without_stamps(after) == without_stamps(sqlite_tables(ledgers.file))
    stamps = {datetime.fromisoformat(row[5]) for row in after["cost_history"]}
    assert len(stamps) == 1
    assert abs(datetime.now(UTC) - stamps.pop()) < timedelta(minutes=5)
    if not argv:
        assert after["spend_daily"] == [  # test_reprice.py's figures
            ("alpha", "2026-11-01", "CNY", "0.0021"),
            ("alpha", "2026-11-01", "USD", "0.000315"),
            ("alpha", "2026-11-02", "CNY", "0.0125"),
            ("alpha", "2026-11-02", "USD", "0.001875"),
            ("beta", "2026-11-02", "CNY", "0.01223"),
            ("beta", "2026-11-02", "USD", "0.001783"),
        ]
        assert len(after["cost_history"]) == 8

    again = both(capsys, ledgers, "reprice", "--apply", *argv)
    assert again[1] == again[0]
    assert again[1][1].splitlines()[-1] == "nothing to change"
    assert pg_tables(ledgers.url) == after
    reports = both(capsys, ledgers, "report", "--by", "team,day")
    assert reports[1] == reports[0]


def test_ledger_replay_into_postgresql_writes_each_record_once(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, book: PriceBook, tmp_path: Path
) -> None:
    """Two new calls, one already in the ledger, and r7, still in flight in the ledger and
    spilled as its final record: written once, the spend grown by exactly the new costs."""
    new = [
        record(book, f"n{i}", "alpha", "deepseek-flash", "2026-11-02T08:00:00+00:00", miss=1_000)
        for i in (1, 2)
    ]
    _, final = sample_rows(book)
    r7 = record(book, "r7", "alpha", "deepseek-flash", "2026-11-02T04:00:00+00:00", out=1_000)
    running = in_flight(book, "n3", "beta", "deepseek-v4-pro", "2026-11-02T09:00:00+00:00")
    saved = spill([*new, final[0], r7, running], ledgers.file, ledgers.sqlite, NOW)
    assert saved is not None
    spent = {r[:3]: Decimal(r[3]) for r in pg_tables(ledgers.url)["spend_daily"]}

    sqlite, pg = both(capsys, ledgers, "ledger-replay", str(saved))
    assert sqlite == (0, f"5 record(s) read: 4 written to {ledgers.file}, 1 already there\n", "")
    assert pg == (0, f"5 record(s) read: 4 written to {ledgers.url}, 1 already there\n", "")
    assert pg_tables(ledgers.url) == sqlite_tables(ledgers.file)
    grown = {r[:3]: Decimal(r[3]) for r in pg_tables(ledgers.url)["spend_daily"]}
    day = ("alpha", "2026-11-02", "CNY")
    # Two flash calls of 1,000 cache-miss tokens at 16:00 Beijing, peak (2 CNY / 1M), and r7's
    # 1,000 output tokens at 12:00, off-peak (4 CNY / 1M).
    assert grown[day] - spent[day] == 2 * Decimal("0.002") + Decimal("0.004")
    usage = {row[0]: row[1:6] for row in pg_tables(ledgers.url)["usage"]}
    assert usage["r7"] == ("final", "alpha", "deepseek-flash", "complete", "reported")
    assert usage["n3"] == ("final", "beta", "deepseek-v4-pro", "interrupted", "unknown")

    before = pg_tables(ledgers.url)
    again = both(capsys, ledgers, "ledger-replay", str(saved))
    assert again[1] == (0, f"5 record(s) read: 0 written to {ledgers.url}, 5 already there\n", "")
    assert pg_tables(ledgers.url) == before


def test_replay_puts_back_the_real_record_of_a_call_a_dead_replica_left(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers, book: PriceBook
) -> None:
    """r7's replica died: its row was ended ``interrupted`` (usage unknown); the spilled real
    record replaces it, once."""
    store = PostgresLedger(ledgers.url, BEIJING)
    pg_execute(ledgers.url, "UPDATE usage SET owner = 'w9' WHERE request_id = 'r7'")
    assert store.release_owner("w9") == (1, 0)
    store.close()
    r7 = record(book, "r7", "alpha", "deepseek-flash", "2026-11-02T04:00:00+00:00", out=1_000)
    saved = spill([r7], ledgers.file, ledgers.pg, NOW)
    assert saved is not None
    code, out, _ = run(capsys, "ledger-replay", "--config", str(ledgers.pg), str(saved))
    assert (code, out) == (0, f"1 record(s) read: 1 written to {ledgers.url}, 0 already there\n")
    code, out, _ = run(capsys, "ledger-replay", "--config", str(ledgers.pg), str(saved))
    assert (code, out) == (0, f"1 record(s) read: 0 written to {ledgers.url}, 1 already there\n")
    costs = [row for row in pg_tables(ledgers.url)["usage_cost"] if row[0] == "r7"]
    assert costs == [("r7", "CNY", "0.004", "0"), ("r7", "USD", "0.0006", "0")]


COMMANDS = [("report",), ("reprice",), ("reprice", "--apply"), ("ledger-replay", "SPILL")]


def spill_file(tmp_path: Path, book: PriceBook) -> Path:
    call = record(book, "x1", "alpha", "deepseek-flash", "2026-11-02T08:00:00+00:00", miss=1)
    saved = spill([call], tmp_path / "ledger.sqlite3", tmp_path / "proxy.yaml", NOW)
    assert saved is not None
    return saved


@pytest.mark.parametrize("argv", COMMANDS)
def test_unreachable_postgresql_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, book: PriceBook, argv: tuple[str, ...]
) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://proxy@127.0.0.1:{port}/ledger"
    config = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"), url=url)
    files = [str(spill_file(tmp_path, book))] if argv[0] == "ledger-replay" else []
    code, out, err = run(capsys, argv[0], "--config", str(config), *argv[1:-1], *files)
    assert (code, out) == (1, "")
    assert err.startswith(f"cannot use the ledger at {url}: ")
    assert f"Connect call failed ('127.0.0.1', {port})" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv", COMMANDS)
def test_a_database_without_the_ledger_is_no_ledger_and_stays_empty(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    book: PriceBook,
    postgres: Postgres,
    argv: tuple[str, ...],
) -> None:
    url = postgres.new_database()
    config = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"), url=url)
    files = [str(spill_file(tmp_path, book))] if argv[0] == "ledger-replay" else []
    code, out, err = run(capsys, argv[0], "--config", str(config), *argv[1:-1], *files)
    assert (code, out, err) == (1, "", f"no ledger at {url}\n")
    database = url.rsplit("/", 1)[1]
    assert postgres.psql(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", database
    ) == ("0")


def test_a_ledger_written_by_a_newer_proxy_is_refused(
    capsys: pytest.CaptureFixture[str], ledgers: Ledgers
) -> None:
    newer = pg_schema.SCHEMA_VERSION + 1
    pg_execute(ledgers.url, f"UPDATE meta SET value = '{newer}' WHERE key = 'schema_version'")  # noqa: S608
    code, out, err = run(capsys, "report", "--config", str(ledgers.pg))
    assert (code, out) == (1, "")
    assert err == (
        f"the PostgreSQL ledger {ledgers.url} has schema version {newer}, newer than this "
        f"proxy knows ({pg_schema.SCHEMA_VERSION}): run the proxy version that wrote it, or a "
        "newer one\n"
    )
