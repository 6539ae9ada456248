"""The holidays fixed by law (`proxy.pricing.statutory`) and how the engine prices them in a year
with no published calendar.

The expected dates are not the library's: they come from the State Council's yearly notices
(国务院办公厅关于XXXX年部分节假日安排的通知), whose holiday periods are built around each festival's
day:

- 2020: https://www.gov.cn/gongbao/content/2019/content_5459138.htm
- 2021: https://www.gov.cn/gongbao/content/2020/content_5567750.htm
- 2022: https://www.gov.cn/gongbao/content/2021/content_5651728.htm
- 2023: https://www.gov.cn/gongbao/content/2023/content_5736714.htm
- 2024: https://www.gov.cn/gongbao/2023/issue_10806/202311/content_6913823.html
- 2025: https://www.gov.cn/gongbao/2024/issue_11726/202411/content_6989767.html
- 2026: the shipped book's calendar (its source is there);

and, for 2027, which has no notice yet, from the Chinese calendar as published for that year
(e.g. https://holidayssky.com/2025/02/21/public-holidays-in-china-for-2027: eve 5 February,
Spring Festival 6 February, Qingming 5 April, Dragon Boat 9 June, Mid-Autumn 15 September).
"""

from __future__ import annotations

import dataclasses
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.pricing import PriceBook, PriceBookError, Pricer, load_price_book, price
from proxy.pricing.model import HolidayCalendar
from proxy.pricing.statutory import CN_STATUTORY_2025, lunar_date, provisional_days, qingming
from proxy.usage import TokenUsage
from tests.conftest import SHIPPED_BOOK

PROVISIONAL = ("holiday_calendar_provisional",)
MISSING = ("holiday_calendar_missing",)
M = 1_000_000


def d(text: str) -> date:
    return date.fromisoformat(text)


def span(first: str, last: str) -> set[date]:
    start, end = d(first), d(last)
    return {start + timedelta(days=i) for i in range((end - start).days + 1)}


# year: (Spring Festival = lunar 1/1, Qingming, Dragon Boat = lunar 5/5, Mid-Autumn = lunar 8/15)
FESTIVALS = {
    2020: ("2020-01-25", "2020-04-04", "2020-06-25", "2020-10-01"),
    2021: ("2021-02-12", "2021-04-04", "2021-06-14", "2021-09-21"),
    2022: ("2022-02-01", "2022-04-05", "2022-06-03", "2022-09-10"),
    2023: ("2023-01-22", "2023-04-05", "2023-06-22", "2023-09-29"),
    2024: ("2024-02-10", "2024-04-04", "2024-06-10", "2024-09-17"),
    2025: ("2025-01-29", "2025-04-04", "2025-05-31", "2025-10-06"),
    2026: ("2026-02-17", "2026-04-05", "2026-06-19", "2026-09-25"),
    2027: ("2027-02-06", "2027-04-05", "2027-06-09", "2027-09-15"),
}
SPRING_FESTIVAL_EVE = {  # lunar 12/30, or 12/29 when the twelfth month has 29 days
    2020: "2020-01-24",
    2021: "2021-02-11",
    2022: "2022-01-31",  # a 29-day twelfth month
    2023: "2023-01-21",
    2024: "2024-02-09",
    2025: "2025-01-28",  # 12/29
    2026: "2026-02-16",  # 12/29
    2027: "2027-02-05",  # 12/29
}

PUBLISHED_HOLIDAYS = {
    2023: span("2022-12-31", "2023-01-02")
    | span("2023-01-21", "2023-01-27")
    | {d("2023-04-05")}
    | span("2023-04-29", "2023-05-03")
    | span("2023-06-22", "2023-06-24")
    | span("2023-09-29", "2023-10-06"),
    2024: {d("2024-01-01")}
    | span("2024-02-10", "2024-02-17")
    | span("2024-04-04", "2024-04-06")
    | span("2024-05-01", "2024-05-05")
    | {d("2024-06-10")}
    | span("2024-09-15", "2024-09-17")
    | span("2024-10-01", "2024-10-07"),
    2025: {d("2025-01-01")}
    | span("2025-01-28", "2025-02-04")
    | span("2025-04-04", "2025-04-06")
    | span("2025-05-01", "2025-05-05")
    | span("2025-05-31", "2025-06-02")
    | span("2025-10-01", "2025-10-08"),
}
"""The holiday periods of the State Council notices for 2023-2025 (2026's is in the book)."""


@pytest.mark.parametrize("year", sorted(FESTIVALS))
def test_lunar_dates_and_qingming_match_published_years(year: int) -> None:
    spring, tomb_sweeping, dragon_boat, mid_autumn = map(d, FESTIVALS[year])
    assert lunar_date(year, 1, 1) == spring
    assert lunar_date(year, 1, 1) - timedelta(days=1) == d(SPRING_FESTIVAL_EVE[year])
    assert qingming(year) == tomb_sweeping
    assert lunar_date(year, 5, 5) == dragon_boat
    assert lunar_date(year, 8, 15) == mid_autumn


