"""The pricing engine's lookups: which price, tier rule, tier and tool fee are in force.

Pure by design: the instant is an argument, nothing reads a clock or a file, so the same call
always prices the same way and any past instant can be re-priced. Money stays `Decimal` and is
never rounded here; rounding (if any) is a presentation concern.

Resolution, step by step:

1. the model's era in force at the instant (the latest one whose `effective` <= instant, so a
   change applies from its exact instant and one microsecond earlier still gets the old price);
2. aliases are followed to the billed model (``deepseek-chat`` at 2026-05 -> ``deepseek-v4-flash``);
3. a tiered version asks its schedule which tier the instant falls in, on the schedule's local
   calendar (Asia/Shanghai for DeepSeek: 01:30 UTC on a Monday is 09:30 Monday, peak);
4. tokens x rate per million, plus tool calls x fee per N calls (`proxy.pricing.pricer`).

Anything that cannot be priced (unknown model, retired, before its first price) comes back
``priced=False`` with a reason - never as a zero cost.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from proxy.pricing.model import (
    AliasEra,
    PriceBook,
    PriceVersion,
    Retirement,
    ScheduleVersion,
    ToolFeeVersion,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_T = TypeVar("_T")

FLAG_NO_HOLIDAY_CALENDAR = "holiday_calendar_missing"
"""The instant's local year has no holiday calendar: the weekday rule was applied."""
FLAG_REASONING_EXCEEDS_OUTPUT = "reasoning_exceeds_output"
"""Reported reasoning tokens exceed output tokens, which DeepSeek's counts never do."""
FLAG_UNKNOWN_TOOL = "unknown_tool:"
"""Prefix: the usage names a tool the book has no fee for; those calls are not in the total."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """The price version that applies to a model name at an instant, after aliases."""

    version: PriceVersion
    chain: tuple[str, ...]
    """Names followed, requested model first, billed model last."""


def to_micros(instant: datetime) -> int:
    """POSIX microseconds of an aware instant (exact; used as the lookup key)."""
    if instant.tzinfo is None:
        raise ValueError("instant must be timezone-aware")
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def resolve(book: PriceBook, model: str, at_micros: int) -> Resolution | str:
    """The price version for `model` at the instant, or the reason there is none."""
    chain = [model]
    name = model
    while True:
        starts = book.model_starts.get(name)
        if starts is None:
            return _via(chain, f"model {name!r} is not in the price book")
        index = bisect_right(starts, at_micros) - 1
        eras = book.models[name]
        if index < 0:
            return _via(
                chain, f"model {name!r} has no price before {iso_instant(eras[0].effective)}"
            )
        era = eras[index]
        if isinstance(era, PriceVersion):
            return Resolution(era, tuple(chain))
        if isinstance(era, Retirement):
            return _via(
                chain, f"model {name!r} was retired at {iso_instant(era.effective)}: {era.reason}"
            )
        assert isinstance(era, AliasEra)
        if era.target in chain:
            return _via(chain, f"alias cycle: {' -> '.join([*chain, era.target])}")
        chain.append(era.target)
        name = era.target


def _via(chain: list[str], reason: str) -> str:
    if len(chain) == 1:
        return reason
    return f"{chain[0]} is billed as {' -> '.join(chain[1:])}; {reason}"


def iso_instant(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def schedule_version_at(book: PriceBook, schedule: str, at_micros: int) -> ScheduleVersion | None:
    """The rule version of `schedule` in force at the instant, if any."""
    return _in_force(book.schedules, book.schedule_starts, schedule, at_micros)


def tier_at(book: PriceBook, rule: ScheduleVersion, at: datetime) -> tuple[str, tuple[str, ...]]:
    """The tier of `rule` at the instant, judged on the rule's local calendar, and any flags."""
    local = at.astimezone(rule.timezone)
    minute_of_day = local.hour * 60 + local.minute
    weekday = local.weekday()
    flags: tuple[str, ...] = ()
    if rule.holiday_calendar is not None:
        calendar = book.calendars[rule.holiday_calendar]
        day = local.date()
        if day.year not in calendar.years:
            flags = (FLAG_NO_HOLIDAY_CALENDAR,)
        elif day in calendar.holidays:
            assert rule.holiday_tier is not None
            return rule.holiday_tier, flags
        elif rule.makeup_workdays_as_weekdays and day in calendar.workdays:
            weekday = 0
    index = bisect_right(rule.boundaries, weekday * 1440 + minute_of_day) - 1
    return rule.tiers[index], flags


def tool_fee_at(book: PriceBook, tool: str, at_micros: int) -> ToolFeeVersion | None:
    """The fee of `tool` in force at the instant (None: unknown tool, or not billed yet)."""
    return _in_force(book.tool_fees, book.tool_fee_starts, tool, at_micros)


def _in_force(
    timelines: Mapping[str, tuple[_T, ...]],
    starts: Mapping[str, tuple[int, ...]],
    name: str,
    at_micros: int,
) -> _T | None:
    """The entry of `name`'s timeline in force at the instant (None: no timeline, or not yet)."""
    found = starts.get(name)
    if found is None:
        return None
    index = bisect_right(found, at_micros) - 1
    return timelines[name][index] if index >= 0 else None
