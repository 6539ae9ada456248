"""Batched ledger writes off the request path, bounded and loud when the ledger cannot commit.

`LedgerWriter` is the proxy's `RecordSink` once the ledger is on: `dispatched` and `submit`
only append the record to a deque (no I/O, no lock: a deque's append and popleft are atomic);
one thread wakes every `flush_interval`, takes everything queued and writes it in batches, one
transaction per batch. Waking per interval rather than per record matters: the writer shares
the interpreter (and its lock) with the event loop, and a per-record hand-off cost the loop
more than the writing itself (measured in bench/).

Durability window: a record waits at most `flush_interval` seconds (default 0.1) on the queue
before its batch is written, and a batch is durable once its transaction commits, so a
``kill -9`` loses at most the records that ended in the last `flush_interval` plus the commit in
progress. A call still running at that moment is not lost: its ``in_flight`` row was written
when it was dispatched (within the same window) and becomes ``interrupted`` on restart. SIGTERM
and SIGINT lose nothing that the ledger can take: `close` commits the queue before the process
exits.

When the ledger cannot commit (a full disk, I/O errors, a database locked for longer than its
busy timeout, its file deleted), nothing is dropped and nothing waits without bound:

- The thread keeps waking every `flush_interval` and moves everything queued into what it
  holds for retry: a dispatched call becomes its small ``in_flight`` record at once (the
  `CallMeter` behind it holds the whole request payload, which must not stay in memory), and
  a call's final record replaces its in-flight one. It retries one batch at a time, with
  backoff (`proxy.ledger.commit_health`), so a freed disk is noticed within a second and a
  retry costs one batch, however many records wait.
- `committing` is False from the first failed write until one succeeds; `has_room` is False
  once the records waiting reach `max_queued_records`. Both cost an attribute read (and a
  deque's length), no lock and no I/O: the request path asks them on every call
  (`proxy.relay.call` refuses calls of teams with hard budgets while not committing, and every
  call while there is no room).
- Every second the thread checks that the ledger's path still leads to the file it opened
  (`proxy.ledger.moved_file`). If the file was deleted or replaced, writing on would only feed
  a file no one can open again (it vanishes with the process), so the writer stops writing for
  good (until a restart), saves what the file holds through its open connection beside it
  (``<ledger>.recovered-...``, `proxy.ledger.spill`) and logs how to restore it. It never
  creates a database at the old path: the old ``-wal`` and ``-shm`` files may still be there.
- `close(timeout)` waits at most `timeout` for the records to commit, then returns the ones it
  could not write, for `serve` to save in a spill file (`proxy.ledger.spill.spill`).

Every failure is logged at ERROR when it starts, again every minute while it lasts, and
counted (`status`, exported by `proxy.metrics`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import cast

from proxy.config import DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_QUEUED_RECORDS
from proxy.ledger.commit_health import CommitHealth
from proxy.ledger.moved_file import FileWatch
from proxy.ledger.store import LedgerStore
from proxy.records import Dispatched, UsageRecord

log = logging.getLogger("proxy.ledger")

MAX_BATCH = 100
"""Records per transaction. The writer holds the interpreter lock while it prepares a batch;
small batches with a yield between them keep each hold under a millisecond, so the event loop
is never stalled for long (a 200-record batch added about 4 ms to the p99 latency)."""
STOP_GRACE = 0.5
"""Seconds `close` gives the thread to stop once it gave up: it stops at its next wake, which
`close` brings forward, unless it is inside a write (SQLite may wait up to its busy timeout
for a locked database); then it is left, a daemon, and the store is not closed under it."""


@dataclass(frozen=True, slots=True)
class LedgerStatus:
    """The writer's figures, read by the metrics at scrape time (`proxy.metrics`)."""

    committing: bool
    waiting: int
    """Records not yet committed: queued, or held for retry."""
    capacity: int
    """`max_queued_records`."""
    write_errors: int
    """Failed write attempts since start."""
    last_commit: float
    """Unix time of the last commit (the writer's start until its first)."""


