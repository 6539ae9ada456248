"""Hard-budget holds in a PostgreSQL ledger, shared by every replica (step 3).

The check and the hold are one transaction that first takes a transaction-level advisory lock
on the team: two replicas admitting calls of one team run one after the other, the second
seeing the first's hold, so N replicas x M concurrent calls cannot pass a budget by more than
one call's worst case (the bound the guard states). The reads come after the lock, each a fresh
snapshot under READ COMMITTED, so they see every hold committed before the lock was granted;
the decision itself stays in Python (`proxy.budgets.decide`, with the team's policy), between
the read and the insert. Measured on loopback (bench/RESULTS.md, issue 13): asyncpg, chosen
for the least CPU per admission on the event loop.

An admission costs one round trip when the call fits as it is (the common case): one call of
the schema's ``proxy_hold`` function takes the lock, reads the standings and inserts the holds
if every budget has room for the call's worst case (`proxy.ledger.pg_schema.HOLD_FUNCTION`),
and returns the standings either way; a refusal is then decided in Python from those
standings, read under the lock. Only a call that must be lowered to fit (``over_budget:
lower_max_tokens``) takes the general path, four round trips: ``BEGIN`` and the lock in one
simple query, the standings, the insert, ``COMMIT``.

The store's own connections commit without waiting for the server's disk
(``synchronous_commit = off``): a hold is visible to every replica the moment it commits either
way, and only matters while its call runs; a PostgreSQL crash may forget the holds of the last
fraction of a second (at most three ``wal_writer_delay``, 0.6 s by default), so calls admitted
in that instant could pass a budget by their worst cases. Waiting for the disk cost about 1 ms
per admission on this machine (bench/RESULTS.md). The ledger's records, the money itself, are
committed durably (`proxy.ledger.pg_store`).

A call's holds carry `owner` (this replica's id), so the survivors can release those of a
replica that died. Settling is idempotent on the request id: an update of the call's rows, or
their deletion when nothing is billable.

While the database cannot be reached or answers with an error, `hold` raises
`BudgetUnavailable` (503 with ``Retry-After``, fail closed) after at most `ACQUIRE_TIMEOUT`
seconds of waiting for a connection. A connection the server closed (it restarted) is found
broken only when used: `hold` then tries once more on a fresh one, so the first calls after an
outage are not refused for it.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from proxy.budgets.decide import BudgetUnavailable, Standing
from proxy.budgets.holds import HELD_UNREADABLE, Admit, held_by_period
from proxy.config import Budget
from proxy.formats import ZERO
from proxy.periods import Period, period_start

log = logging.getLogger("proxy.budgets")

ACQUIRE_TIMEOUT = 2.0
"""Seconds a call waits for a database connection (a free one of the pool, or a new one)
before its admission fails closed."""
COMMAND_TIMEOUT = 5.0
"""Seconds one statement of an admission may take; a server that stopped answering fails
the admission (503) instead of holding the call."""
POOL_SIZE = (2, 16)
"""Connections kept open, and the most opened. An admission holds one for a few round trips
(about 0.3 ms on loopback); 16 admit thousands of calls a second, and the per-team lock
serialises one team's admissions anyway."""
_LOCK_SPACE = 0x6275_6467
"""First key of the per-team advisory lock, so it cannot collide with other users' locks."""
_STANDINGS = """
SELECT false, currency, day, sum(amount) FROM spend_daily
WHERE team = $1 AND day BETWEEN $2 AND $3 GROUP BY currency, day
UNION ALL
SELECT true, currency, day, sum(amount) FROM budget_holds
WHERE team = $1 AND day >= $2 GROUP BY currency, day"""
"""The team's spend and holds per currency and day since the earliest period start; each
budget's standing is summed from them in Python (one plain indexed read: half the time of
summing per budget in SQL, measured)."""
_HOLD = (
    "SELECT spent, held, admitted "
    "FROM proxy_hold($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)
_INSERT = """
INSERT INTO budget_holds (request_id, team, currency, day, amount, owner)
SELECT $1, $2, h.currency, $3, h.amount, $4
FROM unnest($5::text[], $6::numeric[]) AS h(currency, amount)"""
_HELD_BY_DAY = (
    "SELECT day, currency, sum(amount) FROM budget_holds WHERE team = $1 AND day >= $2 "
    "GROUP BY day, currency"
)
_DROP = "DELETE FROM budget_holds WHERE request_id = $1"
_SETTLE = """
UPDATE budget_holds SET amount = c.amount
FROM unnest($2::text[], $3::numeric[]) AS c(currency, amount)
WHERE budget_holds.request_id = $1 AND budget_holds.currency = c.currency"""

_UNREACHABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
"""What a lost or failing database raises (a refused connection is an OSError)."""
_BROKEN = (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)
"""What using a connection the server has closed raises. Trying again is safe: a hold is
keyed by the request id, so one that did commit makes the retry fail, never hold twice."""


def _lock_key(team: str) -> int:
    """The second key of the team's advisory lock: its name's CRC-32 as a signed 32-bit
    integer; two teams sharing one would only wait for each other."""
    return zlib.crc32(team.encode()) - (1 << 31)


def _begin_locked(team: str) -> str:
    """``BEGIN`` and the team's advisory lock, one simple query (one round trip); the keys are
    computed here, so the text sent holds only digits."""
    return f"BEGIN; SELECT pg_advisory_xact_lock({_LOCK_SPACE}, {_lock_key(team)})"


async def _no_disk_wait(conn: Any) -> None:
    """A new connection of the holds' pool commits without waiting for the disk."""
    await conn.execute("SET synchronous_commit TO off")


async def _keep_session(conn: Any) -> None:
    """Return a connection to the pool as it is. asyncpg's default reset costs a round trip
    per release (unlisten, close cursors, unlock session locks); the holds set no session
    state and take only transaction-level locks, which end with their transaction."""


def _standing(budget: Budget, start: date, rows: Sequence[Any]) -> Standing:
    """A budget's standing from `_STANDINGS`' rows: spend and holds in its currency since its
    period started."""
    spent = held = ZERO
    for is_hold, currency, day, amount in rows:
        if currency == budget.currency and day >= start:
            if is_hold:
                held += amount
            else:
                spent += amount
    return Standing(budget, start, spent, held)


@dataclass(frozen=True, slots=True)
class _Call:
    """One admission's arguments, for both paths."""

    team: str
    request_id: str
    day: date
    budgets: Sequence[Budget]
    starts: Sequence[date]
    admit: Admit


class PostgresHolds:
    """Holds in the PostgreSQL ledger behind `pool`, marked with `owner`; or, with `url`, in a
    pool of its own that `open` creates on the serving loop and `close` closes."""

    def __init__(
        self, pool: Any = None, *, url: str | None = None, owner: str | None = None
    ) -> None:
        assert (pool is None) != (url is None), "a pool, or the URL to open one"
        self._pool = pool
        self._url = url
        self._owner = owner

    def configure(self, budgets: Sequence[Budget]) -> None:
        """Nothing to follow: every check reads the rows against the budgets it is given."""

    async def open(self) -> None:
        if self._url is not None:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=POOL_SIZE[0],
                max_size=POOL_SIZE[1],
                timeout=ACQUIRE_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                reset=_keep_session,
                init=_no_disk_wait,
            )

    async def hold(
        self, team: str, request_id: str, day: date, budgets: Sequence[Budget], admit: Admit
    ) -> int | None:
        starts = [period_start(day, budget.period) for budget in budgets]
        try:
            call = _Call(team, request_id, day, budgets, starts, admit)
            try:
                held = await self._hold_as_is(call)
            except _BROKEN:  # a connection from before a restart: once more, on a new one
                held = await self._hold_as_is(call)
            if held:
                return None
            return await self._hold(call)
        except _UNREACHABLE as exc:  # one line per refused call: no traceback
            log.error("cannot hold budget for %s in PostgreSQL: %r", request_id, exc)
            raise BudgetUnavailable() from exc

    async def _hold_as_is(self, call: _Call) -> bool:
        """One ``proxy_hold`` call: True if the call was held as it is, False if it fits only
        lowered; `BudgetExceeded` raised from the standings read under the lock."""
        worst, budgets, starts = call.admit.worst, call.budgets, call.starts
        async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            spent, held, admitted = await conn.fetchrow(
                _HOLD,
                _LOCK_SPACE,
                _lock_key(call.team),
                call.team,
                call.request_id,
                self._owner,
                call.day,
                [b.currency for b in budgets],
                starts,
                [b.amount for b in budgets],
                [worst[b.currency] for b in budgets],
                list(worst),
                list(worst.values()),
            )
        standings = [
            Standing(budget, start, spent_in, held_in)
            for budget, start, spent_in, held_in in zip(budgets, starts, spent, held, strict=True)
        ]
        holds, lowered = call.admit(standings)  # refused: BudgetExceeded, as under the lock
        if admitted:
            # The function's rule is `decide`'s for a call that fits: it holds the worst case.
            assert (holds, lowered) == (worst, None), "proxy_hold and decide disagree"
            return True
        return False  # fits only lowered: decided again, in one transaction

    async def _hold(self, call: _Call) -> int | None:
        """The general path: one transaction under the team's lock, the decision in Python."""
        team, day, budgets, starts = call.team, call.day, call.budgets, call.starts
        async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            await conn.execute(_begin_locked(team))
            try:
                rows = await conn.fetch(_STANDINGS, team, min(starts), day)
                standings = [
                    _standing(budget, start, rows)
                    for budget, start in zip(budgets, starts, strict=True)
                ]
                holds, lowered = call.admit(standings)  # BudgetExceeded rolls back, below
                if holds:
                    await conn.execute(
                        _INSERT,
                        call.request_id,
                        team,
                        day,
                        self._owner,
                        list(holds),
                        list(holds.values()),
                    )
                await conn.execute("COMMIT")
            except BaseException:
                # A broken connection cannot roll back; the pool then closes it, which ends
                # the transaction on the server all the same.
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise
        return lowered

    async def held(
        self, team: str, starts: Mapping[Period, date]
    ) -> dict[Period, dict[str, Decimal]]:
        since = min(starts.values())
        try:
            try:
                rows = await self._held(team, since)
            except _BROKEN:  # a connection from before a restart: once more, on a new one
                rows = await self._held(team, since)
        except _UNREACHABLE as exc:
            log.error("cannot read the budget holds of team %r in PostgreSQL: %r", team, exc)
            raise BudgetUnavailable(HELD_UNREADABLE) from exc
        return held_by_period(rows, starts)

    async def _held(self, team: str, since: date) -> list[tuple[date, str, Decimal]]:
        async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            rows = await conn.fetch(_HELD_BY_DAY, team, since)
        return [(day, currency, amount) for day, currency, amount in rows]

    async def settle(self, request_id: str, costs: Mapping[str, Decimal] | None) -> None:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                if costs is None:
                    await conn.execute(_DROP, request_id)
                else:
                    await conn.execute(_SETTLE, request_id, list(costs), list(costs.values()))
        except _UNREACHABLE as exc:  # the ledger's write drops the hold anyway
            log.error("cannot settle budget hold of %s in PostgreSQL: %r", request_id, exc)

    async def close(self) -> None:
        """Close the pool this store opened (one it was given belongs to the giver)."""
        if self._url is not None and self._pool is not None:
            await self._pool.close()
