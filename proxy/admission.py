"""Admission control: bounded concurrency, globally and per team, refused fast.

DeepSeek limits concurrency per account, across all keys, so one team's burst could take the
whole account's allowance and starve every other team. Calls beyond `limits.max_inflight` (all
teams) or `limits.max_inflight_per_team` are refused at once with 503 and ``Retry-After``
instead of waiting in an unbounded queue; so are new calls while the proxy is draining for a
shutdown.

One process (`Admission`) counts synchronously on its event loop, so its limits are exact. The
workers of ``serve --workers N`` (`SharedAdmission`) count in a shared file and hold the same
limits across all of them, to within N - 1 calls.

A live reload (`proxy.reload`) hands the new limits and teams to `Admission.update`: the next
call is admitted under them, and calls in progress stay counted until they leave, whether or
not their team is still configured. A new team is counted at once, in every worker; the only
refusal is `TeamsFull`, when the workers' shared counters have no column left for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from proxy.config import Limits
from proxy.errors import Draining, Overloaded
from proxy.shared_counters import ColumnRegistry, ColumnsFull, SharedCounters

COUNTERS_FILE = "admission.counters"
"""The shared counters' file, in the folder the workers of one run share."""
TEAMS_FILE = "admission.teams"
"""Which team each column of the counters counts (`proxy.shared_counters.ColumnRegistry`):
the supervisor's teams in config order, then each team a reload or a restarted worker
brought, in the order the first worker to need it added it."""
MAX_TEAMS = 4096
"""Teams the workers' shared counters have room for, from the start of the service: those
configured then, plus every team added by a reload since (a removed team keeps its column until
a restart, so its calls still running can leave). 4,097 counters of 8 bytes per worker: 32 KiB
each, of which a check still reads two per worker (all calls, and the team's)."""


class TeamsFull(Exception):
    """New teams, from a reload or a restarted worker's configuration, for which the workers'
    shared counters have no column left: nothing was changed, and the service must be
    restarted to count them (it then makes room for the teams configured at that time)."""


class Admission:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._total = 0
        self._by_team: dict[str, int] = {}
        self.draining = False
        self._idle: asyncio.Event | None = None

    def enter(self, team: str) -> None:
        """Count a call in, or raise `Overloaded` (503)."""
        self.refuse_if_draining()
        in_team = self._by_team.get(team, 0)
        if self._total >= self._limits.max_inflight:
            raise Overloaded(
                f"the proxy has {self._total} calls in progress, its limit; retry shortly"
            )
        if in_team >= self._limits.max_inflight_per_team:
            raise Overloaded(
                f"team {team!r} has {in_team} calls in progress, its limit; retry shortly"
            )
        self._total += 1
        self._by_team[team] = in_team + 1

    def refuse_if_draining(self) -> None:
        """Raise `Draining` (503, ``Connection: close``) while the proxy is shutting down."""
        if self.draining:
            raise Draining("the proxy is shutting down; retry on another instance")

    def update(self, limits: Limits, teams: Sequence[str]) -> None:
        """A reloaded configuration's limits and teams, for the next call; calls in progress
        stay counted and leave as they came in. Any team is counted as its calls come, so
        one process needs only the limits; `SharedAdmission` gives new teams a column."""
        self._limits = limits

    def in_flight(self) -> dict[str, int]:
        """Calls in progress per team (the ``llm_inflight_requests`` gauge reads this)."""
        return dict(self._by_team)

    def leave(self, team: str) -> None:
        self._total -= 1
        self._by_team[team] -= 1
        if self._idle is not None and not self._total:
            self._idle.set()

    async def drain(self, within: float) -> bool:
        """Refuse new calls from now on and wait (at most `within` seconds) for the running
        ones to end; True if they all did."""
        self.draining = True
        if self._total:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(within):
                    await self._idle.wait()
            except TimeoutError:
                return False
        return True


