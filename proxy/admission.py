"""Admission control: bounded concurrency, globally and per team, refused fast.

DeepSeek limits concurrency per account, across all keys, so one team's burst could take the
whole account's allowance and starve every other team. Calls beyond `limits.max_inflight` (all
teams) or `limits.max_inflight_per_team` are refused at once with 503 and ``Retry-After``
instead of waiting in an unbounded queue; so are new calls while the proxy is draining for a
shutdown. Counting is synchronous on the event loop, so the limits are exact.
"""

from __future__ import annotations

import asyncio

from proxy.config import Limits
from proxy.errors import Draining, Overloaded


class Admission:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._total = 0
        self._by_team: dict[str, int] = {}
        self.draining = False
        self._idle: asyncio.Event | None = None

    def enter(self, team: str) -> None:
        """Count a call in, or raise `Overloaded` (503)."""
        if self.draining:
            raise Draining("the proxy is shutting down; retry on another instance")
        in_team = self._by_team.get(team, 0)
        if self._total >= self._limits.max_inflight:
            raise Overloaded(f"the proxy has {self._total} calls in progress, its limit; "
                             "retry shortly")
        if in_team >= self._limits.max_inflight_per_team:
            raise Overloaded(f"team {team!r} has {in_team} calls in progress, its limit; "
                             "retry shortly")
        self._total += 1
        self._by_team[team] = in_team + 1

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
