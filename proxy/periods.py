"""Calendar periods of budgets and spend, in the billing timezone (weeks start on Monday)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Literal

Period = Literal["day", "week", "month"]

PERIODS: tuple[Period, ...] = ("day", "week", "month")


def period_start(day: date, period: Period) -> date:
    """First day of the period containing `day`."""
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def period_end(start: date, period: Period) -> date:
    """The first day of the next period."""
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
