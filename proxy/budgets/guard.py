"""The budget guard: admits a call against its team's hard budgets before dispatch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from proxy.budgets.decide import (
    CallSize,
    Refusal,
    Standing,
    decide,
    remaining_text,
    worst_cost,
)
from proxy.budgets.holds import HoldStore
from proxy.config import DEFAULT_POLICY, Budget, TeamPolicy
from proxy.errors import ModelNotPriced
from proxy.periods import Period
from proxy.pricing import Pricer
from proxy.pricing.model import RateCard


@dataclass(slots=True)
class Reservation:
    """What was held for one call, to settle when it ends."""

    team: str
    request_id: str
    held: bool = False
    """Whether the store holds amounts for the call (False once settled)."""
    max_tokens: int | None = None
    """The lowered ``max_tokens`` the call must be sent with (``lower_max_tokens``), or None."""
    remaining: str | None = None
    """``x-proxy-budget-remaining`` for the call's answer (`remaining_text`), or None when
    ``headers.budget_remaining`` is off."""


class _Admit:
    """The guard's decision for one call (`proxy.budgets.holds.Admit`)."""

    __slots__ = ("_cards", "_policy", "_refusal", "_size", "standings", "worst")

    def __init__(
        self,
        size: CallSize,
        cards: Sequence[RateCard],
        policy: TeamPolicy,
        refusal: Refusal,
        budgets: Sequence[Budget],
    ) -> None:
        self._size, self._cards, self._policy, self._refusal = size, cards, policy, refusal
        self.worst = {
            b.currency: worst_cost(size.prompt, size.output, cards, b.currency) for b in budgets
        }
        self.standings: Sequence[Standing] = ()
        """What the store read in its atomic step (the last read, if it decided twice)."""

    def __call__(self, standings: Sequence[Standing]) -> tuple[dict[str, Decimal], int | None]:
        self.standings = standings
        return decide(standings, self._size, self._cards, self._policy, self._refusal)


class BudgetGuard:
    """Hold-before-dispatch for hard budgets; `store` says where the holds live.

    A live reload builds a new guard with the new budgets, policies and prices around the
    store the running one uses: the holds of running calls are the store's, so they stay held
    and settle as they would have; the guard tells the store its hard budgets when built.

    With `remaining_header` (``headers.budget_remaining``) each reservation carries what every
    hard budget of the team had left when the call was admitted, for the answer's
    ``x-proxy-budget-remaining`` header: read from the standings the store's atomic step
    already read, so it costs no read of its own, only the text.
    """

    def __init__(
        self,
        budgets: Sequence[Budget],
        pricer: Pricer,
        store: HoldStore,
        timezone: ZoneInfo,
        policies: Mapping[str, TeamPolicy] | None = None,
        *,
        remaining_header: bool = False,
    ) -> None:
        self._pricer = pricer
        self._remaining_header = remaining_header
        self._store = store
        self._tz = timezone
        self._policies = dict(policies or {})
        self._refusal = Refusal(timezone)
        self._hard: dict[str, tuple[Budget, ...]] = {}
        for budget in budgets:
            if budget.hard:
                self._hard[budget.team] = (*self._hard.get(budget.team, ()), budget)
        store.configure([budget for budget in budgets if budget.hard])

    def applies(self, team: str) -> bool:
        """Whether the team has a hard budget (the request path skips the guard otherwise)."""
        return team in self._hard

    def rate_cards(self, model: str, now: datetime, endpoint: str = "") -> list[RateCard]:
        """The rate cards (one per tier) a call of `model` on `endpoint` may be billed at now;
        403 if it has no price."""
        resolution = self._pricer.resolve(model, now, endpoint)
        if isinstance(resolution, str):
            raise ModelNotPriced(
                f"model {model!r} has no price ({resolution}); a team with a hard budget can "
                "only call models the price book prices"
            )
        return list(resolution.version.rate_cards.values())

    async def reserve(
        self,
        team: str,
        request_id: str,
        model: str,
        size: CallSize,
        now: datetime,
        endpoint: str = "",
    ) -> Reservation:
        """Admit the call (returning its reservation) or raise (402, 403, 503)."""
        reservation = Reservation(team, request_id)
        budgets = self._hard.get(team)
        if not budgets:
            return reservation
        cards = self.rate_cards(model, now, endpoint)
        policy = self._policies.get(team, DEFAULT_POLICY)
        admit = _Admit(size, cards, policy, self._refusal, budgets)
        day = now.astimezone(self._tz).date()
        reservation.max_tokens = await self._store.hold(team, request_id, day, budgets, admit)
        reservation.held = True
        if self._remaining_header:
            reservation.remaining = remaining_text(admit.standings)
        return reservation

    async def settle(self, reservation: Reservation, costs: Mapping[str, Decimal] | None) -> None:
        """Replace the held amounts by the call's real cost (None: nothing billable)."""
        if reservation.held:
            reservation.held = False
            await self._store.settle(reservation.request_id, costs)

    async def held(
        self, team: str, starts: Mapping[Period, date]
    ) -> dict[Period, dict[str, Decimal]] | None:
        """What the team's running calls hold per currency, as a check of each period (by its
        start) counts it; None for a team without a hard budget, whose calls hold nothing
        (so what they may still add is not known). Raises `BudgetUnavailable`."""
        if team not in self._hard:
            return None
        return await self._store.held(team, starts)

    async def open(self) -> None:
        await self._store.open()

    async def close(self) -> None:
        await self._store.close()
