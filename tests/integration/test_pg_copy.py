"""``ledger-copy``: a SQLite ledger into PostgreSQL, every final row once, spend exact.

The SQLite ledger holds `sample_rows` and r8 (team gamma, with a usage flag and an engine flag),
re-priced once with test_reprice.py's corrected book (so it has ``cost_history`` rows), and r7
still in flight; it is copied into a fresh
PostgreSQL database by the real command, and the two ledgers are compared table by table with
the drivers themselves (tests/support/ledger_tables.py).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.ledger.pg_copy import copy_rows, open_source
from proxy.ledger.pg_queries import PostgresQueries
from proxy.ledger.pg_store import PostgresLedger
from proxy.ledger.schema import SCHEMA_VERSION
from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook
from tests.conftest import SHIPPED_BOOK
from tests.integration.test_reprice import corrected_text
from tests.support.ledger_rows import BEIJING, in_flight, record, run, sample_rows, write_config
from tests.support.ledger_tables import Tables, pg_execute, pg_tables, sqlite_tables
from tests.support.postgres import Postgres, free_port


@dataclass(frozen=True, slots=True)
class Copying:
    file: Path
    """The SQLite ledger."""
    config: Path
    """A config naming the PostgreSQL ledger."""
    url: str

    def copy(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        return run(
            capsys, "ledger-copy", "--config", str(self.config), "--from", str(self.file), *argv
        )


@pytest.fixture
def copying(
    tmp_path: Path, postgres: Postgres, book: PriceBook, capsys: pytest.CaptureFixture[str]
) -> Copying:
    (tmp_path / "sqlite").mkdir()
    (tmp_path / "pg").mkdir()
    sqlite = write_config(tmp_path / "sqlite", corrected_text())
    file = tmp_path / "sqlite" / "ledger.sqlite3"
    pending, final = sample_rows(book)
    flagged = record(
        book,
        "r8",
        "gamma",
        "deepseek-flash",
        "2026-11-01T15:59:59+00:00",
        miss=10,
        out=1,
        reasoning=5,
    )
    flagged = replace(flagged, flags=("prompt_tokens_mismatch", *flagged.flags))
    store = SQLiteLedger(file, BEIJING)
    store.write(pending, [*final, flagged])
    store.close()
    assert run(capsys, "reprice", "--config", str(sqlite), "--apply")[0] == 0
    url = postgres.new_database()
    return Copying(file, write_config(tmp_path / "pg", corrected_text(), url=url), url)


def finals(tables: Tables) -> Tables:
    """The tables without in-flight rows, which are never copied."""
    return {**tables, "usage": [row for row in tables["usage"] if row[1] == "final"]}


def spend_of_costs(tables: Tables) -> dict[tuple[str, str, str], Decimal]:
    """The daily spend the ledger's rows add up to, from ``usage`` and ``usage_cost``."""
    rows = {row[0]: (row[2], row[15]) for row in tables["usage"]}  # team, billing_day
    spend: dict[tuple[str, str, str], Decimal] = {}
    for request_id, currency, amount, _ in tables["usage_cost"]:
        team, day = rows[request_id]
        key = (team, day, currency)
        spend[key] = spend.get(key, Decimal(0)) + Decimal(amount)
    return spend


def spend(tables: Tables) -> dict[tuple[str, str, str], Decimal]:
    return {(team, day, currency): Decimal(a) for team, day, currency, a in tables["spend_daily"]}


IN_FLIGHT_WARNING = (
    "warning: 1 in-flight row(s) not copied: a proxy is still serving from {file}, or one "
    "stopped during those calls. Stop the proxy; its next start on the file ends them as "
    "interrupted; then run ledger-copy again to copy them.\n"
)


