"""Hard budgets, enforced before a call is dispatched.

A call is admitted only if what its team has spent in the period, plus what the calls already
running may still cost (their reservations), plus this call's worst-case cost stays within the
budget. Check and reserve happen in one synchronous step on the event loop, so no concurrent
request can slip between them (the race that lets other gateways' budgets be overrun). When the
call ends its reservation is settled to the real cost; a call that never reached DeepSeek, or
that DeepSeek refused, releases it.

Worst case of a call: every prompt token a cache miss, with the prompt bounded by its UTF-8
bytes (a byte-level tokenizer never makes more tokens than bytes) plus 8 tokens per message,
and the output at `max_tokens` (else `limits.max_output_tokens`), at the dearest tier of the
price version in force. So a hard budget is never overshot by token costs. The overshoot bound
is what the reservation cannot see: server-side tool fees of the calls running at the moment
the budget runs out (0.005 CNY per search or fetch), plus, only in the rare case of a price
change during a call, the difference to the new price. Calls to a model without a price cannot
be bounded and are refused for teams with a hard budget. A crash (``kill -9`` of the proxy or
of one worker) ends its running calls as ``interrupted`` with unknown usage, which adds nothing
to the spend: each crash can pass a budget by at most the worst cases of the calls it cut.

Spend comes from the ledger when a period starts (and at start-up), then from settled calls; if
the ledger cannot be read, calls of teams with hard budgets are refused (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from proxy.config import Budget
from proxy.errors import ProxyError
from proxy.ledger.store import SpendReader, Transaction, connect, money
from proxy.metering import request_text
from proxy.periods import period_end, period_start
from proxy.pricing import PriceBook
from proxy.pricing.engine import resolve, to_micros

log = logging.getLogger("proxy.budgets")

_PER_MESSAGE_TOKENS = 8
_ZERO = Decimal(0)


class BudgetExceeded(ProxyError):
    status = 402
    error_type = "insufficient_quota"
    code = "budget_exceeded"
    retry = False

    def __init__(self, message: str, details: Mapping[str, str]) -> None:
        super().__init__(message)
        self.details = {"budget": dict(details)}


class BudgetUnavailable(ProxyError):
    status = 503
    error_type = "server_error"
    code = "budget_unavailable"
    retry = False


@dataclass(slots=True)
class _State:
    budget: Budget
    start: date | None = None
    spent: Decimal = _ZERO
    reserved: Decimal = _ZERO


@dataclass(slots=True)
class Reservation:
    """Amounts held for one call, per hard budget of its team."""

    team: str
    request_id: str
    holds: list[tuple[_State, date, Decimal]] = field(default_factory=list)


class BudgetGuard:
    """Reserve-before-dispatch for hard budgets; spend tracking for all budgets."""

    def __init__(self, budgets: Sequence[Budget], book: PriceBook, spend: SpendReader | None,
                 timezone: ZoneInfo, max_output_tokens: int) -> None:
        self._book = book
        self._spend = spend
        self._tz = timezone
        self._max_output = max_output_tokens
        self._hard: dict[str, list[_State]] = {}
        for budget in budgets:
            if budget.hard:
                self._hard.setdefault(budget.team, []).append(_State(budget))

    def applies(self, team: str) -> bool:
        """Whether the team has a hard budget (the request path skips the guard otherwise)."""
        return team in self._hard

    async def reserve(self, team: str, request_id: str, payload: Mapping[str, Any],
                      now: datetime) -> Reservation:
        """Admit the call (returning its reservation) or raise `BudgetExceeded` (402)."""
        reservation = Reservation(team, request_id)
        states = self._hard.get(team)
        if not states:
            return reservation
        day = now.astimezone(self._tz).date()
        worst = self._worst_cases(states, payload, now)
        for state in states:
            self._roll(state, day)
            currency = state.budget.currency
            if state.spent + state.reserved + worst[currency] > state.budget.amount:
                assert state.start is not None
                raise self._refusal(state.budget, state.start, state.spent, state.reserved,
                                    worst[currency])
        for state in states:  # no await since the checks: the reservation is atomic
            amount = worst[state.budget.currency]
            state.reserved += amount
            assert state.start is not None
            reservation.holds.append((state, state.start, amount))
        return reservation

    async def settle(self, reservation: Reservation, costs: Mapping[str, Decimal] | None
                     ) -> None:
        """Replace the held amounts by the call's real cost (None: nothing billable)."""
        for state, start, held in reservation.holds:
            state.reserved -= held
            if state.start == start and costs is not None:
                # A call without a known cost (usage lost) keeps what was held for it.
                state.spent += costs.get(state.budget.currency, held)
        reservation.holds.clear()

    def _worst_cases(self, states: Sequence[_State], payload: Mapping[str, Any],
                     now: datetime) -> dict[str, Decimal]:
        """The call's worst case in each currency its team's hard budgets are kept in."""
        return {state.budget.currency: self.worst_case(payload, state.budget.currency, now)
                for state in states}

    def worst_case(self, payload: Mapping[str, Any], currency: str, now: datetime) -> Decimal:
        model = payload.get("model")
        resolution = resolve(self._book, str(model), to_micros(now))
        if isinstance(resolution, str):
            raise BudgetExceeded(
                f"model {model!r} has no price ({resolution}); a team with a hard budget can "
                "only call priced models", {"model": str(model)})
        messages = payload.get("messages")
        count = len(messages) if isinstance(messages, list) else 1
        prompt = len(request_text(payload).encode("utf-8")) + _PER_MESSAGE_TOKENS * count
        max_tokens = payload.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
            output = min(max_tokens, self._max_output)
        else:
            output = self._max_output
        return max((rates[currency].cache_miss * prompt + rates[currency].output * output
                    ).scaleb(-6) for rates in resolution.version.tiers.values())

    def _roll(self, state: _State, day: date) -> None:
        """At start-up and when a new period begins, read the period's spend from the ledger."""
        start = period_start(day, state.budget.period)
        if state.start == start:
            return
        try:
            rows = self._spend(start, day) if self._spend is not None else []
        except Exception as exc:
            log.exception("cannot read spend for budgets")
            raise BudgetUnavailable("budget state cannot be read; calls of teams with hard "
                                    "budgets are refused until it can") from exc
        state.spent = sum((r.amount for r in rows if r.team == state.budget.team
                           and r.currency == state.budget.currency), _ZERO)
        state.start = start

    def _refusal(self, budget: Budget, start: date, spent: Decimal, reserved: Decimal,
                 worst: Decimal) -> BudgetExceeded:
        resets = datetime.combine(period_end(start, budget.period), datetime.min.time(),
                                  self._tz)
        details = {"team": budget.team, "period": budget.period, "currency": budget.currency,
                   "budget": str(budget.amount), "spent": str(spent),
                   "reserved": str(reserved), "call_worst_case": str(worst),
                   "resets_at": resets.isoformat()}
        return BudgetExceeded(
            f"team {budget.team!r} has spent {spent} {budget.currency} of its "
            f"{budget.amount} {budget.currency} {budget.period} budget "
            f"({reserved} {budget.currency} held by running calls; this call could cost "
            f"up to {worst}); the budget resets at {resets.isoformat()}", details)


