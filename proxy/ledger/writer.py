"""Batched ledger writes off the request path.

`LedgerWriter` is the proxy's `RecordSink` once the ledger is on: `dispatched` and `submit`
only put the record on a queue (no I/O, no lock held for long); one thread takes records off the
queue and writes them in batches, one transaction per batch.

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
import queue
import threading
import time
from dataclasses import dataclass

from proxy.ledger.store import LedgerStore
from proxy.records import UsageRecord

log = logging.getLogger("proxy.ledger")

DEFAULT_FLUSH_INTERVAL = 0.1
MAX_BATCH = 2000


@dataclass(frozen=True, slots=True)
class _Item:
    record: UsageRecord | None
    final: bool
    marker: threading.Event | None = None


class LedgerWriter:
    """Queue in front of a `LedgerStore`, drained by one writer thread."""

    def __init__(self, store: LedgerStore, flush_interval: float = DEFAULT_FLUSH_INTERVAL
                 ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    def dispatched(self, record: UsageRecord) -> None:
        self._queue.put(_Item(record, final=False))

    def submit(self, record: UsageRecord) -> None:
        self._queue.put(_Item(record, final=True))

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is committed (tests, scrapes, shutdown)."""
        marker = threading.Event()
        self._queue.put(_Item(None, final=False, marker=marker))
        return marker.wait(timeout)

    def close(self) -> None:
        """Write everything queued, then stop the thread and close the store."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_Item(None, final=True))  # the stop sentinel
        self._thread.join()
        self.store.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.flush_interval
            while len(batch) < MAX_BATCH and not _ends_batch(batch[-1]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            stopping = any(i.record is None and i.marker is None for i in batch)
            if stopping:  # drain whatever arrived before the sentinel was queued
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
            self._write(batch)
            for item in batch:
                if item.marker is not None:
                    item.marker.set()

    def _write(self, batch: list[_Item]) -> None:
        final = {i.record.request_id: i.record for i in batch if i.record and i.final}
        pending = [i.record for i in batch
                   if i.record and not i.final and i.record.request_id not in final]
        if not final and not pending:
            return
        delay = 0.05
        while True:
            try:
                self.store.write(pending, list(final.values()))
                return
            except Exception:  # keep the records and retry: spend must not be dropped
                log.exception("ledger write of %d records failed; retrying in %.2fs",
                              len(final) + len(pending), delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def _ends_batch(item: _Item) -> bool:
    return item.record is None  # a flush marker or the stop sentinel: write now
