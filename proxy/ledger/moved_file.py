"""A ledger file deleted or replaced while the proxy runs (`proxy.ledger.writer`).

Every `FILE_CHECK_INTERVAL` the writer's thread checks that the ledger's path still leads to the
file it opened. If not, writing on would only feed a file no one can open again (it vanishes
with the process), so the writer stops writing for good (until a restart), saves what the file
holds through its open connection beside it (``<ledger>.recovered-...``, `proxy.ledger.spill`),
retrying with backoff up to `MAX_COPY_RETRY_DELAY`, and logs how to restore it. It never creates
a database at the old path: the old ``-wal`` and ``-shm`` files may still be there.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from proxy.ledger.spill import beside
from proxy.ledger.store import FileLedger, LedgerStore

log = logging.getLogger("proxy.ledger")

FILE_CHECK_INTERVAL = 1.0
MAX_COPY_RETRY_DELAY = 60.0


class FileWatch:
    """Watches one store's file from the writer's thread, and rescues it once it is gone; a
    store without a file (PostgreSQL) has nothing to watch."""

    def __init__(self, store: LedgerStore) -> None:
        self.file = store if isinstance(store, FileLedger) else None
        self.detached = False
        """The ledger's file is gone: it is never written again."""
        self.copy_at: float | None = None
        """When to try saving a copy of the detached ledger (None: saved, or not needed)."""
        self._check_at = 0.0
        self._copy_delay = FILE_CHECK_INTERVAL

    def check(self, now: float, held: int, capacity: int) -> None:
        """At most every `FILE_CHECK_INTERVAL`: has the file gone? Then, or later if a copy
        failed, save a copy."""
        if self.file is None or now < self._check_at:
            return
        self._check_at = now + FILE_CHECK_INTERVAL
        if not self.detached and self.file.moved():
            self.detached = True
            self.copy_at = now
            log.error(
                "the ledger file %s was deleted or replaced while the proxy was "
                "running: nothing more is written to it (rows written to a deleted file "
                "vanish with the process), and calls of teams with hard budgets are "
                "refused. Records wait in memory (%d now, at most %d) and are saved "
                "beside the ledger when the proxy stops; restarting it opens a ledger "
                "at the path again",
                self.file.path,
                held,
                capacity,
            )
        if self.copy_at is not None and now >= self.copy_at:
            self.save_copy(now)

    def save_copy(self, now: float) -> None:
        """Save what the deleted ledger holds, through the connection that still has it."""
        assert self.file is not None, "only a file is copied"
        path = self.file.path
        target = beside(path, "recovered", datetime.now(UTC))
        try:
            self.file.save_copy(target)
        except Exception as exc:  # a full disk, most likely: try again, less and less often
            self.copy_at = now + self._copy_delay
            log.error(
                "could not save a copy of the deleted ledger to %s (%s); trying again in "
                "%.0f s. Until a copy is saved its rows exist only in the deleted file "
                "this process holds open: make room before stopping the proxy",
                target,
                exc,
                self._copy_delay,
            )
            self._copy_delay = min(self._copy_delay * 2, MAX_COPY_RETRY_DELAY)
            return
        self.copy_at = None
        log.error(
            "saved the deleted ledger, as this process still saw it, to %s. To restore "
            "it: stop the proxy (it saves the records it could not write beside the "
            "ledger and names the file); move %s-wal and %s-shm aside if they are there "
            "(what they hold is in the copy); move %s to %s; start the proxy; then put "
            "the saved records back with python -m proxy ledger-replay. With several "
            "workers each saves a copy: use the newest",
            target,
            path,
            path,
            target,
            path,
        )