def test_every_final_row_goes_across_with_its_costs_history_and_spend(
    capsys: pytest.CaptureFixture[str], copying: Copying
) -> None:
    code, out, err = copying.copy(capsys)
    assert (code, out) == (
        0,
        f"7 final row(s) in {copying.file}: 7 copied to {copying.url}, 0 already there\n",
    )
    assert err == IN_FLIGHT_WARNING.format(file=copying.file)
    sqlite, pg = sqlite_tables(copying.file), pg_tables(copying.url)
    assert pg == finals(sqlite)
    assert len(pg["cost_history"]) == 10
    assert spend(pg) == spend_of_costs(pg) == spend(sqlite)
    assert spend(pg) == {  # test_reprice.py's figures after the corrected book
        ("alpha", "2026-11-01", "CNY"): Decimal("0.0021"),
        ("alpha", "2026-11-01", "USD"): Decimal("0.000315"),
        ("alpha", "2026-11-02", "CNY"): Decimal("0.0125"),
        ("alpha", "2026-11-02", "USD"): Decimal("0.001875"),
        ("beta", "2026-11-02", "CNY"): Decimal("0.01223"),
        ("beta", "2026-11-02", "USD"): Decimal("0.001783"),
        # r8: 10 cache-miss and 1 output token at the corrected flat rates.
        ("gamma", "2026-11-01", "CNY"): Decimal("0.000007"),
        ("gamma", "2026-11-01", "USD"): Decimal("0.00000105"),
    }
    flags = {row[0]: row[11] for row in pg["usage"]}
    assert flags["r8"] == ["prompt_tokens_mismatch", "reasoning_exceeds_output"]


def test_a_second_copy_changes_nothing(
    capsys: pytest.CaptureFixture[str], copying: Copying
) -> None:
    assert copying.copy(capsys)[0] == 0
    first = pg_tables(copying.url)
    code, out, _ = copying.copy(capsys, "--batch", "4")
    assert (code, out) == (
        0,
        f"7 final row(s) in {copying.file}: 0 copied to {copying.url}, 7 already there\n",
    )
    assert pg_tables(copying.url) == first


def test_spend_already_in_postgresql_is_added_to_never_doubled(
    capsys: pytest.CaptureFixture[str], copying: Copying, book: PriceBook
) -> None:
    """Replicas already serve from PostgreSQL (p1) and one of the SQLite rows (r2) reached it
    too: the copy adds only what is missing."""
    p1 = record(book, "p1", "alpha", "deepseek-flash", "2026-11-02T04:00:00+00:00", out=1_000)
    store = PostgresLedger(copying.url, BEIJING)
    store.write([], [p1])
    store.close()
    pg_before = pg_tables(copying.url)
    code, out, _ = copying.copy(capsys, "--batch", "2")
    assert (code, out) == (
        0,
        f"7 final row(s) in {copying.file}: 7 copied to {copying.url}, 0 already there\n",
    )
    sqlite, pg = sqlite_tables(copying.file), pg_tables(copying.url)
    expected = spend(sqlite)
    for key, amount in spend(pg_before).items():
        expected[key] = expected.get(key, Decimal(0)) + amount
    assert spend(pg) == expected == spend_of_costs(pg)
    assert expected[("alpha", "2026-11-02", "CNY")] == Decimal("0.0125") + Decimal("0.004")


def test_an_interrupted_copy_resumes(capsys: pytest.CaptureFixture[str], copying: Copying) -> None:
    """Two batches of two committed, then the copy stops (as on Ctrl-C or a lost connection
    between batches): the next run copies the other rows and counts the first four as there."""
    target = PostgresQueries(copying.url)
    target.migrate()
    with closing(open_source(copying.file)) as source, closing(target):
        batches = copy_rows(source, target, BEIJING, batch=2)
        done = [next(batches), next(batches)]
        batches.close()
    assert [(b.copied, b.present, b.in_flight) for b in done] == [(2, 0, 0), (2, 0, 0)]
    partial = pg_tables(copying.url)
    assert [row[0] for row in partial["usage"]] == ["r1", "r2", "r3", "r4"]
    assert spend(partial) == spend_of_costs(partial)

    code, out, _ = copying.copy(capsys, "--batch", "2")
    assert (code, out) == (
        0,
        f"7 final row(s) in {copying.file}: 3 copied to {copying.url}, 4 already there\n",
    )
    sqlite, pg = sqlite_tables(copying.file), pg_tables(copying.url)
    assert pg == finals(sqlite)
    assert spend(pg) == spend(sqlite)