class SharedAdmission(Admission):
    """`Admission` with the limits held across the workers of ``serve --workers N``.

    Each worker counts its calls in its own slot of `SharedCounters` (column 0 all its calls,
    then one column per team, the same in every worker: `TEAMS_FILE` names them) and admits a
    call only while the sums over all slots are under the limits. A check and the count that
    follows are not one atomic step across processes (that would take a lock shared by the
    workers on every call), so two workers can both see room for the last call and both admit
    it: a limit can be passed by at most N - 1 calls, one per other worker. The check costs N
    reads per limit; a single process keeps the plain `Admission`.

    The counters have room for `MAX_TEAMS` teams from the start, so teams can be added while
    the workers run: a worker that starts (or restarts, after the configuration file changed)
    or reloads with a team `TEAMS_FILE` does not name yet appends it there, and every worker
    that has the team in its configuration finds its column there. A team's column never
    changes while the service runs, so its per-team limit holds across workers whichever
    reloaded first, and a removed team's running calls leave through the column they entered.
    """

    def __init__(
        self,
        limits: Limits,
        teams: Sequence[str],
        counters: SharedCounters,
        slot: int,
        registry: ColumnRegistry,
    ) -> None:
        """Count in `slot` of `counters`, with `teams` registered in `registry` (`TeamsFull`
        if they do not fit)."""
        super().__init__(limits)
        self._counters = counters
        self._slot = slot
        self._registry = registry
        self._columns = self._register(teams)

    @staticmethod
    def create(
        folder: Path, slots: int, teams: Sequence[str], *, capacity: int = MAX_TEAMS
    ) -> SharedCounters:
        """The supervisor's side: counters for `slots` workers and `capacity` teams, all zero,
        the first columns named after `teams` (`TeamsFull` if there are more than
        `capacity`)."""
        try:
            ColumnRegistry.create(folder / TEAMS_FILE, teams, capacity)
        except ColumnsFull as exc:
            raise TeamsFull(
                f"{len(teams)} teams are configured, but the workers' shared counters hold "
                f"{capacity}"
            ) from exc
        return SharedCounters.create(folder / COUNTERS_FILE, slots, 1 + capacity)

    @classmethod
    def join(cls, folder: Path, slot: int, limits: Limits, teams: Sequence[str]) -> SharedAdmission:
        """A worker's side: count in `slot` of the counters the supervisor created, with
        columns for `teams` (those added to the configuration since the service started are
        registered now; `TeamsFull` if there is no room left for them)."""
        registry = ColumnRegistry(folder / TEAMS_FILE)
        counters = SharedCounters(folder / COUNTERS_FILE, 1 + registry.capacity)
        try:
            return cls(limits, teams, counters, slot, registry)
        except TeamsFull:
            counters.close()
            raise

    def update(self, limits: Limits, teams: Sequence[str]) -> None:
        """`Admission.update`, with a column for each new team, registered for every worker
        before any of its calls can come (`TeamsFull`, changing nothing, if they do not fit).
        The registry is read only when a team is new to this worker."""
        if any(team not in self._columns for team in teams):
            self._columns = self._register(teams)
        super().update(limits, teams)

    def enter(self, team: str) -> None:
        """Refuse the call if the workers together are at a limit; else count it in, both in
        this worker's own counts (`Admission`: they also refuse calls while draining and feed
        this worker's ``llm_inflight_requests``) and in its slot of the shared ones."""
        if not self.draining:
            column = self._columns[team]
            total = self._counters.column_sum(0)
            if total >= self._limits.max_inflight:
                raise Overloaded(
                    f"the proxy's workers have {total} calls in progress, their "
                    "limit; retry shortly"
                )
            in_team = self._counters.column_sum(column)
            if in_team >= self._limits.max_inflight_per_team:
                raise Overloaded(
                    f"team {team!r} has {in_team} calls in progress over the "
                    "proxy's workers, its limit; retry shortly"
                )
        super().enter(team)  # never over a limit here: a worker's share is part of the sum
        self._counters.add(self._slot, 0, 1)
        self._counters.add(self._slot, self._columns[team], 1)

    def leave(self, team: str) -> None:
        super().leave(team)
        self._counters.add(self._slot, 0, -1)
        self._counters.add(self._slot, self._columns[team], -1)

    def _register(self, teams: Sequence[str]) -> dict[str, int]:
        """Every registered team's column (column 0 counts all calls)."""
        try:
            columns = self._registry.columns(teams)
        except ColumnsFull as exc:
            raise _full(exc) from exc
        return {team: 1 + index for team, index in columns.items()}


def _full(exc: ColumnsFull) -> TeamsFull:
    return TeamsFull(
        f"no room for the new team(s) {', '.join(exc.missing)}: the workers' shared counters "
        f"hold {exc.capacity} teams, and {exc.taken} have been configured since the service "
        "started (removed teams included); restart the service to add more teams"
    )
