"""`proxy.spend.spend_answer`: the spend API's figures from spend rows and holds (pure)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from proxy.budgets.decide import Standing, remaining_text
from proxy.config import Budget
from proxy.ledger.store import SpendRow
from proxy.periods import PERIODS, Period
from proxy.spend import spend_answer

BEIJING = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 11, 30, 16, 30, tzinfo=UTC)  # Tuesday 1 December 00:30 in Beijing
HARD = Budget("a", "week", Decimal("1"), "CNY", (Decimal(50), Decimal("99.5")), True)


def row(day: str, amount: str, currency: str = "CNY") -> SpendRow:
    return SpendRow("a", date.fromisoformat(day), currency, Decimal(amount))


def test_each_period_counts_its_own_days() -> None:
    rows = [
        row("2026-11-29", "5"),  # Sunday: last week, last month
        row("2026-11-30", "0.25"),  # Monday: this week, last month
        row("2026-12-01", "0.5"),  # today
        row("2026-12-07", "3"),  # next week (a clock that went back): this month only
    ]
    answer = spend_answer("a", NOW, BEIJING, ("CNY", "USD"), [], rows, None)
    spent = {name: period["spent"]["CNY"] for name, period in answer["periods"].items()}
    assert spent == {"day": "0.5", "week": "0.75", "month": "3.5"}
    assert answer["as_of"] == "2026-12-01T00:30:00+08:00"
    assert answer["periods"]["week"]["end"] == "2026-12-07T00:00:00+08:00"


def test_a_passed_budget_shows_a_negative_remaining_and_refuses() -> None:
    held: dict[Period, dict[str, Decimal]] = {p: {"CNY": Decimal("0.2")} for p in PERIODS}
    rows = [row("2026-11-30", "0.9")]
    [budget] = spend_answer("a", NOW, BEIJING, ("CNY",), [HARD], rows, held)["budgets"]
    assert (budget["spent"], budget["held"], budget["remaining"]) == ("0.9", "0.2", "-0.1")
    assert budget["refusing"] is True
    assert budget["soft"] == [
        {"percent": "50", "at": "0.5", "crossed": True},
        {"percent": "99.5", "at": "0.995", "crossed": False},  # holds are not spend
    ]
    soft = Budget("a", "week", Decimal("1"), "CNY", (), False)
    [passed] = spend_answer("a", NOW, BEIJING, ("CNY",), [soft], rows, held)["budgets"]
    assert (passed["remaining"], passed["refusing"]) == ("-0.1", False)  # soft: never refuses


def test_a_currency_outside_the_book_is_shown_after_its_own() -> None:
    rows = [row("2026-12-01", "2", "EUR")]
    answer = spend_answer("a", NOW, BEIJING, ("CNY", "USD"), [], rows, None)
    assert answer["currencies"] == ["CNY", "USD", "EUR"]
    assert answer["periods"]["day"]["spent"] == {"CNY": "0", "USD": "0", "EUR": "2"}


def test_the_header_names_each_budget_before_the_calls_own_hold() -> None:
    day = Budget("a", "day", Decimal("0.5"), "USD", (), True)
    standings = [
        Standing(HARD, date(2026, 11, 30), Decimal("0.25"), Decimal("0.125")),
        Standing(day, date(2026, 12, 1), Decimal("0.75"), Decimal(0)),
    ]
    assert remaining_text(standings) == "week=0.625 CNY, day=-0.25 USD"
