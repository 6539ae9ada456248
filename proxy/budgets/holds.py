"""Where hard-budget holds live: the `HoldStore` strategy, and its in-process form.

A store reads a team's standings, lets the guard's `Admit` decide, and records the holds it
returns, all in one atomic step, so no concurrent call can slip between check and hold.
`LocalHolds` keeps them in this process (the step has no ``await``, so it is atomic on the event
loop); `proxy.budgets.ledger_holds.LedgerHolds` keeps them in the shared SQLite ledger for
``serve --workers N``; `proxy.budgets.pg_holds.PostgresHolds` in a PostgreSQL ledger shared by
replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Protocol

from proxy.budgets.decide import BudgetUnavailable, Standing
from proxy.config import Budget
from proxy.formats import ZERO
from proxy.ledger.store import SpendReader
from proxy.periods import period_start

log = logging.getLogger("proxy.budgets")


class Admit(Protocol):
    """Decides on a call from its team's standings: the amount to hold per currency and the
    lowered ``max_tokens`` (or None), or raises `BudgetExceeded` (`proxy.budgets.decide.decide`).
    """

    @property
    def worst(self) -> Mapping[str, Decimal]:
        """The call's worst case per currency: what it holds when every budget has room for
        it (a store may check that itself first, `proxy.budgets.pg_holds`)."""
        ...

    def __call__(self, standings: Sequence[Standing]) -> tuple[dict[str, Decimal], int | None]: ...


class HoldStore(Protocol):
    """Storage of hard-budget holds (in process, shared SQLite ledger, PostgreSQL)."""

    async def hold(
        self, team: str, request_id: str, day: date, budgets: Sequence[Budget], admit: Admit
    ) -> int | None:
        """Read `budgets`' standings on `day`, decide with `admit`, record its holds; one atomic
        step. Returns the lowered ``max_tokens`` (or None); raises `BudgetExceeded` (refused) or
        `BudgetUnavailable` (the state cannot be read)."""
        ...

    async def settle(self, request_id: str, costs: Mapping[str, Decimal] | None) -> None:
        """Replace a call's holds by its real cost (None: nothing billable, drop them)."""
        ...

    async def open(self) -> None:
        """Connect, at start-up on the serving loop (the holds' connections live there)."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _State:
    budget: Budget
    start: date | None = None
    spent: Decimal = ZERO
    reserved: Decimal = ZERO


class LocalHolds:
    """Holds of one process, with spend read from the ledger when a period begins (and at
    start-up), then kept current by settled calls."""

    def __init__(self, spend: SpendReader | None) -> None:
        self._spend = spend
        self._states: dict[str, list[_State]] = {}
        self._held: dict[str, list[tuple[_State, date, Decimal]]] = {}

    async def hold(
        self, team: str, request_id: str, day: date, budgets: Sequence[Budget], admit: Admit
    ) -> int | None:
        states = self._states.get(team)
        if states is None:
            states = self._states[team] = [_State(budget) for budget in budgets]
        standings = [self._standing(state, day) for state in states]
        holds, lowered = admit(standings)
        held = self._held[request_id] = []
        for state in states:  # no await since the checks: the reservation is atomic
            amount = holds[state.budget.currency]
            state.reserved += amount
            assert state.start is not None
            held.append((state, state.start, amount))
        return lowered

    async def settle(self, request_id: str, costs: Mapping[str, Decimal] | None) -> None:
        for state, start, held in self._held.pop(request_id, ()):
            state.reserved -= held
            if state.start == start and costs is not None:
                # A call without a known cost adds nothing, as in the ledger, which the
                # workers' store and every restart read (see `proxy.budgets`).
                state.spent += costs.get(state.budget.currency, ZERO)

    async def open(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release: the holds die with the process."""

    def _standing(self, state: _State, day: date) -> Standing:
        """The budget's standing on `day`, its spend read from the ledger when a new period
        begins (and at start-up)."""
        start = period_start(day, state.budget.period)
        if state.start != start:
            self._roll(state, start, day)
        return Standing(state.budget, start, state.spent, state.reserved)

    def _roll(self, state: _State, start: date, day: date) -> None:
        try:
            rows = self._spend(start, day) if self._spend is not None else []
        except Exception as exc:
            log.exception("cannot read spend for budgets")
            raise BudgetUnavailable() from exc
        state.spent = sum(
            (
                r.amount
                for r in rows
                if r.team == state.budget.team and r.currency == state.budget.currency
            ),
            ZERO,
        )
        state.start = start
