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
be bounded and are refused for teams with a hard budget.

Spend comes from the ledger when a period starts (and at start-up), then from settled calls; if
the ledger cannot be read, calls of teams with hard budgets are refused (fail closed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from proxy.config import Budget
from proxy.errors import ProxyError
from proxy.ledger.store import SpendRow
from proxy.metering import request_text
from proxy.periods import period_end, period_start
from proxy.pricing import PriceBook
from proxy.pricing.engine import resolve, to_micros

log = logging.getLogger("proxy.budgets")

SpendReader = Callable[[date, date], Sequence[SpendRow]]
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

    def reserve(self, team: str, payload: Mapping[str, Any], now: datetime) -> Reservation:
        """Admit the call (returning its reservation) or raise `BudgetExceeded` (402)."""
        reservation = Reservation(team)
        states = self._hard.get(team)
        if not states:
            return reservation
        day = now.astimezone(self._tz).date()
        worst: dict[str, Decimal] = {}
        for state in states:
            self._roll(state, day)
            currency = state.budget.currency
            if currency not in worst:
                worst[currency] = self.worst_case(payload, currency, now)
            if state.spent + state.reserved + worst[currency] > state.budget.amount:
                raise self._refusal(state, worst[currency])
        for state in states:  # no await since the checks: the reservation is atomic
            amount = worst[state.budget.currency]
            state.reserved += amount
            assert state.start is not None
            reservation.holds.append((state, state.start, amount))
        return reservation

    def settle(self, reservation: Reservation, costs: Mapping[str, Decimal] | None) -> None:
        """Replace the held amounts by the call's real cost (None: nothing billable)."""
        for state, start, held in reservation.holds:
            state.reserved -= held
            if state.start == start and costs is not None:
                # A call without a known cost (usage lost) keeps what was held for it.
                state.spent += costs.get(state.budget.currency, held)
        reservation.holds.clear()

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

    def snapshot(self, now: datetime) -> list[tuple[Budget, Decimal, Decimal]]:
        """(budget, spent, reserved) of every hard budget, for metrics and tests."""
        day = now.astimezone(self._tz).date()
        result = []
        for states in self._hard.values():
            for state in states:
                self._roll(state, day)
                result.append((state.budget, state.spent, state.reserved))
        return result

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

    def _refusal(self, state: _State, worst: Decimal) -> BudgetExceeded:
        budget = state.budget
        assert state.start is not None
        resets = datetime.combine(period_end(state.start, budget.period), datetime.min.time(),
                                  self._tz)
        details = {"team": budget.team, "period": budget.period, "currency": budget.currency,
                   "budget": str(budget.amount), "spent": str(state.spent),
                   "reserved": str(state.reserved), "call_worst_case": str(worst),
                   "resets_at": resets.isoformat()}
        return BudgetExceeded(
            f"team {budget.team!r} has spent {state.spent} {budget.currency} of its "
            f"{budget.amount} {budget.currency} {budget.period} budget "
            f"({state.reserved} {budget.currency} held by running calls; this call could cost "
            f"up to {worst}); the budget resets at {resets.isoformat()}", details)
