"""Whether the ledger commits, and the log lines that say when that changes (`proxy.ledger.writer`).

A failed write is retried with backoff from `FIRST_RETRY_DELAY` to `MAX_RETRY_DELAY`, so a freed
disk is noticed within a second. A failure is logged at ERROR when it starts and again every
`REMINDER_INTERVAL` while it lasts; its end, and a full queue and its end, are logged too.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("proxy.ledger")

FIRST_RETRY_DELAY = 0.05
MAX_RETRY_DELAY = 1.0
REMINDER_INTERVAL = 60.0


class CommitHealth:
    """The writer thread's record of its writes. Only that thread changes it; the request
    path reads `committing`, an attribute."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.committing = True
        """False from the first failed write until one succeeds, and for good once the
        ledger's file is gone."""
        self.write_errors = 0
        self.last_commit = time.time()
        self.retry_at = 0.0
        """`time.monotonic` instant before which no write is tried again."""
        self._retry_delay = FIRST_RETRY_DELAY
        self._failing_since = 0.0
        self._remind_at = 0.0
        self._full = False

    def failed(self, exc: Exception, held: int) -> None:
        now = time.monotonic()
        self.write_errors += 1
        self.retry_at = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_DELAY)
        if self.committing:
            self.committing = False
            self._failing_since = now
            self._remind_at = now + REMINDER_INTERVAL
            log.error(
                "the ledger cannot commit (%s): %d record(s) wait in memory, at most %d "
                "before every call is refused; calls of teams with hard budgets are "
                "refused until a write succeeds; retrying",
                exc,
                held,
                self.capacity,
                exc_info=exc,
            )
        elif now >= self._remind_at:
            self._remind_at = now + REMINDER_INTERVAL
            log.error(
                "the ledger still cannot commit after %.0f s (%s): %d record(s) wait in memory",
                now - self._failing_since,
                exc,
                held,
            )

    def succeeded(self) -> None:
        self.last_commit = time.time()
        self._retry_delay = FIRST_RETRY_DELAY
        if not self.committing:
            self.committing = True
            log.warning(
                "the ledger commits again, after %.1f s of failed writes",
                time.monotonic() - self._failing_since,
            )

    def note_room(self, held: int) -> None:
        """Log when the records waiting reach the bound, and when they fall below it again."""
        full = held >= self.capacity
        if full != self._full:
            self._full = full
            if full:
                log.error(
                    "%d record(s) wait for the ledger, its bound (ledger."
                    "max_queued_records): every call is refused until it commits",
                    held,
                )
            else:
                log.warning("the ledger's queue has room again (%d record(s) waiting)", held)
