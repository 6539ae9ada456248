"""Where hard-budget holds live: the `HoldStore` strategy, and its in-process form.

A store reads a team's standings, lets the guard's `Admit` decide, and records the holds it
returns, all in one atomic step, so no concurrent call can slip between check and hold.
`LocalHolds` keeps them in this process (the step has no ``await``, so it is atomic on the event
loop); `proxy.budgets.ledger_holds.LedgerHolds` keeps them in the shared SQLite ledger for
``serve --workers N``; `proxy.budgets.pg_holds.PostgresHolds` in a PostgreSQL ledger shared by
replicas.

A live reload (`proxy.reload`) builds a new guard around the same store, so the holds of
running calls outlive it, and the budgets a team's calls bring may differ from one call to the
next. The ledger stores keep holds and spend as rows per team, currency and day, and read them
against the budgets each call brings, so a changed budget applies to the next call as it is;
`LocalHolds` keeps running sums and says how it follows the changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Protocol

from proxy.budgets.decide import BudgetUnavailable, Standing
from proxy.config import Budget
from proxy.formats import ZERO
from proxy.ledger.store import SpendReader
from proxy.periods import PERIODS, Period, period_start

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

    async def held(
        self, team: str, starts: Mapping[Period, date]
    ) -> dict[Period, dict[str, Decimal]]:
        """What the team's holds amount to per currency, for each period by its start, as a
        check of that period counts them (the spend API, `proxy.spend`); one read. Raises
        `BudgetUnavailable` if they cannot be read."""
        ...

    def configure(self, budgets: Sequence[Budget]) -> None:
        """Learn the hard budgets of a new `BudgetGuard` (each one built tells its store, at
        start-up and on every reload), before any call is checked against them. The holds
        of running calls are kept whatever changed."""
        ...

    async def open(self) -> None:
        """Connect, at start-up on the serving loop (the holds' connections live there)."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _State:
    """One period's spend in one currency for a team: read from the ledger when the period
    begins (or the budget is new), then kept current by settled calls."""

    start: date | None = None
    spent: Decimal = ZERO


@dataclass(slots=True)
class _Team:
    """A team's spend per (period, currency) and what its running calls hold per currency.

    States are keyed by period and currency, not by `Budget`: a reload that changes a
    budget's amount finds the same state, so the new amount applies to the next call with
    spend and holds kept. The budget itself always comes from the call, so a call admitted
    under the old configuration is checked against the amounts it started with. Holds are
    pooled per currency rather than kept per budget: every budget of the team in a currency
    counts every running call held in it, so a budget added by a reload counts the calls
    that were already running, and a removed one leaves nothing to unwind.
    """

    states: dict[tuple[Period, str], _State] = field(default_factory=dict)
    reserved: dict[str, Decimal] = field(default_factory=dict)


@dataclass(slots=True)
class _Held:
    """What one running call holds: its team, the starts of the periods containing the
    billing day it was admitted on, and the amount per currency. Built per call, so plain
    rather than frozen (a frozen dataclass's ``__init__`` costs several times a plain one's)."""

    team: _Team
    starts: Mapping[Period, date]
    amounts: Mapping[str, Decimal]


HELD_UNREADABLE = "the budget holds of running calls cannot be read; try again shortly"


def held_by_period(
    rows: Iterable[tuple[date, str, Decimal]], starts: Mapping[Period, date]
) -> dict[Period, dict[str, Decimal]]:
    """Holds summed per period and currency from rows of (day, currency, amount), each period
    counting the holds of its days from its start on, as the ledger stores' checks do."""
    held: dict[Period, dict[str, Decimal]] = {period: {} for period in starts}
    for day, currency, amount in rows:
        for period, start in starts.items():
            if day >= start:
                sums = held[period]
                sums[currency] = sums.get(currency, ZERO) + amount
    return held


class LocalHolds:
    """Holds of one process, with spend read from the ledger when a period begins (and at
    start-up, and for a budget a reload added), then kept current by settled calls.

    Live reloads (`proxy.reload`) build a new `BudgetGuard` around this same store, so the
    holds of running calls survive them; the budgets a team's calls bring may then change
    from one call to the next, and even go back while calls admitted under the old
    configuration are still being checked. Every change is handled where it is met:

    - an amount changed: the state keyed by the budget's period and currency is kept, so the
      next call is checked against the new amount with the spend and holds as they are;
    - a budget added, or its period or currency changed: a new state, its spend read from the
      ledger as at a period start, its holds the team's pool in that currency (which counts
      the calls still running);
    - a budget removed: its state is no longer consulted, and keeps counting settled calls,
      so it is still right if the budget comes back while the team had other hard budgets.

    A settled call gives back exactly what it held to its team's pool (never negative, never
    left behind), and adds its cost to every state of the team in that currency whose period
    is the one it was admitted in. That last rule needs every call of the team to pass
    through this store, which holds only while the team has a hard budget: calls of a team
    without one are not held or settled here (`BudgetGuard.applies`). So when a team gains or
    loses all its hard budgets (`configure`), its states are dropped and read again from the
    ledger when next needed; the holds of its running calls stay pooled.

    Two kinds of spend reach a state late, through its next ledger read (the next period, or
    the next time the team gains its hard budgets anew), and can pass a budget by what they
    cost: calls that ended in the ledger writer's last ``flush_interval`` (0.1 s by default)
    before the read, at a period start as for a budget a reload added; and calls admitted
    without a hold because their team had no hard budget when they started, still running
    when a reload gave it one. The ledger stores have neither gap: they read the ledger's
    spend at every check.
    """

    def __init__(self, spend: SpendReader | None) -> None:
        self._spend = spend
        self._teams: dict[str, _Team] = {}
        self._budgeted: frozenset[str] = frozenset()
        self._held: dict[str, _Held] = {}
        self._day: date | None = None
        self._day_starts: dict[Period, date] = {}

    def configure(self, budgets: Sequence[Budget]) -> None:
        """The hard budgets a new guard enforces: teams that gained or lost every hard budget
        since the last guard read their spend again when next checked (see the class). Safe
        whichever guard then serves: a guard built for a reload that was refused later, or
        calls still checked by the old one, cost at most a ledger read per team and period."""
        budgeted = frozenset(budget.team for budget in budgets)
        for name in budgeted ^ self._budgeted:
            team = self._teams.get(name)
            if team is not None:
                team.states.clear()
        self._budgeted = budgeted

    async def hold(
        self, team: str, request_id: str, day: date, budgets: Sequence[Budget], admit: Admit
    ) -> int | None:
        account = self._teams.get(team)
        if account is None:
            account = self._teams[team] = _Team()
        starts = self._starts(day)
        standings = [
            self._standing(account, budget, starts[budget.period], day) for budget in budgets
        ]
        amounts, lowered = admit(standings)
        reserved = account.reserved  # no await since the checks: the reservation is atomic
        for currency, amount in amounts.items():
            reserved[currency] = reserved.get(currency, ZERO) + amount
        self._held[request_id] = _Held(account, starts, amounts)
        return lowered

    async def settle(self, request_id: str, costs: Mapping[str, Decimal] | None) -> None:
        held = self._held.pop(request_id, None)
        if held is None:
            return
        account = held.team
        for currency, amount in held.amounts.items():
            account.reserved[currency] -= amount
        if costs is None:
            return
        # A call without a known cost adds nothing, as in the ledger, which the workers'
        # store and every restart read (see `proxy.budgets`).
        for (period, currency), state in account.states.items():
            cost = costs.get(currency)
            if cost is not None and state.start == held.starts[period]:
                state.spent += cost

    async def held(
        self, team: str, starts: Mapping[Period, date]
    ) -> dict[Period, dict[str, Decimal]]:
        """The team's pool per currency for every period: a check counts every running call
        of the team, whichever period it was admitted in."""
        account = self._teams.get(team)
        reserved = dict(account.reserved) if account is not None else {}
        return {period: dict(reserved) for period in starts}

    async def open(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release: the holds die with the process."""

    def _starts(self, day: date) -> dict[Period, date]:
        """The start of every period containing `day`, worked out once per billing day (the
        week's costs as much as the rest of a check) and kept by each call's `_Held`."""
        if day != self._day:
            self._day, self._day_starts = day, {p: period_start(day, p) for p in PERIODS}
        return self._day_starts

    def _standing(self, account: _Team, budget: Budget, start: date, day: date) -> Standing:
        """The budget's standing in its period beginning at `start`, its spend read from the
        ledger when a new period begins (and at start-up, and when the budget is new)."""
        key = (budget.period, budget.currency)
        state = account.states.get(key)
        if state is None:
            state = account.states[key] = _State()
        if state.start != start:
            self._roll(state, budget, start, day)
        return Standing(budget, start, state.spent, account.reserved.get(budget.currency, ZERO))

    def _roll(self, state: _State, budget: Budget, start: date, day: date) -> None:
        try:
            rows = self._spend(start, day) if self._spend is not None else []
        except Exception as exc:
            log.exception("cannot read spend for budgets")
            raise BudgetUnavailable() from exc
        state.spent = sum(
            (r.amount for r in rows if r.team == budget.team and r.currency == budget.currency),
            ZERO,
        )
        state.start = start