@pytest.mark.parametrize("year", [2023, 2024, 2025])
def test_each_festival_lies_in_its_published_holiday_period(year: int) -> None:
    """The day each notice's period is built around is the day the conversion gives."""
    assert {d(text) for text in FESTIVALS[year]} <= PUBLISHED_HOLIDAYS[year]


def test_the_2025_and_2026_days_by_law_exactly() -> None:
    assert sorted(provisional_days(CN_STATUTORY_2025, 2025)) == [
        d(text)
        for text in (
            "2025-01-01",
            "2025-01-28",  # Spring Festival eve
            "2025-01-29",
            "2025-01-30",
            "2025-01-31",
            "2025-04-04",  # Qingming
            "2025-05-01",
            "2025-05-02",
            "2025-05-31",  # Dragon Boat
            "2025-10-01",
            "2025-10-02",
            "2025-10-03",
            "2025-10-06",  # Mid-Autumn
        )
    ]
    assert sorted(provisional_days(CN_STATUTORY_2025, 2026)) == [
        d(text)
        for text in (
            "2026-01-01",
            "2026-02-16",
            "2026-02-17",
            "2026-02-18",
            "2026-02-19",
            "2026-04-05",
            "2026-05-01",
            "2026-05-02",
            "2026-06-19",
            "2026-09-25",
            "2026-10-01",
            "2026-10-02",
            "2026-10-03",
        )
    ]


def test_the_2026_calendar_contains_every_day_the_rule_gives(book: PriceBook) -> None:
    """Recomputed by the provisional rule, 2026's days are a subset of the published ones, so
    publishing a calendar only ever adds holidays to what was priced provisionally."""
    published = book.calendars["cn-statutory"].holidays
    days = provisional_days(CN_STATUTORY_2025, 2026)
    assert days <= published
    assert len(published - days) == 20  # the notice's bridging days: 33 days off in all


def test_the_2025_notice_contains_every_day_the_rule_gives() -> None:
    days = provisional_days(CN_STATUTORY_2025, 2025)
    assert days <= PUBLISHED_HOLIDAYS[2025]
    assert len(PUBLISHED_HOLIDAYS[2025] - days) == 15


def test_years_before_the_2024_revision_get_no_days() -> None:
    """Until 2024 the law had no Spring Festival eve and one day for Labour Day: 2024's notice
    kept the eve (2024-02-09) a working day, so the 2025 rule must not describe 2024."""
    assert d(SPRING_FESTIVAL_EVE[2024]) not in PUBLISHED_HOLIDAYS[2024]
    assert d("2024-05-02") in PUBLISHED_HOLIDAYS[2024]  # a bridging day then, not by law
    assert provisional_days(CN_STATUTORY_2025, 2024) == frozenset()


@pytest.mark.parametrize("year", range(2025, 2101))
def test_every_year_to_2100_has_the_days_in_their_seasons(year: int) -> None:
    """A lunar month holds its principal solar term: month 1 the one near 19 February, month 5
    the summer solstice, month 8 the autumn equinox; so each festival keeps to a season."""
    days = provisional_days(CN_STATUTORY_2025, year)
    new_year = lunar_date(year, 1, 1)
    assert d(f"{year}-01-21") <= new_year <= d(f"{year}-02-20")
    assert d(f"{year}-04-04") <= qingming(year) <= d(f"{year}-04-06")
    assert d(f"{year}-05-27") <= lunar_date(year, 5, 5) <= d(f"{year}-06-25")
    assert d(f"{year}-09-07") <= lunar_date(year, 8, 15) <= d(f"{year}-10-08")
    assert {new_year - timedelta(days=1), new_year + timedelta(days=2)} <= days
    # 13 days, or 12 when Mid-Autumn falls on 1-3 October (as in 2028)
    overlap = lunar_date(year, 8, 15) in span(f"{year}-10-01", f"{year}-10-03")
    assert len(days) == 13 - overlap
    assert all(day.year == year for day in days)


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown provisional holiday rule 'cn-1999'"):
        provisional_days("cn-1999", 2027)


def beijing(text: str) -> datetime:
    return datetime.fromisoformat(f"{text}+08:00")


