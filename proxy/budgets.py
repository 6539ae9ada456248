"""Hard budgets, enforced before a call is dispatched.

A call is admitted only if what its team has spent in the period, plus what the calls already
running may still cost (their holds), plus this call's worst case stays within every hard
budget of the team. Check and hold happen in one step (synchronously on the event loop here; in
one ledger transaction across worker processes), so no concurrent request can slip between
them, the race that lets other gateways' budgets be overrun. When the call ends its hold is
settled to the real cost; a call that never reached DeepSeek, or that DeepSeek refused,
releases it.

Worst case of a call (`CallSize`, from `proxy.bounds`): its prompt bound, all of it at the
cache-miss price, plus its output bound (``max_tokens``, else DeepSeek's maximum output) at the
output price, at the dearest tier of the price version in force. So token costs never pass a
hard budget by a call that makes no server-side tool calls. The overshoot bound is what the
worst case cannot see: server-side tool fees of the calls running when the budget runs out
(0.005 CNY per search or fetch), the tokens those tool calls feed back into the model (trusted
up to `proxy.metering`'s bounds), and, only if a price change takes effect during a call, the
difference to the new price. A crash (``kill -9`` of the proxy or of one worker) ends its
running calls as ``interrupted`` with unknown usage, which adds nothing to the spend: each
crash can pass a budget by at most the worst cases of the calls it cut.

A call without ``max_tokens`` reserves DeepSeek's maximum output (393,216 tokens; 10.6 CNY at
deepseek-v4-pro's peak price), so a budget refuses calls long before it is spent when many run
at once. Two team settings keep the promise and the throughput (`proxy.config.TeamPolicy`):

- ``default_max_tokens`` is written into requests that set none, so the worst case is what the
  call can really cost;
- ``over_budget: lower_max_tokens`` admits a call that no longer fits with ``max_tokens``
  lowered to what every budget can still pay for (the reply then ends with
  ``finish_reason: length`` where DeepSeek stops), as long as that leaves at least
  `MIN_LOWERED_OUTPUT` tokens (or the call's own smaller limit); below that it is refused.

Either way the bound above holds: the lowered limit is part of the worst case reserved.

Calls to a model the price book cannot price cannot be bounded: for a team with a hard budget
they are refused with 403 (`ModelNotPriced`). A call whose usage was lost counts at its
estimate (`proxy.metering`: never above what was held, though DeepSeek may bill it more, as it
may bill a call a crash cut); one whose cost is unknown altogether (nothing to estimate from)
counts nothing, here as in the ledger (it is counted by ``llm_usage_missing_total`` and
alerted as ``UsageMissing``). Spend comes from the ledger when a period starts (and at
start-up), then from settled calls; if the ledger cannot be read, calls of teams with
hard budgets are refused (fail closed, 503).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from proxy.config import DEFAULT_POLICY, Budget, TeamPolicy
from proxy.errors import ModelNotPriced, ProxyError
from proxy.formats import ZERO as _ZERO
from proxy.formats import decimal_text as money
from proxy.ledger.connection import Transaction, connect
from proxy.ledger.store import SpendReader
from proxy.periods import period_end, period_start
from proxy.pricing import PriceBook
from proxy.pricing.engine import resolve, to_micros
from proxy.pricing.model import RateCard

log = logging.getLogger("proxy.budgets")

MIN_LOWERED_OUTPUT = 256
"""The fewest output tokens worth lowering a call to: below this a reply is mostly cut off
(a thinking model spends hundreds on reasoning alone), so the call is refused instead."""
_MILLION = Decimal(1_000_000)


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
class CallSize:
    """The most a call can be billed, in tokens (`proxy.bounds`). Built per call, so plain
    rather than frozen: a frozen dataclass's ``__init__`` costs several times a plain one's."""

    prompt: int
    output: int


@dataclass(frozen=True, slots=True)
class Standing:
    """One hard budget at the moment of a check."""

    budget: Budget
    start: date
    spent: Decimal
    held: Decimal


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
    max_tokens: int | None = None
    """The lowered ``max_tokens`` the call must be sent with (``lower_max_tokens``), or None."""


def worst_cost(prompt: int, output: int, tiers: Sequence[RateCard], currency: str) -> Decimal:
    """Every prompt token a cache miss and every output token billed, at the dearest tier."""
    return max(
        (rates[currency].cache_miss * prompt + rates[currency].output * output).scaleb(-6)
        for rates in tiers
    )


def affordable_output(
    left: Decimal, prompt: int, tiers: Sequence[RateCard], currency: str, wanted: int
) -> int:
    """The most output tokens (at most `wanted`) a call with this prompt can have while its
    worst case stays within `left`; -1 if even its prompt does not fit."""
    most = wanted
    for rates in tiers:
        room = left * _MILLION - rates[currency].cache_miss * prompt
        if room < 0:
            return -1
        output_rate = rates[currency].output
        if output_rate > 0:
            most = min(most, int((room / output_rate).to_integral_value(ROUND_FLOOR)))
    return most


def decide(
    standings: Sequence[Standing],
    size: CallSize,
    tiers: Sequence[RateCard],
    policy: TeamPolicy,
    refusal: _Refusal,
) -> tuple[dict[str, Decimal], int | None]:
    """Admit a call against its team's hard budgets, or raise `BudgetExceeded`.

    Returns the amount to hold per currency and, when the call fits only with fewer output
    tokens (``lower_max_tokens``), the lowered ``max_tokens``. Pure: both guards call it
    with the standings they read, inside their atomic step.
    """
    currencies = {s.budget.currency for s in standings}
    worst = {c: worst_cost(size.prompt, size.output, tiers, c) for c in currencies}
    over = [s for s in standings if s.spent + s.held + worst[s.budget.currency] > s.budget.amount]
    if not over:
        return worst, None
    if policy.over_budget != "lower_max_tokens":
        raise refusal(over[0], worst[over[0].budget.currency], None)
    output = min(
        affordable_output(
            s.budget.amount - s.spent - s.held, size.prompt, tiers, s.budget.currency, size.output
        )
        for s in standings
    )
    if output < min(size.output, MIN_LOWERED_OUTPUT):
        raise refusal(over[0], worst[over[0].budget.currency], output)
    return {c: worst_cost(size.prompt, output, tiers, c) for c in currencies}, output


class _Refusal:
    """Builds the 402 for a budget that a call does not fit in (every amount with its
    currency, and when the budget resets)."""

    def __init__(self, timezone: ZoneInfo) -> None:
        self._tz = timezone

    def __call__(self, standing: Standing, worst: Decimal, lowest: int | None) -> BudgetExceeded:
        budget = standing.budget
        currency = budget.currency
        resets = datetime.combine(
            period_end(standing.start, budget.period), datetime.min.time(), self._tz
        )
        details = {
            "team": budget.team,
            "period": budget.period,
            "currency": currency,
            "budget": str(budget.amount),
            "spent": str(standing.spent),
            "reserved": str(standing.held),
            "call_worst_case": str(worst),
            "resets_at": resets.isoformat(),
        }
        lowered = ""
        if lowest is not None:
            lowered = (
                f"; lowering max_tokens would leave it "
                f"{max(lowest, 0)} output tokens, fewer than the "
                f"{MIN_LOWERED_OUTPUT} worth sending"
            )
        return BudgetExceeded(
            f"team {budget.team!r} has spent {standing.spent} {currency} of its "
            f"{budget.amount} {currency} {budget.period} budget ({standing.held} {currency} "
            f"held by running calls; this call could cost up to {worst} {currency}{lowered}); "
            f"the budget resets at {resets.isoformat()}",
            details,
        )


class BudgetGuard:
    """Hold-before-dispatch for the hard budgets of one process."""

    def __init__(
        self,
        budgets: Sequence[Budget],
        book: PriceBook,
        spend: SpendReader | None,
        timezone: ZoneInfo,
        policies: Mapping[str, TeamPolicy] | None = None,
    ) -> None:
        self._book = book
        self._spend = spend
        self._tz = timezone
        self._policies = dict(policies or {})
        self._refusal = _Refusal(timezone)
        self._hard: dict[str, list[_State]] = {}
        for budget in budgets:
            if budget.hard:
                self._hard.setdefault(budget.team, []).append(_State(budget))

    def applies(self, team: str) -> bool:
        """Whether the team has a hard budget (the request path skips the guard otherwise)."""
        return team in self._hard

    def tiers(self, model: str, now: datetime) -> list[RateCard]:
        """The rate cards a call of `model` may be billed at now; 403 if it has no price."""
        resolution = resolve(self._book, model, to_micros(now))
        if isinstance(resolution, str):
            raise ModelNotPriced(
                f"model {model!r} has no price ({resolution}); a team with a hard budget can "
                "only call models the price book prices"
            )
        return list(resolution.version.tiers.values())

    async def reserve(
        self, team: str, request_id: str, model: str, size: CallSize, now: datetime
    ) -> Reservation:
        """Admit the call (returning its reservation) or raise (402, 403, 503)."""
        reservation = Reservation(team, request_id)
        states = self._hard.get(team)
        if not states:
            return reservation
        tiers = self.tiers(model, now)
        day = now.astimezone(self._tz).date()
        standings = [self._standing(state, day) for state in states]
        holds, lowered = decide(
            standings, size, tiers, self._policies.get(team, DEFAULT_POLICY), self._refusal
        )
        for state in states:  # no await since the checks: the reservation is atomic
            amount = holds[state.budget.currency]
            state.reserved += amount
            assert state.start is not None
            reservation.holds.append((state, state.start, amount))
        reservation.max_tokens = lowered
        return reservation

    async def settle(self, reservation: Reservation, costs: Mapping[str, Decimal] | None) -> None:
        """Replace the held amounts by the call's real cost (None: nothing billable)."""
        for state, start, held in reservation.holds:
            state.reserved -= held
            if state.start == start and costs is not None:
                # A call without a known cost adds nothing, as in the ledger, which the
                # workers' guard and every restart read (see the module docstring).
                state.spent += costs.get(state.budget.currency, _ZERO)
        reservation.holds.clear()

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
            raise BudgetUnavailable(
                "budget state cannot be read; calls of teams with hard "
                "budgets are refused until it can"
            ) from exc
        state.spent = sum(
            (
                r.amount
                for r in rows
                if r.team == state.budget.team and r.currency == state.budget.currency
            ),
            _ZERO,
        )
        state.start = start


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

    def __init__(
        self,
        budgets: Sequence[Budget],
        book: PriceBook,
        ledger: Path,
        timezone: ZoneInfo,
        policies: Mapping[str, TeamPolicy] | None = None,
        *,
        owner: str | None = None,
    ) -> None:
        super().__init__(budgets, book, None, timezone, policies)
        self._owner = owner
        self._conn = connect(ledger)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="budgets")

    def close(self) -> None:
        self._executor.shutdown()
        self._conn.close()

    async def reserve(
        self, team: str, request_id: str, model: str, size: CallSize, now: datetime
    ) -> Reservation:
        reservation = Reservation(team, request_id)
        states = self._hard.get(team)
        if not states:
            return reservation
        tiers = self.tiers(model, now)
        day = now.astimezone(self._tz).date()
        policy = self._policies.get(team, DEFAULT_POLICY)
        loop = asyncio.get_running_loop()
        try:
            reservation.max_tokens = await loop.run_in_executor(
                self._executor,
                self._hold,
                team,
                request_id,
                day,
                [s.budget for s in states],
                size,
                tiers,
                policy,
            )
        except sqlite3.Error as exc:
            log.exception("cannot read or write budget holds")
            raise BudgetUnavailable(
                "budget state cannot be read; calls of teams with hard "
                "budgets are refused until it can"
            ) from exc
        return reservation

    def _hold(
        self,
        team: str,
        request_id: str,
        day: date,
        budgets: Sequence[Budget],
        size: CallSize,
        tiers: Sequence[RateCard],
        policy: TeamPolicy,
    ) -> int | None:
        with Transaction(self._conn) as conn:
            standings = []
            for budget in budgets:
                start = period_start(day, budget.period)
                spent = _decimal(
                    conn.execute(
                        "SELECT decimal_sum(amount) FROM spend_daily WHERE team = ? AND "
                        "currency = ? AND day BETWEEN ? AND ?",
                        (team, budget.currency, start.isoformat(), day.isoformat()),
                    ).fetchone()
                )
                held = _decimal(
                    conn.execute(
                        "SELECT decimal_sum(amount) FROM budget_holds WHERE team = ? AND "
                        "currency = ? AND day >= ?",
                        (team, budget.currency, start.isoformat()),
                    ).fetchone()
                )
                standings.append(Standing(budget, start, spent, held))
            holds, lowered = decide(standings, size, tiers, policy, self._refusal)
            conn.executemany(
                "INSERT INTO budget_holds (request_id, team, currency, day, "
                "amount, owner) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (request_id, team, currency, day.isoformat(), money(amount), self._owner)
                    for currency, amount in holds.items()
                ],
            )
        return lowered

    async def settle(self, reservation: Reservation, costs: Mapping[str, Decimal] | None) -> None:
        if reservation.team not in self._hard:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._settle, reservation.request_id, costs)
        except sqlite3.Error:
            log.exception("cannot settle budget hold of %s", reservation.request_id)

    def _settle(self, request_id: str, costs: Mapping[str, Decimal] | None) -> None:
        with Transaction(self._conn) as conn:
            if costs is None:
                conn.execute("DELETE FROM budget_holds WHERE request_id = ?", (request_id,))
                return
            conn.executemany(
                "UPDATE budget_holds SET amount = ? WHERE request_id = ? AND currency = ?",
                [(money(amount), request_id, currency) for currency, amount in costs.items()],
            )


def _decimal(row: tuple[str | None] | None) -> Decimal:
    return Decimal(row[0]) if row and row[0] is not None else _ZERO
