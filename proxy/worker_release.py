"""Releasing what a dead worker of ``serve --workers N`` left in the shared ledger.

A worker's budget holds and in-flight rows carry its owner id; when the supervisor reaps it, it
releases them in one ledger transaction (`proxy.ledger.store.release_owner`, or
`proxy.ledger.pg_store.release_dead` for a PostgreSQL ledger, where the other replicas would
otherwise release the worker only when its lease runs out) so nothing of a dead worker keeps
refusing calls. If the ledger cannot be written then, the release is retried every
`RELEASE_RETRY` seconds while the service goes on (`proxy.workers`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from proxy.config import ProxyConfig
from proxy.ledger.connection import connect
from proxy.ledger.pg_store import release_dead
from proxy.ledger.store import release_owner

log = logging.getLogger("proxy.workers")

RELEASE_RETRY = 1.0
"""Seconds between two attempts to release a dead worker's state while the ledger fails."""
_RELEASE_WAIT = "PRAGMA busy_timeout = 1000"
"""A release waits at most 1 s for the ledger's write lock (a worker waits 10 s): a short wait
keeps the supervisor answering signals and deaths, and a failed release is retried anyway."""


Release = Callable[[str], tuple[int, int]]
"""Releases one owner's calls and holds: (calls ended, holds dropped); raises on failure."""


def sqlite_release(ledger: Path) -> Release:
    def release(owner: str) -> tuple[int, int]:
        with contextlib.closing(connect(ledger)) as conn:
            conn.execute(_RELEASE_WAIT)
            return release_owner(conn, owner)

    return release


def ledger_release(config: ProxyConfig) -> Release:
    """How the supervisor releases a dead worker in the configured ledger."""
    if config.ledger_url is None:
        return sqlite_release(config.ledger_path)
    url = config.ledger_url
    return lambda owner: release_dead(url, owner)


class DeadOwners:
    """The owner ids of dead workers whose release failed, each with when to try again."""

    def __init__(self, release: Release) -> None:
        self._release = release
        self._due: dict[str, float] = {}
        """Owner -> when to try again (monotonic seconds)."""

    def dues(self) -> list[float]:
        """When the next retries are due (monotonic seconds)."""
        return list(self._due.values())

    def release(self, owner: str, *, retry: bool = False) -> None:
        """Release a dead worker's budget holds and in-flight calls (`release_owner`).

        If the ledger cannot be written (locked past its busy timeout, disk full), the
        replacement still starts, under a new owner id, and the release is retried every
        `RELEASE_RETRY` seconds: serving goes on while the old holds wait to go.
        """
        try:
            calls, holds = self._release(owner)
        except Exception:  # the ledger's errors, whichever ledger: retry soon
            if not retry:
                log.exception(
                    "cannot release the budget holds and calls of dead worker %s; "
                    "retrying every %g s",
                    owner,
                    RELEASE_RETRY,
                )
            self._due[owner] = time.monotonic() + RELEASE_RETRY
            return
        self._due.pop(owner, None)
        if calls or holds:
            log.warning(
                "released dead worker %s: %d call(s) in flight recorded as "
                "'interrupted', %d budget hold(s) dropped",
                owner,
                calls,
                holds,
            )

    def retry_due(self) -> None:
        """Try again every release whose time has come."""
        now = time.monotonic()
        for owner, due in list(self._due.items()):
            if due <= now:
                self.release(owner, retry=True)
