"""A ledger that SQLite itself refuses to grow, for the tests of a ledger that cannot commit.

`PRAGMA max_page_count` caps the database of one connection: past it, SQLite fails a write
with SQLITE_FULL ("database or disk is full"), as it does on a full disk. The cap is set on
the store's own writing connection (a private attribute: the limit is per connection), and
lifted the same way, while the writer thread runs.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

from proxy.config import Limits
from proxy.ledger.store import SQLiteLedger
from proxy.metering import build_record
from proxy.pricing import PriceBook, Pricer
from proxy.records import UsageRecord
from proxy.usage import parse_usage
from tests.support.calls import call_meter
from tests.support.requests import BOUNDED_USAGE

FULL = "database or disk is full"
LOOSE = Limits()  # bounds far above these records' usage: nothing is cut


def record(book: PriceBook, request_id: str, started_at: datetime, team: str) -> UsageRecord:
    """A complete call with `BOUNDED_USAGE`, priced at its start."""
    meter = call_meter(
        request_id, team=team, started_at=started_at, upstream_status=200, price_book=book.digest
    )
    meter.reported = parse_usage(BOUNDED_USAGE)
    return build_record(
        meter, started_at + timedelta(seconds=1), Pricer(book), "request_start", LOOSE
    )


def fill_to_the_limit(
    store: SQLiteLedger, book: PriceBook, team: str, before: datetime
) -> list[UsageRecord]:
    """Cap the ledger at its size, then store records until SQLite refuses one; returns those
    it took. Every later record of `team` that starts at or after `before`, with a request id
    from `proxy.relay.request.new_request_id`, fails too: such a record lands on the last page of
    every table and index it touches, as the fillers did (their ids, rows and instants all
    increase, and sort before the later ones), and one of those pages is full."""
    conn = store._conn  # the writer's own connection: the cap is per connection
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    taken: list[UsageRecord] = []
    for i in range(1000):
        filler = record(book, f"00-filler-{i:04d}", before - timedelta(hours=1, seconds=-i), team)
        try:
            store.write([], [filler])
        except sqlite3.OperationalError as exc:
            assert str(exc) == FULL, exc
            return taken
        taken.append(filler)
    raise AssertionError("the ledger never filled up")


def lift_the_limit(store: SQLiteLedger) -> None:
    store._conn.execute("PRAGMA max_page_count = 1073741823")  # as above