class LedgerWriter:
    """A bounded deque in front of a `LedgerStore`, drained by one writer thread; also the
    ledger's `proxy.records.LedgerHealth`."""

    def __init__(
        self,
        store: LedgerStore,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queued_records: int = DEFAULT_MAX_QUEUED_RECORDS,
    ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.max_queued_records = max_queued_records
        self._items: deque[tuple[Dispatched, bool]] = deque()
        # What the thread holds until it commits, by request id in arrival order: in-flight
        # records of running calls, and final records. Changed only by the thread, under
        # `_lock`, which `close` takes to stop it and read what is left.
        self._pending: dict[str, UsageRecord] = {}
        self._final: dict[str, UsageRecord] = {}
        self._held = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._requested = 0  # flush requests made ...
        self._completed = 0  # ... and the ones whose records are committed
        self._closing = False
        self._closed = False
        self._stopped = False  # `close` gave up: nothing more is taken or written
        self._health = CommitHealth(max_queued_records)
        self._watch = FileWatch(store)
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    def dispatched(self, call: Dispatched) -> None:
        self._items.append((call, False))

    def submit(self, record: UsageRecord) -> None:
        self._items.append((record, True))

    def committing(self) -> bool:
        return self._health.committing

    def has_room(self) -> bool:
        # Queue entries count until the thread takes them (a call that ended within the
        # interval counts twice, its dispatch and its record): the bound errs on the safe side.
        return len(self._items) + self._held < self.max_queued_records

    def status(self) -> LedgerStatus:
        health = self._health
        return LedgerStatus(
            health.committing,
            len(self._items) + self._held,
            self.max_queued_records,
            health.write_errors,
            health.last_commit,
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is committed (tests, scrapes, shutdown)."""
        with self._progress:
            self._requested += 1
            ticket = self._requested
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._completed >= ticket, timeout)

    def close(self, timeout: float | None = None) -> list[UsageRecord]:
        """Commit everything queued, waiting at most `timeout` seconds (None: as long as it
        takes; then `STOP_GRACE` for the thread to stop), then close the store.

        Returns the records that could not be committed, which the caller must save
        (`proxy.ledger.spill.spill`); none when all were. A ledger whose file is gone can take
        nothing, so then it returns at once. A record being committed at the very moment it
        gives up may be both committed and returned: replaying it is harmless (final rows are
        idempotent).
        """
        if self._closed:
            return []
        self._closed = True
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            self._stopped = True
            self._take_locked()
            left = [*self._pending.values(), *self._final.values()]
        self._wake.set()
        self._thread.join(STOP_GRACE)  # it stops at once, unless inside a write
        if left:
            why = "its file is gone" if self._watch.detached else f"waited {timeout} s"
            log.error(
                "the ledger could not commit %d record(s) (%s); giving up on them", len(left), why
            )
        if self._thread.is_alive():  # a write that has not returned (a locked database)
            log.error("the ledger writer is still inside a write; leaving it")
            return left
        if self._watch.copy_at is not None:  # a last try before the open file is gone for good
            self._watch.save_copy(time.monotonic())
        try:
            self.store.close()
        except Exception:  # the records are accounted for; the process is stopping anyway
            log.exception("closing the ledger failed")
        return left

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            closing = self._closing
            with self._progress:
                ticket = self._requested
            with self._lock:
                if not self._stopped:
                    self._take_locked()  # everything queued before the ticket read above
            now = time.monotonic()
            self._watch.check(now, self._held, self.max_queued_records)
            detached = self._watch.detached
            if detached:
                self._health.committing = False
            elif now >= self._health.retry_at:
                self._commit()
            self._health.note_room(self._held)
            if not self._held:
                with self._progress:
                    self._completed = ticket
                    self._progress.notify_all()
            if closing and (not self._held or detached or self._stopped):
                return

    def _take_locked(self) -> None:
        """Move everything queued into what the thread holds (the caller holds `_lock`). A
        call that ended since the last take has both records; only its final one is kept,
        and its in-flight record is never even built."""
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
        for call in dispatched:
            if call.request_id not in final:
                self._pending[call.request_id] = call.in_flight_record()
        for request_id, record in final.items():
            self._pending.pop(request_id, None)
            self._final[request_id] = record
        self._held = len(self._pending) + len(self._final)

    def _commit(self) -> None:
        """Write what is held, one batch per transaction, until all is written or one fails."""
        while self._held and not self._stopped:
            with self._lock:
                pending = list(islice(self._pending.values(), MAX_BATCH))
                final = list(islice(self._final.values(), MAX_BATCH))
            try:
                self.store.write(pending, final)
            except Exception as exc:  # keep the records and retry: spend must not be dropped
                self._health.failed(exc, self._held)
                return
            with self._lock:  # `close` may have merged a final over an in-flight record
                for record in pending:
                    self._pending.pop(record.request_id, None)
                for record in final:
                    self._final.pop(record.request_id, None)
                self._held = len(self._pending) + len(self._final)
            self._health.succeeded()
            time.sleep(0)  # hand the interpreter back to the event loop between batches
