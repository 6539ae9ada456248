"""Replicas sharing a PostgreSQL ledger release one that died: leases renewed while it lives.

Every replica (each process of ``serve``, workers included) has an owner id that marks its
``in_flight`` rows and its budget holds, and a row in ``replicas`` whose ``lease_until`` it
pushes `lease` seconds ahead every `lease` / 3 (`Leases.beat`). In the same beat it ends what
the dead left: the rows and holds of every owner whose lease has run out, or who has no lease
at all (a replica of an older version, or rows a reaped owner wrote after its release), are
released in one transaction: ``in_flight`` rows become final ``interrupted`` rows (usage
unknown, never priced) and holds are dropped, as `proxy.ledger.store.release_owner` does for a
SQLite ledger. So a replica killed with ``kill -9``, or a node that vanished, is released by the
survivors within ``lease + lease / 3`` seconds (20 s by default): its lease ends at most
`lease` after its last renewal, and a survivor looks every `lease` / 3. A replica that stops
cleanly releases itself at once (`Leases.leave`).

Times are the database's (``now()``), so the replicas' clocks need not agree. Concurrent beats
of several survivors are safe: each takes the expired lease rows ``FOR UPDATE SKIP LOCKED``, so
one releases a given dead replica and the others skip it, and the release statements only touch
rows still ``in_flight``.

A live replica can be taken for dead when it cannot reach the database for longer than its
lease (a network partition) while others can. Its running calls are then marked
``interrupted`` and its holds dropped; when it reaches the database again it renews its lease,
and each call's real record replaces its ``interrupted`` row as usual (`proxy.ledger.pg_store`),
so no spend is lost; only the budget check during the partition could miss those holds. After
the database itself was unreachable, every replica's lease may have run out meanwhile: a
replica that regains the database (or has just started, which may be just after such an
outage) first renews, then waits one whole lease before it releases anyone (`Leases.beat`),
so the others have had time to renew theirs. The bound above therefore counts from the later
of the death and the survivor's start or return.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

from proxy.ledger.store import INTERRUPTED_REASON

log = logging.getLogger("proxy.ledger")

_RENEW = """
INSERT INTO replicas (owner, host, started_at, lease_until)
VALUES ($1, $2, now(), now() + make_interval(secs => $3))
ON CONFLICT (owner) DO UPDATE SET lease_until = excluded.lease_until
RETURNING (xmax = 0) AS inserted"""
_EXPIRED = (
    "SELECT owner FROM replicas WHERE lease_until < now() AND owner <> $1 FOR UPDATE SKIP LOCKED"
)
_DEAD = """
SELECT owner FROM (
    SELECT owner FROM usage WHERE state = 'in_flight'
    UNION SELECT owner FROM budget_holds
) AS held
WHERE owner IS NOT NULL AND owner <> $1
  AND (owner = ANY($2::text[])
       OR NOT EXISTS (SELECT 1 FROM replicas r WHERE r.owner = held.owner))"""
_INTERRUPT = (
    "UPDATE usage SET state = 'final', outcome = 'interrupted', unpriced_reason = $2 "
    "WHERE state = 'in_flight' AND owner = ANY($1::text[])"
)
_DROP_HOLDS = "DELETE FROM budget_holds WHERE owner = ANY($1::text[])"
_FORGET = "DELETE FROM replicas WHERE owner = ANY($1::text[])"


@dataclass(frozen=True, slots=True)
class Released:
    """What one beat or one release ended."""

    owners: tuple[str, ...]
    calls: int
    holds: int


def _count(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[1])


class Leases:
    """One replica's lease in the ledger at `owner`, and its part in releasing the dead."""

    def __init__(self, owner: str, lease: float, *, host: str | None = None) -> None:
        self.owner = owner
        self.lease = lease
        self.host = host or socket.gethostname()
        self._release_from: float | None = None
        """When (event loop time) this replica may first release others: a whole lease after
        it (re)gained the database, so every live replica has renewed by then."""

    @property
    def interval(self) -> float:
        """Seconds between two beats."""
        return self.lease / 3

    async def join(self, conn: Any) -> None:
        """Take the lease before the replica writes anything (at start-up)."""
        await conn.execute(_RENEW, self.owner, self.host, self.lease)

    async def beat(self, conn: Any, now: float | None) -> Released:
        """Renew the lease, then release every dead owner (see the module's docstring).

        `now` is the loop's clock (None: release without waiting, for tests); a failed beat
        must be followed by `lost`."""
        inserted = await conn.fetchval(_RENEW, self.owner, self.host, self.lease)
        if inserted:
            log.warning(
                "this replica's lease (%s) had run out and others released its calls; "
                "renewed it. Calls it was running are recorded when they end",
                self.owner,
            )
        if now is not None:
            if self._release_from is None:
                self._release_from = now + self.lease
            if now < self._release_from:
                return Released((), 0, 0)
        async with conn.transaction():
            expired = [row[0] for row in await conn.fetch(_EXPIRED, self.owner)]
            dead = sorted({row[0] for row in await conn.fetch(_DEAD, self.owner, expired)})
            gone = sorted({*dead, *expired})
            if not gone:
                return Released((), 0, 0)
            calls = _count(await conn.execute(_INTERRUPT, dead, INTERRUPTED_REASON))
            holds = _count(await conn.execute(_DROP_HOLDS, dead))
            await conn.execute(_FORGET, gone)
        if calls or holds:
            log.warning(
                "released %d replica(s) whose lease ran out (%s): %d call(s) in flight "
                "recorded as 'interrupted', %d budget hold(s) dropped",
                len(gone),
                ", ".join(gone),
                calls,
                holds,
            )
        return Released(tuple(gone), calls, holds)

    def lost(self) -> None:
        """The database could not be reached: wait a whole lease after regaining it before
        releasing anyone."""
        self._release_from = None

    async def leave(self, conn: Any) -> Released:
        """Release this replica's own calls and holds and drop its lease (a clean stop: after
        the drain nothing of it should be running, so anything left was cut)."""
        mine = [self.owner]
        async with conn.transaction():
            calls = _count(await conn.execute(_INTERRUPT, mine, INTERRUPTED_REASON))
            holds = _count(await conn.execute(_DROP_HOLDS, mine))
            await conn.execute(_FORGET, mine)
        return Released((self.owner,), calls, holds)