def test_in_flight_rows_are_copied_once_a_start_has_ended_them(
    capsys: pytest.CaptureFixture[str], copying: Copying
) -> None:
    assert copying.copy(capsys)[2] == IN_FLIGHT_WARNING.format(file=copying.file)
    restarted = SQLiteLedger(copying.file, BEIJING)  # the proxy's next start on the file
    assert restarted.interrupted == 1
    restarted.close()
    code, out, err = copying.copy(capsys)
    assert (code, out, err) == (
        0,
        f"8 final row(s) in {copying.file}: 1 copied to {copying.url}, 7 already there\n",
        "",
    )
    assert pg_tables(copying.url) == sqlite_tables(copying.file)


def test_the_sqlite_file_is_read_and_never_changed(
    capsys: pytest.CaptureFixture[str], copying: Copying
) -> None:
    """Opened read-only: the database file keeps its bytes. To read a WAL ledger SQLite needs
    its ``-wal`` and ``-shm`` side files, which it makes if the proxy is not running (empty:
    nothing was written through them)."""
    folder = copying.file.parent
    before = {path.name for path in folder.iterdir()}
    digest = hashlib.sha256(copying.file.read_bytes()).hexdigest()
    assert copying.copy(capsys)[0] == 0
    assert hashlib.sha256(copying.file.read_bytes()).hexdigest() == digest
    made = {path.name for path in folder.iterdir()} - before
    assert made <= {"ledger.sqlite3-wal", "ledger.sqlite3-shm"}
    wal = folder / "ledger.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0


def test_a_ledger_of_an_older_schema_is_copied(
    capsys: pytest.CaptureFixture[str], copying: Copying
) -> None:
    """A version-2 ledger has no ``client_status`` column (its calls' status is unknown), and
    no ``tags`` or ``end_user`` (its calls had none)."""
    with closing(sqlite3.connect(copying.file)) as conn:
        conn.execute("DROP INDEX usage_user_day")
        for column in ("client_status", "tags", "end_user"):
            conn.execute(f"ALTER TABLE usage DROP COLUMN {column}")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        conn.commit()
    code, out, _ = copying.copy(capsys)
    assert (code, out) == (
        0,
        f"7 final row(s) in {copying.file}: 7 copied to {copying.url}, 0 already there\n",
    )
    assert {(row[16], repr(row[17]), row[18]) for row in pg_tables(copying.url)["usage"]} == {
        (None, "{}", None)
    }


def test_a_copy_into_an_unreachable_postgresql_is_one_line(
    capsys: pytest.CaptureFixture[str], copying: Copying, tmp_path: Path
) -> None:
    port = free_port()
    url = f"postgresql://proxy@127.0.0.1:{port}/ledger"
    config = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"), url=url)
    code, out, err = run(
        capsys, "ledger-copy", "--config", str(config), "--from", str(copying.file)
    )
    assert (code, out) == (1, "")
    assert err.startswith(f"cannot use the ledger at {url}: ")
    assert f"Connect call failed ('127.0.0.1', {port})" in err
    assert err.count("\n") == 1


def not_a_database(path: Path) -> str:
    path.write_text("date,team,amount\n2026-11-01,alpha,0.5\n", encoding="utf-8")
    return f"{path} is not a ledger: file is not a database\n"


def no_tables(path: Path) -> str:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    return f"{path} is not a ledger: it has no meta, usage, usage_cost, cost_history table\n"


def newer(path: Path) -> str:
    SQLiteLedger(path, BEIJING).close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
        conn.commit()
    return (
        f"{path} has ledger schema version {SCHEMA_VERSION + 1}, newer than this proxy knows "
        f"({SCHEMA_VERSION}): run the proxy version that wrote it, or a newer one\n"
    )


def missing(path: Path) -> str:
    return f"no ledger at {path}\n"