class SharedBudgetGuard(BudgetGuard):
    """Hard budgets across worker processes (``serve --workers N``).

    Holds live in the ledger's ``budget_holds`` table: the check (ledger spend plus every
    worker's holds plus this call's worst case) and the new hold are one ``BEGIN IMMEDIATE``
    transaction, so workers cannot race past a budget either. A settled hold keeps the call's
    real cost until the ledger writer stores the call's record and drops the hold in the same
    transaction that adds the cost to the spend, so spend is never counted twice or not at
    all. SQLite work runs on one dedicated thread, off the event loop.

    Each hold carries `owner`, this worker's id: if the worker dies, its supervisor drops its
    holds at once (`proxy.ledger.store.release_owner`), so they stop refusing calls.
    """

    def __init__(self, budgets: Sequence[Budget], book: PriceBook, ledger: Path,
                 timezone: ZoneInfo, max_output_tokens: int, owner: str | None) -> None:
        super().__init__(budgets, book, None, timezone, max_output_tokens)
        self._owner = owner
        self._conn = connect(ledger)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="budgets")

    def close(self) -> None:
        self._executor.shutdown()
        self._conn.close()

    async def reserve(self, team: str, request_id: str, payload: Mapping[str, Any],
                      now: datetime) -> Reservation:
        reservation = Reservation(team, request_id)
        states = self._hard.get(team)
        if not states:
            return reservation
        worst = self._worst_cases(states, payload, now)
        day = now.astimezone(self._tz).date()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._hold, team, request_id, day,
                                       [s.budget for s in states], worst)
        except sqlite3.Error as exc:
            log.exception("cannot read or write budget holds")
            raise BudgetUnavailable("budget state cannot be read; calls of teams with hard "
                                    "budgets are refused until it can") from exc
        return reservation

    def _hold(self, team: str, request_id: str, day: date, budgets: Sequence[Budget],
              worst: Mapping[str, Decimal]) -> None:
        with Transaction(self._conn) as conn:
            for budget in budgets:
                start = period_start(day, budget.period)
                spent = _decimal(conn.execute(
                    "SELECT decimal_sum(amount) FROM spend_daily WHERE team = ? AND "
                    "currency = ? AND day BETWEEN ? AND ?",
                    (team, budget.currency, start.isoformat(), day.isoformat())).fetchone())
                held = _decimal(conn.execute(
                    "SELECT decimal_sum(amount) FROM budget_holds WHERE team = ? AND "
                    "currency = ? AND day >= ?",
                    (team, budget.currency, start.isoformat())).fetchone())
                if spent + held + worst[budget.currency] > budget.amount:
                    raise self._refusal(budget, start, spent, held, worst[budget.currency])
            conn.executemany("INSERT INTO budget_holds (request_id, team, currency, day, "
                             "amount, owner) VALUES (?, ?, ?, ?, ?, ?)",
                             [(request_id, team, currency, day.isoformat(), money(amount),
                               self._owner) for currency, amount in worst.items()])

    async def settle(self, reservation: Reservation, costs: Mapping[str, Decimal] | None
                     ) -> None:
        if reservation.team not in self._hard:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._settle, reservation.request_id,
                                       costs)
        except sqlite3.Error:
            log.exception("cannot settle budget hold of %s", reservation.request_id)

    def _settle(self, request_id: str, costs: Mapping[str, Decimal] | None) -> None:
        with Transaction(self._conn) as conn:
            if costs is None:
                conn.execute("DELETE FROM budget_holds WHERE request_id = ?", (request_id,))
                return
            conn.executemany(
                "UPDATE budget_holds SET amount = ? WHERE request_id = ? AND currency = ?",
                [(money(amount), request_id, currency) for currency, amount in costs.items()])


def _decimal(row: tuple[str | None] | None) -> Decimal:
    return Decimal(row[0]) if row and row[0] is not None else _ZERO
