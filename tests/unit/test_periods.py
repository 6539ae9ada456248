"""Calendar periods of budgets and spend: days, weeks from Monday, months of any length."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from proxy.periods import PERIODS, Period, period_end, period_start


@pytest.mark.parametrize(
    ("day", "period", "start", "end"),
    [
        (date(2026, 11, 4), "day", date(2026, 11, 4), date(2026, 11, 5)),
        (date(2026, 12, 31), "day", date(2026, 12, 31), date(2027, 1, 1)),
        (date(2026, 11, 4), "week", date(2026, 11, 2), date(2026, 11, 9)),  # a Wednesday
        (date(2026, 11, 2), "week", date(2026, 11, 2), date(2026, 11, 9)),  # a Monday
        (date(2026, 11, 8), "week", date(2026, 11, 2), date(2026, 11, 9)),  # a Sunday
        (date(2026, 12, 30), "week", date(2026, 12, 28), date(2027, 1, 4)),  # across the year
        (date(2026, 2, 14), "month", date(2026, 2, 1), date(2026, 3, 1)),
        (date(2028, 2, 29), "month", date(2028, 2, 1), date(2028, 3, 1)),  # leap year
        (date(2026, 1, 31), "month", date(2026, 1, 1), date(2026, 2, 1)),
        (date(2026, 12, 1), "month", date(2026, 12, 1), date(2027, 1, 1)),
    ],
)
def test_period_bounds(day: date, period: Period, start: date, end: date) -> None:
    assert period_start(day, period) == start
    assert period_end(start, period) == end


@pytest.mark.parametrize("period", PERIODS)
def test_periods_tile_the_calendar(period: Period) -> None:
    """Every day of four years lies in exactly one period, which ends where the next begins."""
    day = date(2026, 1, 1)
    while day < date(2030, 1, 1):
        start = period_start(day, period)
        end = period_end(start, period)
        assert start <= day < end
        assert period_start(end, period) == end
        assert period_start(end - timedelta(days=1), period) == start
        day += timedelta(days=1)
