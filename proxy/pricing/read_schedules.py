"""Reading the ``calendars`` and ``schedules`` sections of a price-book file.

A schedule's windows are compiled onto the 10,080 minutes of a week, so a lookup is one `bisect`
(`proxy.pricing.engine.tier_at`); overlaps and gaps are reported, as either would make a price
ambiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.pricing.fields import PROVENANCE_KEYS, Reader, format_minute_of_week, utc_id
from proxy.pricing.model import HolidayCalendar, ScheduleVersion, Window
from proxy.pricing.statutory import PROVISIONAL_RULES

_WEEK = 7 * 1440


def read_calendar(reader: Reader, name: str, raw: Any) -> HolidayCalendar | None:
    entry = f"calendars.{name}"
    if not reader.mapping(
        raw,
        entry,
        {"years", "holidays", "workdays", "provisional"} | PROVENANCE_KEYS,
        {"years", "holidays", "source", "confidence"},
    ):
        return None
    provisional = raw.get("provisional")
    known_rule = provisional is None or (
        isinstance(provisional, str) and provisional in PROVISIONAL_RULES
    )
    if not known_rule:
        reader.fail(
            f"{entry}.provisional",
            f"unknown rule {provisional!r} (known: {', '.join(sorted(PROVISIONAL_RULES))}); "
            "it names the holidays fixed by law, priced before a year's calendar is published",
        )
    years = raw["years"]
    if not isinstance(years, list) or not all(isinstance(y, int) for y in years) or not years:
        reader.fail(f"{entry}.years", "expected a list of years such as [2026]")
        return None
    holidays = reader.dates(raw["holidays"], f"{entry}.holidays")
    workdays = reader.dates(raw.get("workdays", []), f"{entry}.workdays")
    provenance = reader.provenance(raw, entry)
    if holidays is None or workdays is None or provenance is None or not known_rule:
        return None
    for day in holidays + workdays:
        if day.year not in years:
            reader.fail(entry, f"date {day} lies outside the covered years {years}")
            return None
    both = set(holidays) & set(workdays)
    if both:
        reader.fail(entry, f"dates both holiday and workday: {sorted(map(str, both))}")
        return None
    return HolidayCalendar(
        name,
        frozenset(years),
        frozenset(holidays),
        frozenset(workdays),
        provenance,
        provisional,
    )


def read_schedule(reader: Reader, name: str, raw: Any) -> list[tuple[ScheduleVersion, str]]:
    entry = f"schedules.{name}"
    if not reader.mapping(raw, entry, {"timezone", "versions"}, {"timezone", "versions"}):
        return []
    try:
        tz = ZoneInfo(str(raw["timezone"]))
    except (ZoneInfoNotFoundError, ValueError):
        reader.fail(f"{entry}.timezone", f"unknown timezone {raw['timezone']!r}")
        return []
    allowed = {
        "from",
        "id",
        "label",
        "windows",
        "otherwise",
        "holidays",
        "makeup_workdays",
    } | PROVENANCE_KEYS
    result = []
    for i, item in reader.versions(raw["versions"], f"{entry}.versions"):
        where = f"{entry}.versions[{i}]"
        if not reader.mapping(item, where, allowed, {"from", "windows", "source", "confidence"}):
            continue
        rule = _read_schedule_version(reader, name, tz, item, where)
        if rule is not None:
            result.append((rule, where))
    return result


def _read_schedule_version(
    reader: Reader, name: str, tz: ZoneInfo, item: Mapping[str, Any], where: str
) -> ScheduleVersion | None:
    effective = reader.instant(item["from"], f"{where}.from")
    provenance = reader.provenance(item, where)
    windows = _read_windows(reader, item["windows"], f"{where}.windows")
    default = item.get("otherwise")
    if default is not None and not isinstance(default, str):
        reader.fail(f"{where}.otherwise", "expected a tier name")
        return None
    holiday_calendar = holiday_tier = None
    if "holidays" in item:
        spec = item["holidays"]
        keys = {"calendar", "tier"}
        if not reader.mapping(spec, f"{where}.holidays", keys, keys):
            return None
        holiday_calendar, holiday_tier = str(spec["calendar"]), str(spec["tier"])
    makeup = item.get("makeup_workdays", "weekend")
    if makeup not in ("weekend", "weekday"):
        reader.fail(f"{where}.makeup_workdays", f"expected 'weekend' or 'weekday', got {makeup!r}")
        return None
    if effective is None or provenance is None or windows is None:
        return None
    compiled = _compile_week(reader, windows, default, f"{where}.windows")
    if compiled is None:
        return None
    return ScheduleVersion(
        id=str(item.get("id") or utc_id(name, effective)),
        schedule=name,
        effective=effective,
        timezone=tz,
        windows=tuple(windows),
        default_tier=default,
        boundaries=compiled[0],
        tiers=compiled[1],
        holiday_calendar=holiday_calendar,
        holiday_tier=holiday_tier,
        makeup_workdays_as_weekdays=makeup == "weekday",
        provenance=provenance,
    )


def _read_windows(reader: Reader, raw: Any, entry: str) -> list[Window] | None:
    if not isinstance(raw, list):
        reader.fail(entry, "expected a list of {tier, days, hours}")
        return None
    windows: list[Window] = []
    for i, item in enumerate(raw):
        where = f"{entry}[{i}]"
        if not reader.mapping(item, where, {"tier", "days", "hours"}, {"tier", "days", "hours"}):
            return None
        tier = reader.text(item["tier"], f"{where}.tier")
        days = reader.days(item["days"], f"{where}.days")
        hours = reader.hours(item["hours"], f"{where}.hours")
        if tier is None or days is None or hours is None:
            return None
        windows.extend(
            Window(tier, day * 1440 + start, day * 1440 + end)
            for day in days
            for start, end in hours
        )
    return windows


def _compile_week(
    reader: Reader, windows: list[Window], default: str | None, entry: str
) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    """Lay the windows on the 10,080 minutes of a week; overlaps of different tiers and (without
    `otherwise`) uncovered minutes are errors, because either would make a price ambiguous."""
    week: list[str | None] = [None] * _WEEK
    for window in windows:
        for minute in range(window.start, window.end):
            slot = minute % _WEEK
            current = week[slot]
            if current is not None and current != window.tier:
                reader.fail(
                    entry,
                    f"tiers {current!r} and {window.tier!r} overlap at "
                    f"{format_minute_of_week(slot)}",
                )
                return None
            week[slot] = window.tier
    gaps = [m for m in range(_WEEK) if week[m] is None]
    if gaps and default is None:
        start = gaps[0]
        end = start
        while end + 1 < _WEEK and week[end + 1] is None:
            end += 1
        reader.fail(
            entry,
            f"no tier covers {format_minute_of_week(start)}-"
            f"{format_minute_of_week(end + 1)} ({len(gaps)} minutes of the week "
            "uncovered); add windows or an 'otherwise' tier",
        )
        return None
    filled = [slot if slot is not None else default for slot in week]
    boundaries: list[int] = []
    tiers: list[str] = []
    for minute, tier in enumerate(filled):
        assert tier is not None
        if not tiers or tiers[-1] != tier:
            boundaries.append(minute)
            tiers.append(tier)
    return tuple(boundaries), tuple(tiers)
