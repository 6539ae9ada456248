"""`BalancePoller`: one process reads DeepSeek's balance every interval and stores it.

Every serving process (each worker of ``serve --workers N``, each replica on PostgreSQL) runs
a poller; only the one holding the lease in the shared ledger polls (`proxy.reconcile.book.
claim`). The holder renews its lease at each poll, for `LEASE_INTERVALS` intervals; the
others try to take it at each of theirs, so a dead poller (``kill -9``, a node gone) is
replaced within ``LEASE_INTERVALS + 1`` intervals (20 minutes at the default 5), and a
stopping one gives the lease up at once (`BalancePoller.leave`). Lease instants are the
processes' own clocks, as the snapshots' are: replicas' clocks must agree to well within an
interval (NTP does); a skewed one can at worst poll beside the holder for a while, which only
adds snapshots, and one whose clock is behind the newest snapshot stores nothing (a ``clock``
failure) until its clock has passed it, so windows only ever extend forwards.

A poll is ``GET /user/balance`` through the one upstream seam (`proxy.upstream.Upstream`, which
adds the company key), bounded by `FETCH_TIMEOUT`; the snapshot's instant is the proxy's clock
when the answer arrived. A failed poll never stops the poller or touches a call: it is
logged (the reason, never the key nor DeepSeek's body, which may echo the key's end) and
counted (``llm_deepseek_balance_poll_failures_total`` by reason,
`proxy.metrics.contract.POLL_FAILURES`), and the next
interval tries again. The first poll comes one interval after start-up, so a restart storm
cannot poll DeepSeek more often than the interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import Enum
from functools import partial

from proxy.errors import UpstreamFailure
from proxy.ledger.queries import LedgerUnusable
from proxy.metrics.contract import POLL_FAILURES
from proxy.reconcile import book
from proxy.reconcile.balance import Balance, BalanceUnreadable, parse_balance
from proxy.reconcile.live import LiveBook
from proxy.upstream import Upstream

log = logging.getLogger("proxy.reconcile")

BALANCE_PATH = "/user/balance"
FETCH_TIMEOUT = 30.0
"""Seconds one ``GET /user/balance`` may take, connection included."""
LEASE_INTERVALS = 3
"""The lease lasts this many intervals; the holder renews it every interval."""


class Polled(Enum):
    """What one `BalancePoller.poll_once` did."""

    STORED = "stored"
    """This process holds the lease; the snapshot is in the ledger."""
    STANDBY = "standby"
    """Another process holds the lease: nothing was asked of DeepSeek."""
    FAILED = "failed"
    """Logged and counted."""


class _Failed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in POLL_FAILURES, reason  # the counter's label stays a fixed set
        super().__init__(message)
        self.reason = reason


class BalancePoller:
    """This process's part in polling: the lease, the poll, its failures."""

    def __init__(
        self,
        ledger: LiveBook,
        upstream: Callable[[], Upstream],
        clock: Callable[[], datetime],
        owner: str,
        interval: float,
        failed: Callable[[str], None],
    ) -> None:
        """`upstream` gives the running app's `Upstream`; `failed` counts a failure by
        reason; `interval` is ``reconcile.balance_interval`` (the lease lasts
        `LEASE_INTERVALS` of it)."""
        self._ledger = ledger
        self._upstream = upstream
        self._clock = clock
        self.owner = owner
        self.interval = interval
        self._lease = timedelta(seconds=interval * LEASE_INTERVALS)
        self._failed = failed

    async def run(self) -> None:
        """Poll every interval until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            await self.poll_once()

    async def poll_once(self) -> Polled:
        """Take or renew the lease, and if this process holds it, poll and store."""
        try:
            return await self._poll()
        except _Failed as exc:
            log.warning("balance poll failed (%s): %s", exc.reason, exc)
            self._failed(exc.reason)
        except Exception:  # never let a bug stop the polling or reach a call
            log.exception("balance poll failed")
            self._failed("internal")
        return Polled.FAILED

    async def _poll(self) -> Polled:
        now = self._clock()
        claimed = await self._in_ledger(
            partial(book.claim, owner=self.owner, now=now, until=now + self._lease)
        )
        if not claimed:
            return Polled.STANDBY
        try:
            balances = await self._fetch()
        except _Failed:
            # A holder that cannot read the balance (no route to DeepSeek, an old key) gives
            # the lease up, so a process that can takes it at its next poll rather than
            # waiting behind a lease renewed forever.
            with contextlib.suppress(_Failed):
                await self._in_ledger(partial(book.release, owner=self.owner))
            raise
        await self._in_ledger(
            partial(
                book.store,
                taken_at=self._clock(),
                balances=balances,
                owner=self.owner,
                selection=self._ledger.selection,
            )
        )
        return Polled.STORED

    async def _in_ledger(self, work: Callable[..., object]) -> object:
        try:
            return await self._ledger.run(work)
        except LedgerUnusable as exc:
            raise _Failed("ledger", str(exc)) from exc
        except book.OutOfOrder as exc:
            raise _Failed("clock", str(exc)) from exc

    async def _fetch(self) -> tuple[Balance, ...]:
        upstream = self._upstream()
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                async with await upstream.send("GET", BALANCE_PATH, {}) as answer:
                    if answer.status != 200:
                        raise _Failed("http_error", f"DeepSeek answered HTTP {answer.status}")
                    _, body = await upstream.shown(answer)
        except TimeoutError as exc:
            raise _Failed("unreachable", f"no answer within {FETCH_TIMEOUT:g} s") from exc
        except UpstreamFailure as exc:
            raise _Failed("unreachable", str(exc)) from exc
        try:
            return parse_balance(body)
        except BalanceUnreadable as exc:
            raise _Failed("bad_answer", str(exc)) from exc

    async def leave(self) -> None:
        """Give the lease up (a clean stop), so another process polls without waiting for it
        to run out; a ledger away now only makes them wait for that."""
        try:
            await self._ledger.run(partial(book.release, owner=self.owner))
        except LedgerUnusable as exc:
            log.warning("cannot give the balance poller's lease up: %s", exc)
