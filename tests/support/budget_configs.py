"""Hard-budget configs for tests of ``serve`` processes, sized from the price book."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from proxy.pricing import PriceBook
from proxy.pricing.engine import resolve, to_micros
from tests.support.requests import BOUNDED_CHAT

SMALL_MONTH_BUDGET = (
    "budgets:\n  alpha:\n    - {period: month, amount: '0.02', currency: CNY, hard: true}\n"
)
"""Team alpha's hard budget with room for a few `tests.support.requests.BOUNDED_CHAT` calls
(each holds about 0.0032 CNY until it settles to 0.00036)."""

BIG: dict[str, Any] = {**BOUNDED_CHAT, "max_tokens": 100_000}
"""A call whose worst case is nearly all output: its prompt bound is worth well under 1% of it."""


def one_call_budget(book: PriceBook) -> str:
    """Config for a hard budget of team alpha with room for one `BIG` call, not for two: one
    and a half times its output at the dearest output price in force (taken from the price
    book, so the test does not depend on how the guard bounds the prompt)."""
    resolution = resolve(book, str(BIG["model"]), to_micros(datetime.now(UTC)))
    assert not isinstance(resolution, str)
    output = max(rates["CNY"].output for rates in resolution.version.rate_cards.values())
    amount = output * BIG["max_tokens"] / 1_000_000 * 3 / 2
    return (
        "budgets:\n  alpha:\n"
        f"    - {{period: month, amount: '{amount}', currency: CNY, hard: true}}\n"
    )
