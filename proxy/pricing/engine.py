"""The pricing engine: usage + model + instant -> exact cost per currency.

Pure by design: the instant is an argument, nothing reads a clock or a file, so the same call
always prices the same way and any past instant can be re-priced. Money stays `Decimal` and is
never rounded here; rounding (if any) is a presentation concern.

Resolution, step by step:

1. the model's era in force at the instant (the latest one whose `effective` <= instant, so a
   change applies from its exact instant and one microsecond earlier still gets the old price);
2. aliases are followed to the billed model (``deepseek-chat`` at 2026-05 -> ``deepseek-v4-flash``);
3. a tiered version asks its schedule which tier the instant falls in, on the schedule's local
   calendar (Asia/Shanghai for DeepSeek: 01:30 UTC on a Monday is 09:30 Monday, peak);
4. tokens x rate per million, plus tool calls x fee per N calls.

Anything that cannot be priced (unknown model, retired, before its first price) comes back
``priced=False`` with a reason - never as a zero cost.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import MappingProxyType

from proxy.formats import ZERO as _ZERO
from proxy.pricing.model import (
    FLAT_TIER,
    AliasEra,
    Confidence,
    PriceBook,
    PriceVersion,
    Retirement,
    ScheduleVersion,
    ToolFeeVersion,
)
from proxy.usage import TokenUsage

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_COSTS: Mapping[str, Cost] = MappingProxyType({})

FLAG_NO_HOLIDAY_CALENDAR = "holiday_calendar_missing"
"""The instant's local year has no holiday calendar: the weekday rule was applied."""
FLAG_REASONING_EXCEEDS_OUTPUT = "reasoning_exceeds_output"
"""Reported reasoning tokens exceed output tokens, which DeepSeek's counts never do."""
FLAG_UNKNOWN_TOOL = "unknown_tool:"
"""Prefix: the usage names a tool the book has no fee for; those calls are not in the total."""


@dataclass(slots=True)
class Cost:
    """The cost of one call in one currency, by component. `total` is their exact sum.

    `Cost` and `Pricing` are never changed once built, but not declared frozen: they are built
    for every call, and a frozen dataclass's ``__init__`` costs several times a plain one's."""

    currency: str
    cache_hit: Decimal
    cache_miss: Decimal
    output: Decimal
    tool_calls: Decimal
    total: Decimal
    confidence: Confidence
    cache_savings: Decimal
    """What the cache-hit tokens would have cost at the cache-miss rate, minus what they cost."""


@dataclass(slots=True)
class Pricing:
    """How a call was (or could not be) priced.

    `version` is the id of the price version applied, `schedule_version` the id of the tier rule
    (None for flat prices), `tier` the tier name as the book spells it. When `priced` is False,
    `reason` says why and `costs` is empty.
    """

    model: str
    at: datetime
    priced: bool
    reason: str | None
    billed_model: str | None
    version: str | None
    schedule_version: str | None
    tier: str | None
    costs: Mapping[str, Cost]
    flags: tuple[str, ...]
    source: str | None


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
            return _via(chain, f"model {name!r} has no price before {_iso(eras[0].effective)}")
        era = eras[index]
        if isinstance(era, PriceVersion):
            return Resolution(era, tuple(chain))
        if isinstance(era, Retirement):
            return _via(chain, f"model {name!r} was retired at {_iso(era.effective)}: {era.reason}")
        assert isinstance(era, AliasEra)
        if era.target in chain:
            return _via(chain, f"alias cycle: {' -> '.join([*chain, era.target])}")
        chain.append(era.target)
        name = era.target


def _via(chain: list[str], reason: str) -> str:
    if len(chain) == 1:
        return reason
    return f"{chain[0]} is billed as {' -> '.join(chain[1:])}; {reason}"


