"""Budgets without a proxy: the worst case a hard budget reserves, budgets and team policies
as the configuration file states them (`proxy.config`), and the guard rebuilt by a reload."""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.budgets import BudgetExceeded, BudgetGuard, CallSize, LocalHolds, worst_cost
from proxy.config import Budget, ConfigError, TeamPolicy, load_config
from proxy.ledger.store import SpendRow
from proxy.pricing import PriceBook, Pricer
from proxy.pricing.engine import resolve, to_micros
from tests.support.proxy_harness import PEAK


def test_worst_cost_is_the_dearest_tier(book: PriceBook) -> None:
    resolution = resolve(book, "deepseek-flash", to_micros(PEAK))
    assert not isinstance(resolution, str)
    cards = list(resolution.version.rate_cards.values())
    assert worst_cost(1000, 100, cards, "CNY") == Decimal("0.0028")  # peak: 1000x2 + 100x8
    assert worst_cost(1000, 100, cards, "USD") == Decimal("0.00042")  # 1000x0.30 + 100x1.20


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            "budgets: {gamma: [{period: day, amount: 1, currency: CNY}]}",
            "budgets.gamma",
            "not a team defined under 'teams'",
        ),
        (
            "budgets: {a: [{period: year, amount: 1, currency: CNY}]}",
            "budgets.a[0].period",
            "expected day, week or month, got 'year'",
        ),
        (
            "budgets: {a: [{period: day, amount: -1, currency: CNY}]}",
            "budgets.a[0].amount",
            "must be positive",
        ),
        (
            "budgets: {a: [{period: day, amount: 1, currency: CNY, soft: [120]}]}",
            "budgets.a[0].soft",
            "percentages must lie between 0 and 100",
        ),
        (
            "budgets: {a: [{period: day, amount: 1, currency: CNY, hard: yes please}]}",
            "budgets.a[0].hard",
            "expected true or false",
        ),
        (
            "budgets: {a: [{period: day, amount: 1, currency: CNY}, {period: day, amount: 2, "
            "currency: USD}]}",
            "budgets.a[1].period",
            "already has a day budget",
        ),
    ],
)
def test_budget_config_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "pricing: {book: [book.yaml]}\nteams:\n  a:\n    keys: ['sha256:"
        + "ab" * 32
        + "']\n"
        + text
        + "\n",
        encoding="utf-8",
    )
    (tmp_path / "book.yaml").write_text("currencies: [CNY]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.key, reason in info.value.reason) == (key, True)


@pytest.mark.parametrize(
    ("team", "key", "reason"),
    [
        ("default_max_tokens: 0", "teams.a.default_max_tokens", "expected a positive whole number"),
        (
            "default_max_tokens: '4096'",
            "teams.a.default_max_tokens",
            "expected a positive whole number",
        ),
        (
            "over_budget: lower",
            "teams.a.over_budget",
            "expected refuse or lower_max_tokens, got 'lower'",
        ),
        ("max_tokens: 5", "teams.a.max_tokens", "unknown key"),
    ],
)
def test_team_policy_config_errors(tmp_path: Path, team: str, key: str, reason: str) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "pricing: {book: [book.yaml]}\nteams:\n  a:\n    keys: ['sha256:"
        + "ab" * 32
        + f"']\n    {team}\n",
        encoding="utf-8",
    )
    (tmp_path / "book.yaml").write_text("currencies: [CNY]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and reason in info.value.reason


def test_budget_config_parses(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "pricing: {book: [book.yaml]}\nteams:\n  a:\n    keys: ['sha256:"
        + "ab" * 32
        + "']\n    default_max_tokens: 8192\n"
        "    over_budget: lower_max_tokens\n  b:\n    keys: ['sha256:"
        + "cd"
        * 32
        + "']\nbudgets:\n  a:\n    - {period: month, amount: 500.50, "
        "currency: cny, soft: [80, 50], hard: true}\n",
        encoding="utf-8",
    )
    (tmp_path / "book.yaml").write_text("currencies: [CNY]\n")
    config = load_config(path)
    [budget] = config.budgets
    assert budget == Budget(
        "a", "month", Decimal("500.50"), "CNY", (Decimal(50), Decimal(80)), True
    )
    assert json.dumps(str(budget.amount)) == '"500.50"'
    assert config.policy("a") == TeamPolicy(8192, "lower_max_tokens")
    assert config.policy("b") == TeamPolicy(None, "refuse")


async def test_a_guard_rebuilt_by_a_reload_keeps_the_running_calls_held(book: PriceBook) -> None:
    """A live reload builds a new guard around the running one's store (`proxy.reload`): the
    calls the old guard admitted stay held and settle through it, the new amount applies to
    the next call, and a team that had no hard budget in between has its spend read again
    from the ledger, where its unheld calls went."""
    rows: list[SpendRow] = []
    store = LocalHolds(lambda since, until: [r for r in rows if since <= r.day <= until])
    daily = Budget("a", "day", Decimal("0.006"), "CNY", (), True)
    raised = dataclasses.replace(daily, amount=Decimal("0.01"))
    size = CallSize(1000, 100)  # up to 0.0028 CNY at the peak price

    def guard(*budgets: Budget) -> BudgetGuard:
        return BudgetGuard(budgets, Pricer(book), store, ZoneInfo("Asia/Shanghai"))

    async def refused(guard: BudgetGuard, request_id: str) -> tuple[Decimal, Decimal]:
        """The spent and reserved amounts a refusal states."""
        with pytest.raises(BudgetExceeded) as info:
            await guard.reserve("a", request_id, "deepseek-flash", size, PEAK)
        stated = (info.value.details or {})["budget"]
        assert isinstance(stated, dict)
        return Decimal(stated["spent"]), Decimal(stated["reserved"])

    old = guard(daily)
    first, second = [await old.reserve("a", r, "deepseek-flash", size, PEAK) for r in "12"]
    assert await refused(old, "3") == (Decimal(0), Decimal("0.0056"))
    new = guard(raised)
    third = await new.reserve("a", "3", "deepseek-flash", size, PEAK)
    assert await refused(new, "4") == (Decimal(0), Decimal("0.0084"))
    await old.settle(first, {"CNY": Decimal("0.0005")})
    await old.settle(second, None)
    await new.settle(third, None)
    guard()  # a reload took the team's hard budget away: its calls were no longer held
    rows.append(SpendRow("a", date(2026, 11, 2), "CNY", Decimal("0.0045")))
    again = guard(raised)
    await again.reserve("a", "5", "deepseek-flash", size, PEAK)
    assert await refused(again, "6") == (Decimal("0.0045"), Decimal("0.0028"))
