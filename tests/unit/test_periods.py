"""Budget and spend periods (`proxy.periods`): calendar days, Monday weeks, months."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.periods import PERIODS, Period, period_end, period_start


def test_the_periods_budgets_can_name() -> None:
    assert PERIODS == ("day", "week", "month")


@pytest.mark.parametrize(
    ("day", "period", "start", "end"),
    [
        (date(2026, 11, 2), "day", date(2026, 11, 2), date(2026, 11, 3)),
        (date(2026, 12, 31), "day", date(2026, 12, 31), date(2027, 1, 1)),
        (date(2026, 11, 2), "week", date(2026, 11, 2), date(2026, 11, 9)),  # a Monday
        (date(2026, 11, 1), "week", date(2026, 10, 26), date(2026, 11, 2)),  # a Sunday
        (date(2026, 12, 31), "week", date(2026, 12, 28), date(2027, 1, 4)),  # over New Year
        (date(2026, 11, 30), "month", date(2026, 11, 1), date(2026, 12, 1)),
        (date(2026, 12, 15), "month", date(2026, 12, 1), date(2027, 1, 1)),
        (date(2028, 2, 29), "month", date(2028, 2, 1), date(2028, 3, 1)),  # leap year
        (date(2027, 2, 1), "month", date(2027, 2, 1), date(2027, 3, 1)),
        (date(2026, 1, 31), "month", date(2026, 1, 1), date(2026, 2, 1)),
    ],
)
def test_period_bounds(day: date, period: Period, start: date, end: date) -> None:
    assert period_start(day, period) == start
    assert period_end(start, period) == end


@given(
    st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 12, 31)),
    st.sampled_from(PERIODS),
)
def test_periods_tile_the_calendar(day: date, period: Period) -> None:
    """Every day lies in exactly one period, and the next period starts where it ends."""
    start = period_start(day, period)
    end = period_end(start, period)
    assert start <= day < end
    assert period_start(end - timedelta(days=1), period) == start
    assert period_start(end, period) == end
    if period == "week":
        assert start.weekday() == 0 and end - start == timedelta(days=7)
    if period == "month":
        assert start.day == 1 and end.day == 1
