"""China's statutory public holidays, fixed by law: the holidays a year is known to have before
the State Council publishes its calendar for it.

Each year the State Council's notice (国务院办公厅关于XXXX年部分节假日安排的通知, usually out in
November of the year before) fixes the holiday periods, the bridging days and the make-up working
days. What no notice can move are the days the law itself makes holidays for everyone:
全国年节及纪念日放假办法 as revised in 2024 (State Council Order No. 795, in force from
2025-01-01), Article 2, 13 days a year:

- New Year's Day, 1 January;
- Spring Festival: its eve (除夕, the last day of the lunar year: lunar 12/30, or 12/29 when the
  twelfth month is short) and lunar 1/1 to 1/3;
- Qingming, the day of the solar term 清明;
- Labour Day, 1 and 2 May;
- Dragon Boat Festival, lunar 5/5;
- Mid-Autumn Festival, lunar 8/15;
- National Day, 1 to 3 October.

A price book's holiday calendar names this rule (``provisional: cn-statutory-2025``) to have
these days priced as holidays in the years it has no notice for, flagged
``holiday_calendar_provisional`` (`proxy.pricing.engine.tier_at`). Only these days: bridging
days, make-up working days and the weekday that replaces a holiday falling on a weekend
(Article 4 says one is given, the notice says which) are the notice's to fix, so they are not
guessed; such days keep the weekday rule and ``holiday_calendar_missing`` until the notice is in
the book. Years before 2025 fall under the earlier text of the law (no Spring Festival eve, one
day for Labour Day), which this rule does not describe: it gives them no days.

Lunar dates and the Qingming solar term come from ``lunar_python`` (6tail's *lunar*), which
computes the Chinese calendar astronomically for Beijing time, with no table that ends in some
year, rather than from a lunisolar calendar written here: a maintained, dependency-free library
beats astronomy of our own. `holidays` (python-holidays) was the other
candidate; its lunar dates are a private table, and its public China calendar mixes in each
notice's bridging days once the library learns them, which are exactly what must stay out of
a provisional calendar. The conversions are tested against the dates of published years
(tests/unit/test_pricing_statutory.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from functools import lru_cache
from types import MappingProxyType

from lunar_python import Lunar, Solar

CN_STATUTORY_2025 = "cn-statutory-2025"

PROVISIONAL_RULES: Mapping[str, str] = MappingProxyType(
    {
        CN_STATUTORY_2025: (
            "China's statutory holidays fixed by law (全国年节及纪念日放假办法 as revised in 2024, "
            "in force from 2025): https://www.gov.cn/gongbao/2024/issue_11726/202411/"
            "content_6989774.html"
        ),
    }
)
"""The rules a calendar's ``provisional`` key may name, each with what it is and its source."""

_FIRST_YEAR = 2025
"""The first year the 2024 revision of the law governs."""


@lru_cache(maxsize=32)
def provisional_days(rule: str, year: int) -> frozenset[date]:
    """The holidays `rule` fixes in `year` (a Gregorian year, days on the Beijing calendar).

    Pure and memoised: a year's days are computed once, however many calls fall in it.
    """
    if rule != CN_STATUTORY_2025:
        raise ValueError(f"unknown provisional holiday rule {rule!r}")
    if year < _FIRST_YEAR:
        return frozenset()
    new_year = lunar_date(year, 1, 1)
    days = {
        date(year, 1, 1),
        new_year - timedelta(days=1),  # Spring Festival eve, lunar 12/29 or 12/30
        new_year,
        new_year + timedelta(days=1),
        new_year + timedelta(days=2),
        qingming(year),
        date(year, 5, 1),
        date(year, 5, 2),
        lunar_date(year, 5, 5),
        lunar_date(year, 8, 15),
        date(year, 10, 1),
        date(year, 10, 2),
        date(year, 10, 3),
    }
    return frozenset(days)


def lunar_date(year: int, month: int, day: int) -> date:
    """The Gregorian date of a day of the Chinese lunar year whose new year falls in `year`
    (month 1-12, never a leap month: no statutory holiday falls in one)."""
    solar = Lunar.fromYmd(year, month, day).getSolar()
    return date(int(solar.getYear()), int(solar.getMonth()), int(solar.getDay()))


def qingming(year: int) -> date:
    """The day of the solar term 清明 in `year`, Beijing time (4, 5 or 6 April)."""
    table = Solar.fromYmd(year, 4, 15).getLunar().getJieQiTable()
    solar = table["清明"]
    return date(int(solar.getYear()), int(solar.getMonth()), int(solar.getDay()))
