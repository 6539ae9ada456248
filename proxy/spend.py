"""The spend API: a team's spend this day, week and month, and its budgets, as JSON.

``GET /v1/spend`` (also ``/spend``) with the team's own client key answers for that team only
(`proxy.app`): the key decides the team, nothing in the request can name another. The figures
are the ones ``python -m proxy report`` gives for the team over the same calendar periods in
the billing timezone, read from the ledger's daily sums (``spend_daily``, a range of its
primary key: a few rows, never a scan of ``usage``), so they are right after a restart and the
same from every worker and replica. What the team's running calls hold against its hard
budgets comes from where the holds live (`proxy.budgets.holds`): the process, the shared
SQLite ledger, or PostgreSQL.

Two reads, holds first: a call that ends between them (its hold dropped and its cost added
to the spend in one ledger transaction) is then counted twice for that instant, never missed,
so ``remaining`` errs low. With one process (holds in memory) a call that ended in the ledger
writer's last ``flush_interval`` is in neither figure until its record is committed.

Errors are OpenAI-shaped (`proxy.errors`): 401 without a known key, 503 with ``Retry-After``
while the ledger or the holds cannot be read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from proxy.config import Budget
from proxy.errors import ProxyError
from proxy.formats import ZERO, decimal_text
from proxy.ledger.store import SpendRow, SpendUnreadable
from proxy.periods import PERIODS, Period, period_end, period_start

if TYPE_CHECKING:
    from proxy.state import ProxyState

log = logging.getLogger("proxy.spend")


class SpendUnavailable(ProxyError):
    """The ledger's spend cannot be read (a PostgreSQL server away, a SQLite file gone), or
    the proxy runs without a ledger."""

    status = 503
    error_type = "server_error"
    code = "spend_unavailable"
    retry_after = 5


def _instant(day: date, timezone: ZoneInfo) -> str:
    """Midnight starting `day` in the billing timezone, ISO 8601 with its offset."""
    return datetime.combine(day, time(), tzinfo=timezone).isoformat()


def _amounts(sums: Mapping[str, Decimal], currencies: Sequence[str]) -> dict[str, str]:
    return {currency: decimal_text(sums.get(currency, ZERO)) for currency in currencies}


def spend_answer(
    team: str,
    now: datetime,
    timezone: ZoneInfo,
    currencies: Sequence[str],
    budgets: Sequence[Budget],
    rows: Sequence[SpendRow],
    held: Mapping[Period, Mapping[str, Decimal]] | None,
) -> dict[str, Any]:
    """The spend API's answer for `team` at `now`, from its daily spend `rows` and what its
    running calls hold per period and currency (None: its calls hold nothing, having no hard
    budget, so what they may still add is not known). Pure.

    Every period counts the billing days from its start to the day before its end, as the
    report counts the calls started from its start's midnight until its end's; every currency
    of `currencies` appears (0 where nothing was spent), and any other a row names after them.
    A budget's ``remaining`` is its amount less the period's spend and holds in its currency:
    negative once the budget is passed, never hidden. A hard budget is ``refusing`` when
    nothing remains: every call is then refused (402) until ``resets_at``; while something
    remains, a call is admitted if its worst case fits (`proxy.budgets`).
    """
    today = now.astimezone(timezone).date()
    starts = {period: period_start(today, period) for period in PERIODS}
    ends = {period: period_end(starts[period], period) for period in PERIODS}
    spent: dict[Period, dict[str, Decimal]] = {period: {} for period in PERIODS}
    shown = list(currencies)
    for row in rows:
        if row.currency not in shown:
            shown.append(row.currency)
        for period in PERIODS:
            if starts[period] <= row.day < ends[period]:
                sums = spent[period]
                sums[row.currency] = sums.get(row.currency, ZERO) + row.amount
    periods = {
        period: {
            "start": _instant(starts[period], timezone),
            "end": _instant(ends[period], timezone),
            "spent": _amounts(spent[period], shown),
            "held": None if held is None else _amounts(held[period], shown),
        }
        for period in PERIODS
    }
    return {
        "object": "spend",
        "team": team,
        "billing_timezone": timezone.key,
        "as_of": now.astimezone(timezone).isoformat(),
        "currencies": shown,
        "periods": periods,
        "budgets": [
            _budget(budget, spent[budget.period], held, ends[budget.period], timezone)
            for budget in budgets
        ],
    }


def _budget(
    budget: Budget,
    spent_in: Mapping[str, Decimal],
    held: Mapping[Period, Mapping[str, Decimal]] | None,
    end: date,
    timezone: ZoneInfo,
) -> dict[str, Any]:
    spent = spent_in.get(budget.currency, ZERO)
    holding = None if held is None else held[budget.period].get(budget.currency, ZERO)
    remaining = budget.amount - spent - (holding or ZERO)
    soft = []
    for percent in budget.soft:
        at = budget.amount * percent / 100
        soft.append(
            {"percent": decimal_text(percent), "at": decimal_text(at), "crossed": spent >= at}
        )
    return {
        "period": budget.period,
        "currency": budget.currency,
        "amount": decimal_text(budget.amount),
        "hard": budget.hard,
        "spent": decimal_text(spent),
        "held": None if holding is None else decimal_text(holding),
        "remaining": decimal_text(remaining),
        "soft": soft,
        "refusing": budget.hard and remaining <= 0,
        "resets_at": _instant(end, timezone),
    }


async def spend_of(state: ProxyState, team: str) -> dict[str, Any]:
    """Read `team`'s holds, then its spend, and answer (`spend_answer`); 503 if either cannot
    be read (`BudgetUnavailable` for the holds, `SpendUnavailable` for the spend)."""
    if state.team_spend is None:
        raise SpendUnavailable("this proxy runs without a ledger: there is no spend to read")
    now = state.clock()
    timezone = state.config.billing_timezone
    today = now.astimezone(timezone).date()
    starts = {period: period_start(today, period) for period in PERIODS}
    last = max(period_end(start, period) for period, start in starts.items()) - timedelta(days=1)
    held = await state.budgets.held(team, starts)  # first: see the module's docstring
    try:
        rows = await state.team_spend(team, min(starts.values()), last)
    except SpendUnreadable as exc:
        log.error("spend API: %s", exc)
        raise SpendUnavailable(
            "the ledger's spend cannot be read at the moment; try again shortly"
        ) from exc
    budgets = [budget for budget in state.config.budgets if budget.team == team]
    return spend_answer(team, now, timezone, state.pricer.book.currencies, budgets, rows, held)