@pytest.mark.parametrize(
    ("instant", "tier", "flags"),
    [
        # Friday 1 January 2027: New Year's Day by law, so off-peak before the notice is out
        ("2027-01-01T10:00:00", "off_peak", PROVISIONAL),
        ("2027-01-01T00:00:00", "off_peak", PROVISIONAL),
        ("2027-01-01T23:59:59.999999", "off_peak", PROVISIONAL),
        # Thursday 31 December 2026: the published 2026 calendar, a working day
        ("2026-12-31T10:00:00", "peak", ()),
        ("2026-12-31T23:59:59.999999", "off_peak", ()),
        # Saturday 2 January: weekend under the weekday rule, the calendar still missing
        ("2027-01-02T10:00:00", "off_peak", MISSING),
        # Spring Festival: eve Friday 5 February (lunar 12/29) to Monday 8 February (lunar 1/3)
        ("2027-02-04T10:00:00", "peak", MISSING),
        ("2027-02-05T10:00:00", "off_peak", PROVISIONAL),
        ("2027-02-08T15:00:00", "off_peak", PROVISIONAL),
        # Tuesday 9 February: surely a bridging day, but only the notice can say so
        ("2027-02-09T10:00:00", "peak", MISSING),
        ("2027-04-05T10:00:00", "off_peak", PROVISIONAL),  # Qingming, Monday
        ("2027-05-03T10:00:00", "peak", MISSING),  # Labour Day fell on the weekend
        ("2027-06-09T10:00:00", "off_peak", PROVISIONAL),  # Dragon Boat, Wednesday
        ("2027-09-15T10:00:00", "off_peak", PROVISIONAL),  # Mid-Autumn, Wednesday
        ("2027-10-01T10:00:00", "off_peak", PROVISIONAL),  # National Day, Friday
        ("2027-10-04T10:00:00", "peak", MISSING),
        ("2028-01-03T10:00:00", "peak", MISSING),  # Monday after New Year's Day 2028
    ],
)
def test_days_fixed_by_law_are_off_peak_and_flagged(
    book: PriceBook, instant: str, tier: str, flags: tuple[str, ...]
) -> None:
    pricing = price(book, "deepseek-flash", TokenUsage(cache_miss=M), beijing(instant))
    assert (pricing.tier, pricing.flags) == (tier, flags)
    expected = {"peak": ("2", "0.30"), "off_peak": ("1", "0.15")}[tier]
    assert pricing.costs["CNY"].total == Decimal(expected[0])
    assert pricing.costs["USD"].total == Decimal(expected[1])
    memoised = Pricer(book)
    for _ in range(2):
        again = memoised.price("deepseek-flash", TokenUsage(cache_miss=M), beijing(instant))
        assert (again.tier, again.flags, again.costs) == (tier, flags, pricing.costs)


def with_calendar(book: PriceBook, calendar: HolidayCalendar) -> PriceBook:
    return dataclasses.replace(book, calendars={calendar.name: calendar})


def test_a_published_year_keeps_its_own_dates(book: PriceBook) -> None:
    """Once a year is in the calendar, its dates decide alone: a (hypothetical) 2027 calendar
    without New Year's Day makes it a working day again, with no flag."""
    calendar = book.calendars["cn-statutory"]
    published = with_calendar(
        book,
        dataclasses.replace(
            calendar, years=calendar.years | {2027}, holidays=calendar.holidays | {d("2027-02-09")}
        ),
    )
    new_year = price(
        published, "deepseek-flash", TokenUsage(cache_miss=M), beijing("2027-01-01T10:00:00")
    )
    bridging = price(
        published, "deepseek-flash", TokenUsage(cache_miss=M), beijing("2027-02-09T10:00:00")
    )
    assert (new_year.tier, new_year.flags) == ("peak", ())
    assert (bridging.tier, bridging.flags) == ("off_peak", ())


def test_a_calendar_without_the_rule_prices_by_the_weekday_rule(book: PriceBook) -> None:
    plain = with_calendar(
        book, dataclasses.replace(book.calendars["cn-statutory"], provisional=None)
    )
    pricing = price(
        plain, "deepseek-flash", TokenUsage(cache_miss=M), beijing("2027-01-01T10:00:00")
    )
    assert (pricing.tier, pricing.flags) == ("peak", MISSING)


@pytest.mark.parametrize(
    ("value", "shown"), [("cn-statutory-2027", "'cn-statutory-2027'"), ("[cn]", "['cn']")]
)
def test_an_unknown_rule_is_a_book_problem(tmp_path: Path, value: str, shown: str) -> None:
    text = SHIPPED_BOOK.read_text(encoding="utf-8")
    assert text.count("provisional: cn-statutory-2025\n") == 1
    path = tmp_path / "book.yaml"
    path.write_text(
        text.replace("provisional: cn-statutory-2025", f"provisional: {value}"), encoding="utf-8"
    )
    with pytest.raises(PriceBookError) as info:
        load_price_book([path])
    assert [str(p) for p in info.value.problems] == [
        f"{path}: calendars.cn-statutory.provisional: unknown rule {shown} (known: "
        "cn-statutory-2025); it names the holidays fixed by law, priced before a year's "
        "calendar is published"
    ]


def test_the_shipped_calendar_names_the_rule(book: PriceBook) -> None:
    assert book.calendars["cn-statutory"].provisional == CN_STATUTORY_2025
