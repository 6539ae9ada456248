"""Admission control: bounded concurrency, globally and per team, refused fast.

DeepSeek limits concurrency per account, across all keys, so one team's burst could take the
whole account's allowance and starve every other team. Calls beyond `limits.max_inflight` (all
teams) or `limits.max_inflight_per_team` are refused at once with 503 and ``Retry-After``
instead of waiting in an unbounded queue; so are new calls while the proxy is draining for a
shutdown.

One process (`Admission`) counts synchronously on its event loop, so its limits are exact. The
workers of ``serve --workers N`` (`SharedAdmission`) count in a shared file and hold the same
limits across all of them, to within N - 1 calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from proxy.config import Limits
from proxy.errors import Draining, Overloaded
from proxy.shared_counters import SharedCounters

COUNTERS_FILE = "admission.counters"
"""The shared counters' file, in the folder the workers of one run share."""
TEAMS_FILE = "admission.teams"
"""The teams, in the order of the counters' columns, as the supervisor read them."""


class TeamsChanged(Exception):
    """A worker read other teams than the service started with: the configuration file was
    edited since. Its counts would land in other teams' columns, so it must not serve."""


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
    then one column per team in config order, the same in every worker as they read the same
    file) and admits a call only while the sums over all slots are under the limits. A check
    and the count that follows are not one atomic step across processes (that would take a
    lock shared by the workers on every call), so two workers can both see room for the last
    call and both admit it: a limit can be passed by at most N - 1 calls, one per other worker.
    The check costs N reads per limit; a single process keeps the plain `Admission`.
    """

    def __init__(
        self, limits: Limits, teams: Sequence[str], counters: SharedCounters, slot: int
    ) -> None:
        super().__init__(limits)
        self._counters = counters
        self._slot = slot
        self._columns = {team: 1 + index for index, team in enumerate(teams)}

    @staticmethod
    def create(folder: Path, slots: int, teams: Sequence[str]) -> SharedCounters:
        """The supervisor's side: counters for `slots` workers, all zero."""
        (folder / TEAMS_FILE).write_text(json.dumps(list(teams)), encoding="utf-8")
        return SharedCounters.create(folder / COUNTERS_FILE, slots, 1 + len(teams))

    @classmethod
    def join(cls, folder: Path, slot: int, limits: Limits, teams: Sequence[str]) -> SharedAdmission:
        """A worker's side: count in `slot` of the counters the supervisor created, or
        `TeamsChanged` if this worker's configuration has other teams."""
        started = json.loads((folder / TEAMS_FILE).read_text(encoding="utf-8"))
        if started != list(teams):
            raise TeamsChanged(
                f"the teams are {', '.join(teams)} in the file now, but were "
                f"{', '.join(started)} when the service started; restart the "
                "service to change them"
            )
        return cls(limits, teams, SharedCounters(folder / COUNTERS_FILE, 1 + len(teams)), slot)

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