def _iso(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def schedule_version_at(book: PriceBook, schedule: str, at_micros: int) -> ScheduleVersion | None:
    """The rule version of `schedule` in force at the instant, if any."""
    starts = book.schedule_starts.get(schedule)
    if starts is None:
        return None
    index = bisect_right(starts, at_micros) - 1
    return book.schedules[schedule][index] if index >= 0 else None


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
    starts = book.tool_fee_starts.get(tool)
    if starts is None:
        return None
    index = bisect_right(starts, at_micros) - 1
    return book.tool_fees[tool][index] if index >= 0 else None


@dataclass(frozen=True, slots=True)
class _PerToken:
    """One currency's rates per single token (the per-million rates scaled exactly), so a
    cost is one multiplication."""

    currency: str
    cache_hit: Decimal
    cache_miss: Decimal
    output: Decimal
    saving: Decimal
    """What a cache hit saves against a miss."""
    confidence: Confidence


@dataclass(frozen=True, slots=True)
class _Context:
    """What `price` looks up for a model at an instant before counting any token: the
    version (or why there is none), the schedule rule, the tier and its rates."""

    resolution: Resolution | None
    reason: str | None
    rule: ScheduleVersion | None
    tier: str
    flags: tuple[str, ...]
    rates: tuple[_PerToken, ...] = ()


def _per_token(version: PriceVersion, tier: str) -> tuple[_PerToken, ...]:
    return tuple(
        _PerToken(
            currency,
            rates.cache_hit.scaleb(-6),
            rates.cache_miss.scaleb(-6),
            rates.output.scaleb(-6),
            (rates.cache_miss - rates.cache_hit).scaleb(-6),
            version.provenance.for_currency(currency),
        )
        for currency, rates in version.tiers[tier].items()
    )


_MINUTE = 60_000_000
_MEMO_LIMIT = 4096
"""Cached (model, minute) lookups before the memo starts over: model names come from clients."""


def _context(book: PriceBook, model: str, at_micros: int, at: datetime) -> _Context:
    """The lookups for `model` at the instant, memoized per UTC minute where that is exact.

    The lookups change only when an era or a schedule rule starts (any instant) or when the
    local minute or day changes. A minute that contains no start, in a timezone whose offset
    is a whole number of minutes throughout it, has one answer for all its instants; only such
    minutes are cached, so the memo never changes a result (tests compare it with fresh
    lookups at every start, one microsecond either side).
    """
    minute = at_micros // _MINUTE
    memo = book.memo
    key = (model, minute)
    found = memo.get(key)
    if found is not None:
        return found  # type: ignore[return-value]
    context = _look_up(book, model, at_micros, at)
    if _uniform(book, minute, context.rule):
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        memo[key] = context
    return context


def _uniform(book: PriceBook, minute: int, rule: ScheduleVersion | None) -> bool:
    start, end = minute * _MINUTE, (minute + 1) * _MINUTE
    index = bisect_right(book.change_instants, start)
    if index < len(book.change_instants) and book.change_instants[index] < end:
        return False
    if rule is None:
        return True
    first = rule.timezone.utcoffset(_EPOCH + timedelta(microseconds=start))
    last = rule.timezone.utcoffset(_EPOCH + timedelta(microseconds=end - 1))
    return (
        first == last and first is not None and first.microseconds == 0 and first.seconds % 60 == 0
    )


def _look_up(book: PriceBook, model: str, at_micros: int, at: datetime) -> _Context:
    resolution = resolve(book, model, at_micros)
    if isinstance(resolution, str):
        return _Context(None, resolution, None, FLAT_TIER, ())
    version = resolution.version
    if version.schedule is None:
        return _Context(resolution, None, None, FLAT_TIER, (), _per_token(version, FLAT_TIER))
    rule = schedule_version_at(book, version.schedule, at_micros)
    if rule is None:
        at_utc = _EPOCH + timedelta(microseconds=at_micros)
        return _Context(
            resolution,
            f"schedule {version.schedule!r} has no rule in force at {_iso(at_utc)}",
            None,
            FLAT_TIER,
            (),
        )
    tier, flags = tier_at(book, rule, at)
    return _Context(resolution, None, rule, tier, flags, _per_token(version, tier))


def price(book: PriceBook, model: str, usage: TokenUsage, at: datetime) -> Pricing:
    """Price one call of `model` with `usage` at the aware instant `at`."""
    at_micros = to_micros(at)
    at_utc = at if at.tzinfo is UTC else _EPOCH + timedelta(microseconds=at_micros)
    context = _context(book, model, at_micros, at)
    resolution = context.resolution
    if resolution is None:
        return Pricing(
            model, at_utc, False, context.reason, None, None, None, None, _NO_COSTS, (), None
        )
    version = resolution.version
    if context.reason is not None:
        return Pricing(
            model,
            at_utc,
            False,
            context.reason,
            resolution.chain[-1],
            version.id,
            None,
            None,
            _NO_COSTS,
            (),
            version.provenance.source,
        )
    flags = context.flags
    if usage.reasoning > usage.output:
        flags = (*flags, FLAG_REASONING_EXCEEDS_OUTPUT)
    tool_fees: dict[str, Decimal] = {}
    if usage.tool_calls:
        found: list[str] = []
        tool_fees = _tool_fees(book, usage, at_micros, found)
        flags = (*flags, *found)
    hit_tokens, miss_tokens, output_tokens = usage.cache_hit, usage.cache_miss, usage.output
    costs = {}
    for rates in context.rates:
        hit = rates.cache_hit * hit_tokens
        miss = rates.cache_miss * miss_tokens
        out = rates.output * output_tokens
        tools = tool_fees.get(rates.currency, _ZERO)
        costs[rates.currency] = Cost(
            rates.currency,
            hit,
            miss,
            out,
            tools,
            hit + miss + out + tools,
            rates.confidence,
            rates.saving * hit_tokens,
        )
    return Pricing(
        model,
        at_utc,
        True,
        None,
        resolution.chain[-1],
        version.id,
        context.rule.id if context.rule is not None else None,
        context.tier,
        MappingProxyType(costs),
        flags,
        version.provenance.source,
    )


def _tool_fees(
    book: PriceBook, usage: TokenUsage, at_micros: int, flags: list[str]
) -> dict[str, Decimal]:
    """Per-currency fees for server-side tool calls; calls before a tool's first fee are free,
    as DeepSeek did not bill them then."""
    totals: dict[str, Decimal] = {}
    for tool, count in usage.tool_calls.items():
        if count == 0:
            continue
        if tool not in book.tool_fees:
            flags.append(FLAG_UNKNOWN_TOOL + tool)
            continue
        fee = tool_fee_at(book, tool, at_micros)
        if fee is None:
            continue
        for currency, amount in fee.fees.items():
            totals[currency] = totals.get(currency, _ZERO) + amount * count / fee.per_calls
    return totals
