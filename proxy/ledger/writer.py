"""Batched ledger writes off the request path.

`LedgerWriter` is the proxy's `RecordSink` once the ledger is on: `dispatched` and `submit`
only append the record to a deque (no I/O, no lock: a deque's append and popleft are atomic);
one thread wakes every `flush_interval`, takes everything queued and writes it as one batch, one
transaction per batch. Waking per interval rather than per record matters: the writer shares
the interpreter (and its lock) with the event loop, and a per-record hand-off cost the loop
more than the writing itself (measured in bench/).

Durability window: a record waits at most `flush_interval` seconds (default 0.1) on the queue
before its batch is written, and a batch is durable once its transaction commits, so a
``kill -9`` loses at most the records that ended in the last `flush_interval` plus the commit in
progress. A call still running at that moment is not lost: its ``in_flight`` row was written
when it was dispatched (within the same window) and becomes ``interrupted`` on restart. SIGTERM
and SIGINT lose nothing: `close` drains the queue before the process exits.

A failed write (disk full, database locked) is logged and retried with backoff; records are
never dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import cast

from proxy.ledger.store import LedgerStore
from proxy.records import Dispatched, UsageRecord

log = logging.getLogger("proxy.ledger")

DEFAULT_FLUSH_INTERVAL = 0.1
MAX_BATCH = 100
"""Records per transaction. The writer holds the interpreter lock while it prepares a batch;
small batches with a yield between them keep each hold under a millisecond, so the event loop
is never stalled for long (a 200-record batch added about 4 ms to the p99 latency)."""


class LedgerWriter:
    """A deque in front of a `LedgerStore`, drained by one writer thread."""

    def __init__(self, store: LedgerStore, flush_interval: float = DEFAULT_FLUSH_INTERVAL
                 ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self._items: deque[tuple[Dispatched, bool]] = deque()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._requested = 0  # flush requests made ...
        self._completed = 0  # ... and the ones whose records are committed
        self._closing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    def dispatched(self, call: Dispatched) -> None:
        self._items.append((call, False))

    def submit(self, record: UsageRecord) -> None:
        self._items.append((record, True))

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is committed (tests, scrapes, shutdown)."""
        with self._progress:
            self._requested += 1
            ticket = self._requested
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._completed >= ticket, timeout)

    def close(self) -> None:
        """Write everything queued, then stop the thread and close the store."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._wake.set()
        self._thread.join()
        self.store.close()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            closing = self._closing
            with self._progress:
                ticket = self._requested
            pending, final = self._drain()  # everything queued before the tickets read above
            for start in range(0, max(len(pending), len(final)), MAX_BATCH):
                self._write(pending[start:start + MAX_BATCH], final[start:start + MAX_BATCH])
                time.sleep(0)  # hand the interpreter back to the event loop between batches
            with self._progress:
                self._completed = ticket
                self._progress.notify_all()
            if closing:
                return

    def _drain(self) -> tuple[list[UsageRecord], list[UsageRecord]]:
        """Everything queued, as (in-flight, final) records. A call that ended since the last
        drain has both; only its final record is written (one row write instead of two), and
        its in-flight record is never even built."""
        items = self._items
        final: dict[str, UsageRecord] = {}
        dispatched: list[Dispatched] = []
        while items:
            item, is_final = items.popleft()
            if is_final:
                record = cast(UsageRecord, item)  # `submit` queued it
                final[record.request_id] = record
            else:
                dispatched.append(item)
        pending = [call.placeholder() for call in dispatched if call.request_id not in final]
        return pending, list(final.values())

    def _write(self, pending: list[UsageRecord], final: list[UsageRecord]) -> None:
        delay = 0.05
        while True:
            try:
                self.store.write(pending, final)
                return
            except Exception:  # keep the records and retry: spend must not be dropped
                log.exception("ledger write of %d records failed; retrying in %.2fs",
                              len(pending) + len(final), delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
