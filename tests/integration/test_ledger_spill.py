"""Records a stopping proxy could not write: saved beside the ledger (or in the log), and put
back by ``python -m proxy ledger-replay`` exactly once, with daily spend kept consistent."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.cli import main
from proxy.ledger.spill import read_records, spill
from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook
from proxy.records import UsageRecord
from proxy.relay.request import new_request_id
from tests.support.calls import call_meter
from tests.support.ledger_faults import record
from tests.support.proxy_harness import PEAK
from tests.support.serve_process import write_config

NOW = datetime(2026, 11, 2, 3, 4, 5, tzinfo=UTC)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"  # serve's


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def spend(path: Path) -> dict[str, Decimal]:
    return {
        str(team): Decimal(str(amount))
        for team, amount in rows(
            path, "SELECT team, amount FROM spend_daily WHERE currency = 'CNY'"
        )
    }


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """An empty ledger, and the config that names it."""
    write_config(tmp_path, "http://127.0.0.1:9", 9)
    path = tmp_path / "ledger.sqlite3"
    SQLiteLedger(path, ZoneInfo("Asia/Shanghai")).close()
    return path


def calls(book: PriceBook, count: int) -> list[UsageRecord]:
    return [record(book, new_request_id(), PEAK, "beta") for _ in range(count)]


def replay(ledger: Path, *files: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["ledger-replay", "--config", str(ledger.parent / "proxy.yaml"), *map(str, files)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_spilled_records_go_back_once(
    ledger: Path, book: PriceBook, capsys: pytest.CaptureFixture[str]
) -> None:
    already = calls(book, 2)
    store = SQLiteLedger(ledger, ZoneInfo("Asia/Shanghai"))
    store.write([], already[:1])  # one made it before the ledger failed
    store.close()
    running = UsageRecord.in_flight(
        call_meter(new_request_id(), team="beta", stream=True),
        PEAK,
        book.digest,
    )
    records = [*already, running]
    saved = spill(records, ledger, ledger.parent / "proxy.yaml", NOW)
    assert saved is not None
    assert saved.name == f"ledger.sqlite3.unwritten-20261102T030405Z-{os.getpid()}.jsonl"
    assert read_records(saved) == records
    assert len(saved.read_text().splitlines()) == 3

    assert replay(ledger, saved, capsys=capsys) == (
        0,
        f"3 record(s) read: 2 written to {ledger}, 1 already there\n",
    )
    # The call that never ended is recorded as the store's own recovery would end it.
    assert rows(
        ledger, "SELECT request_id, state, outcome, usage_source, priced FROM usage ORDER BY 1"
    ) == sorted(
        [
            (already[0].request_id, "final", "complete", "reported", 1),
            (already[1].request_id, "final", "complete", "reported", 1),
            (running.request_id, "final", "interrupted", "unknown", 0),
        ]
    )
    assert spend(ledger) == {"beta": Decimal("0.00072")}

    assert replay(ledger, saved, capsys=capsys) == (  # again: nothing changes
        0,
        f"3 record(s) read: 0 written to {ledger}, 3 already there\n",
    )
    assert spend(ledger) == {"beta": Decimal("0.00072")}
    assert rows(ledger, "SELECT count(*) FROM usage_cost") == [(4,)]


@contextlib.contextmanager
def serve_log(path: Path) -> Iterator[None]:
    """The ``proxy`` logger writing to `path` as ``serve`` formats it."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("proxy")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_records_go_to_the_log_when_no_file_can_be_written(
    ledger: Path, book: PriceBook, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = calls(book, 3)
    gone = tmp_path / "gone" / "ledger.sqlite3"  # its folder is gone: no spill file possible
    log = tmp_path / "serve.log"
    with serve_log(log):
        logging.getLogger("proxy").error("something else happened {not a record}")
        assert spill(records, gone, ledger.parent / "proxy.yaml", NOW) is None
    text = log.read_text()
    assert text.count(" ERROR proxy.ledger unwritten ledger record: {") == 3
    assert "3 usage record(s) could not be written to the ledger" in text
    assert "python -m proxy ledger-replay --config" in text

    assert read_records(log) == records
    assert replay(ledger, log, capsys=capsys) == (
        0,
        f"3 record(s) read: 3 written to {ledger}, 0 already there\n",
    )
    assert spend(ledger) == {"beta": Decimal("0.00108")}


def test_a_spill_file_is_never_overwritten(ledger: Path, book: PriceBook) -> None:
    first = spill(calls(book, 1), ledger, ledger.parent / "proxy.yaml", NOW)
    assert first is not None
    kept = first.read_bytes()
    assert spill(calls(book, 1), ledger, ledger.parent / "proxy.yaml", NOW) is None  # same name
    assert first.read_bytes() == kept


def test_replay_writes_nothing_from_a_file_with_a_bad_line(
    ledger: Path, book: PriceBook, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = spill(calls(book, 2), ledger, ledger.parent / "proxy.yaml", NOW)
    assert good is not None
    bad = tmp_path / "bad.jsonl"
    lines = good.read_text().splitlines()
    bad.write_text(lines[0] + "\n" + lines[1].replace('"priced":true', '"priced":"yes"') + "\n")
    assert replay(ledger, good, bad, capsys=capsys) == (
        1,
        f"{bad}:2: priced: unexpected value 'yes'; nothing was written\n",
    )
    assert rows(ledger, "SELECT count(*) FROM usage") == [(0,)]
    empty = tmp_path / "empty.log"
    empty.write_text("2026-11-02 INFO proxy started\n")
    assert replay(ledger, empty, capsys=capsys) == (
        1,
        f"{empty}: no records in it; nothing was written\n",
    )
    ledger.unlink()  # never replayed into a new, empty ledger
    assert replay(ledger, good, capsys=capsys) == (1, f"no ledger at {ledger}\n")
    assert not ledger.exists()


def test_a_spilled_call_ended_by_a_restart_is_restored(
    ledger: Path, book: PriceBook, capsys: pytest.CaptureFixture[str]
) -> None:
    """The usual order of a disk-full stop: the call's in-flight row was committed while the
    ledger was fine, its final record was spilled, and the proxy was restarted (which ends
    in-flight rows as ``interrupted``, usage unknown) before anyone replayed. The replay must
    still put the call's real record and cost in, once."""
    [call] = calls(book, 1)
    store = SQLiteLedger(ledger, ZoneInfo("Asia/Shanghai"))
    store.write(
        [
            UsageRecord.in_flight(
                call_meter(call.request_id, team="beta"),
                PEAK,
                book.digest,
            )
        ],
        [],
    )
    store.close()
    saved = spill([call], ledger, ledger.parent / "proxy.yaml", NOW)
    assert saved is not None
    restarted = SQLiteLedger(ledger, ZoneInfo("Asia/Shanghai"))  # recovery at start-up
    assert restarted.interrupted == 1
    restarted.close()
    assert rows(ledger, "SELECT outcome, usage_source FROM usage") == [("interrupted", "unknown")]
    assert replay(ledger, saved, capsys=capsys) == (
        0,
        f"1 record(s) read: 1 written to {ledger}, 0 already there\n",
    )
    assert rows(ledger, "SELECT outcome, usage_source FROM usage") == [("complete", "reported")]
    assert spend(ledger) == {"beta": call.costs["CNY"]}
    assert replay(ledger, saved, capsys=capsys) == (
        0,
        f"1 record(s) read: 0 written to {ledger}, 1 already there\n",
    )
    assert spend(ledger) == {"beta": call.costs["CNY"]}