@pytest.mark.parametrize("make", [missing, not_a_database, no_tables, newer])
def test_a_source_that_is_not_a_ledger_is_refused_before_anything_is_written(
    capsys: pytest.CaptureFixture[str],
    copying: Copying,
    postgres: Postgres,
    tmp_path: Path,
    make: Callable[[Path], str],
) -> None:
    source = tmp_path / "source.sqlite3"
    message = make(source)
    code, out, err = run(
        capsys, "ledger-copy", "--config", str(copying.config), "--from", str(source)
    )
    assert (code, out, err) == (1, "", message)
    database = copying.url.rsplit("/", 1)[1]
    tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
    assert postgres.psql(tables, database) == "0"


def test_the_configs_ledger_must_be_postgresql(
    capsys: pytest.CaptureFixture[str], copying: Copying
) -> None:
    config = copying.file.parent / "proxy.yaml"  # names the SQLite ledger
    code, out, err = run(
        capsys, "ledger-copy", "--config", str(config), "--from", str(copying.file)
    )
    assert (code, out) == (2, "")
    assert err == (
        f"{config}: ledger-copy copies into a PostgreSQL ledger, and the config's ledger is the "
        f"SQLite file {copying.file}: set ledger.url to postgresql://user@host:port/database\n"
    )


@pytest.mark.parametrize("batch", ["0", "-3", "many"])
def test_a_bad_batch_size_exits_2(
    capsys: pytest.CaptureFixture[str], copying: Copying, batch: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        copying.copy(capsys, "--batch", batch)
    assert exit_info.value.code == 2


def test_billing_days_are_the_configured_timezones(
    capsys: pytest.CaptureFixture[str], copying: Copying, tmp_path: Path, book: PriceBook
) -> None:
    """A SQLite ledger kept in UTC days, copied under a config in Beijing time: r1, at
    23:59:59 Beijing on 1 November, stays on the 1st; r2, one second later, moves to the 2nd
    (in UTC both were on the 1st). The note says so."""
    utc = tmp_path / "utc.sqlite3"
    store = SQLiteLedger(utc, ZoneInfo("UTC"))
    _, final = sample_rows(book)
    store.write([], final[:2])
    store.close()
    assert sqlite_tables(utc)["spend_daily"] == [
        ("alpha", "2026-11-01", "CNY", "0.0192"),
        ("alpha", "2026-11-01", "USD", "0.00288"),
    ]
    code, _, err = run(capsys, "ledger-copy", "--config", str(copying.config), "--from", str(utc))
    assert code == 0
    assert err == (
        f"note: {utc} keeps billing days in UTC; the copy's are in Asia/Shanghai, the config's "
        "ledger.billing_timezone\n"
    )
    assert spend(pg_tables(copying.url)) == {
        ("alpha", "2026-11-01", "CNY"): Decimal("0.0042"),
        ("alpha", "2026-11-01", "USD"): Decimal("0.00063"),
        ("alpha", "2026-11-02", "CNY"): Decimal("0.015"),
        ("alpha", "2026-11-02", "USD"): Decimal("0.00225"),
    }


def test_a_batch_that_fails_leaves_nothing_of_itself(
    capsys: pytest.CaptureFixture[str], copying: Copying, book: PriceBook
) -> None:
    """r1 is in PostgreSQL in flight, with a cost row it should not have: writing r1's costs
    fails, and the whole first batch (r1 and r2, their history and spend) is rolled back."""
    target = PostgresQueries(copying.url)
    target.migrate()
    target.close()
    r1 = in_flight(book, "r1", "alpha", "deepseek-flash", "2026-11-01T15:59:59+00:00")
    store = PostgresLedger(copying.url, BEIJING)
    store.write([r1], [])
    store.close()
    pg_execute(copying.url, "INSERT INTO usage_cost VALUES ('r1', 'CNY', 1, 0)")
    before = pg_tables(copying.url)
    code, out, err = copying.copy(capsys, "--batch", "2")
    assert (code, out) == (1, "")
    assert err == (
        f"cannot use the ledger at {copying.url}: duplicate key value violates unique "
        'constraint "usage_cost_pkey" DETAIL:  Key (request_id, currency)=(r1, CNY) already '
        "exists.\n"
    )
    assert pg_tables(copying.url) == before
