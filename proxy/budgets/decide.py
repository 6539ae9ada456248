"""The pure decisions of hard budgets: a call's worst case, and whether it fits (`decide`).

No clock, no I/O: each hold store (`proxy.budgets.holds`) reads the standings and calls `decide`
inside its own atomic step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_FLOOR, Decimal
from zoneinfo import ZoneInfo

from proxy.config import Budget, TeamPolicy
from proxy.errors import ProxyError
from proxy.formats import decimal_text
from proxy.periods import period_end
from proxy.pricing.model import RateCard

MIN_LOWERED_OUTPUT = 256
"""The fewest output tokens worth lowering a call to: below this a reply is mostly cut off
(a thinking model spends hundreds on reasoning alone), so the call is refused instead."""
_MILLION = Decimal(1_000_000)
UNREADABLE = (
    "budget state cannot be read; calls of teams with hard budgets are refused until it can"
)


class BudgetExceeded(ProxyError):
    status = 402
    error_type = "insufficient_quota"
    code = "budget_exceeded"
    retry = False

    def __init__(self, message: str, details: Mapping[str, str]) -> None:
        super().__init__(message)
        self.details = {"budget": dict(details)}


class BudgetUnavailable(ProxyError):
    """The budget state cannot be read or held (a SQLite ledger that cannot be read, a
    PostgreSQL server away): the call is refused before anything reaches DeepSeek (fail
    closed), so a retry is safe; ``Retry-After`` says when one is worth it."""

    status = 503
    error_type = "server_error"
    code = "budget_unavailable"
    retry_after = 5

    def __init__(self, message: str = UNREADABLE) -> None:
        super().__init__(message)


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


def remaining_text(standings: Sequence[Standing]) -> str:
    """What each hard budget had left when a call was admitted, before the call's own hold
    (amount - spent - held, negative once a budget is passed), as the
    ``x-proxy-budget-remaining`` header gives it: ``month=0.4921 CNY, day=0.02 CNY``."""
    return ", ".join(
        f"{s.budget.period}={decimal_text(s.budget.amount - s.spent - s.held)} {s.budget.currency}"
        for s in standings
    )


def worst_cost(prompt: int, output: int, cards: Sequence[RateCard], currency: str) -> Decimal:
    """Every prompt token a cache miss and every output token billed, at the dearest of the
    rate cards (one per tier)."""
    return max(
        (rates[currency].cache_miss * prompt + rates[currency].output * output).scaleb(-6)
        for rates in cards
    )


def affordable_output(
    left: Decimal, prompt: int, cards: Sequence[RateCard], currency: str, wanted: int
) -> int:
    """The most output tokens (at most `wanted`) a call with this prompt can have while its
    worst case stays within `left`; -1 if even its prompt does not fit."""
    most = wanted
    for rates in cards:
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
    cards: Sequence[RateCard],
    policy: TeamPolicy,
    refusal: Refusal,
) -> tuple[dict[str, Decimal], int | None]:
    """Admit a call against its team's hard budgets, or raise `BudgetExceeded`.

    Returns the amount to hold per currency and, when the call fits only with fewer output
    tokens (``lower_max_tokens``), the lowered ``max_tokens``. Pure: every hold store
    calls it with the standings it read, inside its atomic step.
    """
    currencies = {s.budget.currency for s in standings}
    worst = {c: worst_cost(size.prompt, size.output, cards, c) for c in currencies}
    over = [s for s in standings if s.spent + s.held + worst[s.budget.currency] > s.budget.amount]
    if not over:
        return worst, None
    if policy.over_budget != "lower_max_tokens":
        raise refusal(over[0], worst[over[0].budget.currency], None)
    output = min(
        affordable_output(
            s.budget.amount - s.spent - s.held, size.prompt, cards, s.budget.currency, size.output
        )
        for s in standings
    )
    if output < min(size.output, MIN_LOWERED_OUTPUT):
        raise refusal(over[0], worst[over[0].budget.currency], output)
    return {c: worst_cost(size.prompt, output, cards, c) for c in currencies}, output


class Refusal:
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
