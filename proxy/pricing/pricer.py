"""Pricing a call: usage + model + instant -> exact cost per currency, and the memo that keeps
the request path fast.

`price` is the pure function: the same call always prices the same way, and any past instant can
be re-priced. `Pricer` gives the same answers from a memo of lookups per model, endpoint and
UTC minute; the app owns one per price book and passes it where the request path prices calls,
so the `PriceBook` itself stays immutable. Money stays `Decimal` and is never rounded here; rounding
(if any) is a presentation concern.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import MappingProxyType

from proxy.formats import ZERO
from proxy.pricing.engine import (
    FLAG_ENDPOINT_FALLBACK,
    FLAG_REASONING_EXCEEDS_OUTPUT,
    FLAG_UNKNOWN_TOOL,
    Resolution,
    iso_instant,
    resolve_on,
    schedule_version_at,
    tier_at,
    to_micros,
    tool_fee_at,
)
from proxy.pricing.model import (
    FLAT_TIER,
    Confidence,
    PriceBook,
    PriceVersion,
    ScheduleVersion,
)
from proxy.usage import TokenUsage

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_COSTS: Mapping[str, Cost] = MappingProxyType({})


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

    `version_id` is the id of the price version applied, `schedule_version_id` the id of the tier
    rule (None for flat prices), `tier` the tier name as the book spells it. When `priced` is False,
    `reason` says why and `costs` is empty.
    """

    model: str
    at: datetime
    priced: bool
    reason: str | None
    billed_model: str | None
    version_id: str | None
    schedule_version_id: str | None
    tier: str | None
    costs: Mapping[str, Cost]
    flags: tuple[str, ...]
    source: str | None


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
        for currency, rates in version.rate_cards[tier].items()
    )


_MINUTE = 60_000_000
_MEMO_LIMIT = 4096
"""Cached (model, minute) lookups before the memo starts over: model names come from clients."""


class Pricer:
    """Prices calls with one price book, memoizing its lookups per model and UTC minute.

    The lookups change only when an era or a schedule rule starts (any instant) or when the
    local minute or day changes. A minute that contains no start, in a timezone whose offset
    is a whole number of minutes throughout it, has one answer for all its instants; only such
    minutes are cached, so the memo never changes a result (tests compare it with fresh
    lookups at every start, one microsecond either side). Not thread-safe, like the event loop
    that uses it.
    """

    __slots__ = ("_memo", "book")

    def __init__(self, book: PriceBook) -> None:
        self.book = book
        self._memo: dict[tuple[str, int, str], _Context] = {}

    @property
    def cached(self) -> int:
        """How many lookups the memo holds (for tests and diagnostics)."""
        return len(self._memo)

    def price(self, model: str, usage: TokenUsage, at: datetime, endpoint: str = "") -> Pricing:
        """Price one call of `model` on `endpoint` with `usage` at the aware instant `at`, as
        `price` does."""
        at_micros = to_micros(at)
        context = self._memo.get((model, at_micros // _MINUTE, endpoint))  # the hit, no call
        if context is None:
            context = self._context(model, at_micros, at, endpoint)
        return _priced(self.book, context, model, usage, at, at_micros)

    def resolve(self, model: str, at: datetime, endpoint: str = "") -> Resolution | str:
        """The price version for `model` on `endpoint` at the aware instant, or the reason
        there is none."""
        at_micros = to_micros(at)
        context = self._context(model, at_micros, at, endpoint)
        if context.resolution is not None:
            return context.resolution
        assert context.reason is not None
        return context.reason

    def _context(self, model: str, at_micros: int, at: datetime, endpoint: str) -> _Context:
        minute = at_micros // _MINUTE
        key = (model, minute, endpoint)
        found = self._memo.get(key)
        if found is not None:
            return found
        context = _look_up(self.book, model, at_micros, at, endpoint)
        if _uniform(self.book, minute, context.rule):
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = context
        return context


def price(
    book: PriceBook, model: str, usage: TokenUsage, at: datetime, endpoint: str = ""
) -> Pricing:
    """Price one call of `model` on `endpoint` with `usage` at the aware instant `at`, every
    lookup fresh. The endpoint matters only where the book gives it a fallback model
    (`proxy.pricing.engine.resolve_on`)."""
    at_micros = to_micros(at)
    context = _look_up(book, model, at_micros, at, endpoint)
    return _priced(book, context, model, usage, at, at_micros)


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


def _look_up(book: PriceBook, model: str, at_micros: int, at: datetime, endpoint: str) -> _Context:
    resolution = resolve_on(book, model, at_micros, endpoint)
    if isinstance(resolution, str):
        return _Context(None, resolution, None, FLAT_TIER, ())
    version = resolution.version
    noted = (FLAG_ENDPOINT_FALLBACK,) if resolution.fallback is not None else ()
    if version.schedule is None:
        return _Context(resolution, None, None, FLAT_TIER, noted, _per_token(version, FLAT_TIER))
    rule = schedule_version_at(book, version.schedule, at_micros)
    if rule is None:
        at_utc = _EPOCH + timedelta(microseconds=at_micros)
        return _Context(
            resolution,
            f"schedule {version.schedule!r} has no rule in force at {iso_instant(at_utc)}",
            None,
            FLAT_TIER,
            (),
        )
    tier, flags = tier_at(book, rule, at)
    return _Context(resolution, None, rule, tier, noted + flags, _per_token(version, tier))


def _priced(
    book: PriceBook,
    context: _Context,
    model: str,
    usage: TokenUsage,
    at: datetime,
    at_micros: int,
) -> Pricing:
    """The call's pricing, from the lookups for its model at its instant."""
    at_utc = at if at.tzinfo is UTC else _EPOCH + timedelta(microseconds=at_micros)
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
        tools = tool_fees.get(rates.currency, ZERO)
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
            totals[currency] = totals.get(currency, ZERO) + amount * count / fee.per_calls
    return totals
