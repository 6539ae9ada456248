"""The pricing engine's lookups: which price, tier rule, tier and tool fee are in force.

Pure by design: the instant is an argument, nothing reads a clock or a file, so the same call
always prices the same way and any past instant can be re-priced. Money stays `Decimal` and is
never rounded here; rounding (if any) is a presentation concern.

Resolution, step by step:

1. the model's era in force at the instant (the latest one whose `effective` <= instant, so a
   change applies from its exact instant and one microsecond earlier still gets the old price);
2. aliases are followed to the billed model (``deepseek-chat`` at 2026-05 -> ``deepseek-v4-flash``);
   a name with no exact entry in force goes through the most specific name pattern in force
   (``claude-opus-4-1`` -> ``claude-opus*`` -> ``deepseek-v4-pro``);
3. a tiered version asks its schedule which tier the instant falls in, on the schedule's local
   calendar (Asia/Shanghai for DeepSeek: 01:30 UTC on a Monday is 09:30 Monday, peak), holidays
   included: a year with no published calendar still has the days fixed by law
   (`proxy.pricing.statutory`), priced as holidays and flagged provisional;
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
from proxy.pricing.statutory import provisional_days

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_T = TypeVar("_T")

FLAG_NO_HOLIDAY_CALENDAR = "holiday_calendar_missing"
"""The instant's local year has no holiday calendar: the weekday rule was applied."""
FLAG_PROVISIONAL_HOLIDAY = "holiday_calendar_provisional"
"""The instant's local year has no holiday calendar, but its local date is a holiday fixed by
law (the calendar's `provisional` rule, `proxy.pricing.statutory`): priced as a holiday until
the year's published calendar is in the book, which may then add bridging days but not remove
this one."""
FLAG_REASONING_EXCEEDS_OUTPUT = "reasoning_exceeds_output"
"""Reported reasoning tokens exceed output tokens, which DeepSeek's counts never do."""
FLAG_ENDPOINT_FALLBACK = "billed_as_endpoint_fallback"
"""The requested name has no price; it was billed as the model its endpoint serves such names as
(DeepSeek's Anthropic endpoint: deepseek-v4-flash)."""
FLAG_UNKNOWN_TOOL = "unknown_tool:"
"""Prefix: the usage names a tool the book has no fee for; those calls are not in the total."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """The price version that applies to a model name at an instant, after aliases."""

    version: PriceVersion
    chain: tuple[str, ...]
    """Names followed, requested model first, billed model last."""
    pattern: str | None = None
    """The name pattern (``claude-opus*``) that took the requested name to the billed model, if
    the book has no exact entry for the name in force."""
    fallback: str | None = None
    """The endpoint (``messages``) whose fallback model billed a name the book cannot price
    (`resolve_on`)."""


def to_micros(instant: datetime) -> int:
    """POSIX microseconds of an aware instant (exact; used as the lookup key)."""
    if instant.tzinfo is None:
        raise ValueError("instant must be timezone-aware")
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def resolve(
    book: PriceBook, model: str, at_micros: int, *, patterns: bool = True
) -> Resolution | str:
    """The price version for `model` at the instant, or the reason there is none.

    The exact name's entry in force decides; a name with none (unknown, or before its first
    entry) is matched against the book's patterns, most specific first (`match_pattern`).
    Alias targets are always exact names. `patterns=False` looks up exact names only.
    """
    chain = [model]
    name = model
    while True:
        starts = book.model_starts.get(name)
        index = -1 if starts is None else bisect_right(starts, at_micros) - 1
        if index < 0:
            if patterns and len(chain) == 1 and book.pattern_order:
                matched = match_pattern(book, model, at_micros)
                if matched is not None and (matched[1] or starts is None):
                    return _by_pattern(book, model, matched[0], at_micros)
            if starts is None:
                return _via(chain, f"model {name!r} is not in the price book")
            first = book.models[name][0].effective
            return _via(chain, f"model {name!r} has no price before {iso_instant(first)}")
        era = book.models[name][index]
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


def resolve_on(book: PriceBook, model: str, at_micros: int, endpoint: str) -> Resolution | str:
    """As `resolve`, for a call on `endpoint`: a name the book cannot price is billed as the
    endpoint's fallback model in force, when the book gives the endpoint one.

    Why: DeepSeek's Anthropic endpoint serves a name it does not support as its default model
    instead of refusing it, so such a call has usage and a price; on the other endpoints an
    unknown name is refused upstream, and a name DeepSeek serves that the book lacks must stay
    visibly unpriced rather than be guessed."""
    found = resolve(book, model, at_micros)
    if not isinstance(found, str) or endpoint not in book.fallbacks:
        return found
    era = _in_force(book.fallbacks, book.fallback_starts, endpoint, at_micros)
    if era is None:
        return found
    if isinstance(era, Retirement):
        return f"{found}; the {endpoint} endpoint has no fallback model since " + (
            f"{iso_instant(era.effective)}: {era.reason}"
        )
    target = resolve(book, era.target, at_micros, patterns=False)
    if isinstance(target, str):
        return f"{found}; the {endpoint} endpoint's fallback {era.target}: {target}"
    return Resolution(target.version, (model, *target.chain), fallback=endpoint)


def resolve_fallback(book: PriceBook, endpoint: str, at_micros: int) -> Resolution | str:
    """What the endpoint's fallback model is billed as at the instant (chain: the fallback's
    target, then the names followed), or the reason it cannot be billed."""
    era = _in_force(book.fallbacks, book.fallback_starts, endpoint, at_micros)
    if era is None:
        return f"no entry before {iso_instant(book.fallbacks[endpoint][0].effective)}"
    if isinstance(era, Retirement):
        return f"retired at {iso_instant(era.effective)}: {era.reason}"
    return resolve(book, era.target, at_micros, patterns=False)


def match_pattern(book: PriceBook, model: str, at_micros: int) -> tuple[str, bool] | None:
    """The pattern that applies to `model` at the instant: the one with the longest literal
    prefix among those in force (whose first entry has begun), with True; else the most
    specific matching pattern that has not begun yet, with False; None if none matches.

    A pattern takes part only from its first entry, so adding a more specific pattern later
    never re-prices earlier calls."""
    waiting: str | None = None
    for prefix, pattern in book.pattern_order:
        if model.startswith(prefix):
            if book.pattern_starts[pattern][0] <= at_micros:
                return pattern, True
            waiting = waiting or pattern
    return None if waiting is None else (waiting, False)


def resolve_pattern(book: PriceBook, pattern: str, at_micros: int) -> Resolution | str:
    """What names matching `pattern` are billed as at the instant (chain: the pattern, then
    the names followed), or the reason they cannot be billed."""
    era = _in_force(book.patterns, book.pattern_starts, pattern, at_micros)
    if era is None:
        return f"no entry before {iso_instant(book.patterns[pattern][0].effective)}"
    if isinstance(era, Retirement):
        return f"retired at {iso_instant(era.effective)}: {era.reason}"
    found = resolve(book, era.target, at_micros, patterns=False)
    if isinstance(found, str):
        return f"billed as {era.target}; {found}"
    return Resolution(found.version, (pattern, *found.chain), pattern)


def _by_pattern(book: PriceBook, model: str, pattern: str, at_micros: int) -> Resolution | str:
    found = resolve_pattern(book, pattern, at_micros)
    if isinstance(found, str):
        return f"model {model!r} matches pattern {pattern!r}: {found}"
    return Resolution(found.version, (model, *found.chain[1:]), pattern)


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
    """The tier of `rule` at the instant, judged on the rule's local calendar, and any flags.

    In a year its holiday calendar does not cover, a day the calendar's `provisional` rule
    fixes by law is a holiday, flagged `FLAG_PROVISIONAL_HOLIDAY`; every other day follows the
    weekday rule, flagged `FLAG_NO_HOLIDAY_CALENDAR`."""
    local = at.astimezone(rule.timezone)
    minute_of_day = local.hour * 60 + local.minute
    weekday = local.weekday()
    flags: tuple[str, ...] = ()
    if rule.holiday_calendar is not None:
        calendar = book.calendars[rule.holiday_calendar]
        day = local.date()
        if day.year not in calendar.years:
            if calendar.provisional is not None and day in provisional_days(
                calendar.provisional, day.year
            ):
                assert rule.holiday_tier is not None
                return rule.holiday_tier, (FLAG_PROVISIONAL_HOLIDAY,)
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
