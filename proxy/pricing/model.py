"""The price book as frozen data: what the YAML files say, validated and ready to look up.

A model name has a *timeline*: a sorted list of eras, each effective from an exact instant until
the next one begins. An era is one of

- `PriceVersion` - the name is billed at its own rates (flat, or per tier of a schedule);
- `AliasEra` - the name is billed as another model (``deepseek-chat`` -> V4-Flash price);
- `Retirement` - requests with the name fail upstream; nothing can be billed.

A name *pattern* (``claude-opus*``) has a timeline of aliases and retirements too, for names
the book does not list one by one (`PatternEra`).

Tiered rates depend on a `Schedule` (time-of-week windows in a timezone), which has its own
versions because DeepSeek changed the *rules* (every day, then weekdays, then holidays excluded)
independently of the *rates*. Holiday dates live in `HolidayCalendar`s that say which years they
cover, so a year nobody has published yet is a visible state rather than a silent "peak" (and,
where the calendar names a rule, its days fixed by law are priced provisionally).

All money is `Decimal`; all instants are timezone-aware `datetime`s.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from types import MappingProxyType
from zoneinfo import ZoneInfo

TOKENS_PER_UNIT = 1_000_000
"""Token rates are quoted per one million tokens, as DeepSeek publishes them."""


class Confidence(enum.Enum):
    """How sure the book is of an entry (``[V]``, ``[3P]``, ``[?]`` in the price research)."""

    VERIFIED = "verified"
    THIRD_PARTY = "third-party"
    UNVERIFIED = "unverified"


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where an entry comes from, so a user can tell certain prices from best guesses.

    `confidence` is the entry's overall mark; `by_currency` refines it for rate entries whose
    currencies were sourced differently (DeepSeek's CNY page versus a third party's USD figure).
    """

    source: str
    confidence: Confidence
    note: str = ""
    by_currency: Mapping[str, Confidence] | None = None

    def for_currency(self, currency: str) -> Confidence:
        if self.by_currency and currency in self.by_currency:
            return self.by_currency[currency]
        return self.confidence


@dataclass(frozen=True, slots=True)
class TokenRates:
    """Prices per one million tokens in one currency."""

    cache_hit: Decimal
    cache_miss: Decimal
    output: Decimal


RateCard = Mapping[str, TokenRates]
"""Currency code -> rates."""


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """A model billed at its own rates from `effective` on.

    Flat versions have no schedule and one rate card, for the tier `FLAT_TIER`; tiered versions
    name a schedule and carry a rate card for every tier that schedule can produce.
    """

    id: str
    model: str
    effective: datetime
    label: str
    schedule: str | None
    rate_cards: Mapping[str, RateCard]
    """Tier name -> its rates (one tier, `FLAT_TIER`, for flat prices)."""
    provenance: Provenance


FLAT_TIER = "standard"
"""The tier name reported for calls priced by a version without a schedule."""


@dataclass(frozen=True, slots=True)
class AliasEra:
    """From `effective` on, the model name is billed exactly as `target` is at the same instant."""

    id: str
    model: str
    effective: datetime
    target: str
    provenance: Provenance


@dataclass(frozen=True, slots=True)
class Retirement:
    """From `effective` on, the model name is no longer served, so no call can be priced."""

    id: str
    model: str
    effective: datetime
    reason: str
    provenance: Provenance


Era = PriceVersion | AliasEra | Retirement

PatternEra = AliasEra | Retirement
"""An era of a name pattern (``claude-opus*``): names it matches are billed as a model, or fail.
Its `model` field holds the pattern. A pattern has no rates of its own: rates belong to models."""


ENDPOINT_NAMES = frozenset({"chat", "fim", "messages", "responses"})
"""The proxy's endpoint labels (a record's `endpoint`), which ``endpoint_fallbacks`` may name;
`proxy.app` routes only these (a test keeps the two in step)."""


def pattern_prefix(pattern: str) -> str:
    """The literal part of a pattern: ``claude-opus*`` -> ``claude-opus``."""
    return pattern[:-1]


@dataclass(frozen=True, slots=True)
class Window:
    """A tier applying on some days of the week between two local times, in minutes of the week.

    `start` and `end` count minutes from Monday 00:00 local time; `end` may pass the end of the
    week (Sunday 23:00-01:00 ends at minute 10,140), which lookups wrap back to Monday.
    """

    tier: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ScheduleVersion:
    """One version of a time-of-week rule.

    `boundaries`/`tiers` are the rule compiled for lookup: `tiers[i]` applies from minute
    `boundaries[i]` of the week to the next boundary. On a holiday of `holiday_calendar`, the
    whole local day is `holiday_tier`. Make-up working days (a weekend day worked in exchange for
    a holiday) keep their weekday's windows unless `makeup_workdays_as_weekdays` says otherwise.
    """

    id: str
    schedule: str
    effective: datetime
    timezone: ZoneInfo
    windows: tuple[Window, ...]
    default_tier: str | None
    boundaries: tuple[int, ...]
    tiers: tuple[str, ...]
    holiday_calendar: str | None
    holiday_tier: str | None
    makeup_workdays_as_weekdays: bool
    provenance: Provenance

    def tier_names(self) -> frozenset[str]:
        names = set(self.tiers)
        if self.holiday_tier is not None:
            names.add(self.holiday_tier)
        return frozenset(names)


@dataclass(frozen=True, slots=True)
class HolidayCalendar:
    """Public holidays (and make-up working days) for the years the calendar covers.

    `provisional` names a rule (`proxy.pricing.statutory.PROVISIONAL_RULES`) giving the holidays
    fixed by law for the years not in `years`: before a year's calendar is published, those days
    are priced as holidays and flagged provisional; a year in `years` keeps its published dates.
    """

    name: str
    years: frozenset[int]
    holidays: frozenset[date]
    workdays: frozenset[date]
    provenance: Provenance
    provisional: str | None = None


@dataclass(frozen=True, slots=True)
class ToolFeeVersion:
    """A per-call fee for a server-side tool, from `effective` on, quoted per `per_calls` calls."""

    id: str
    tool: str
    effective: datetime
    per_calls: int
    fees: Mapping[str, Decimal]
    provenance: Provenance


@dataclass(frozen=True, slots=True)
class PriceBook:
    """Everything the engine needs, indexed for lookup.

    Timelines are sorted by `effective`; the parallel `*_starts` tuples hold the same instants as
    POSIX microseconds so a lookup is one `bisect` on integers.
    """

    currencies: tuple[str, ...]
    models: Mapping[str, tuple[Era, ...]]
    model_starts: Mapping[str, tuple[int, ...]]
    schedules: Mapping[str, tuple[ScheduleVersion, ...]]
    schedule_starts: Mapping[str, tuple[int, ...]]
    calendars: Mapping[str, HolidayCalendar]
    tool_fees: Mapping[str, tuple[ToolFeeVersion, ...]]
    tool_fee_starts: Mapping[str, tuple[int, ...]]
    files: tuple[str, ...]
    digest: str
    """SHA-256 of the files' bytes: identifies which book priced a stored row."""
    patterns: Mapping[str, tuple[PatternEra, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """Name pattern (``claude-opus*``) -> its timeline; consulted only for names without an
    exact entry in force (`proxy.pricing.engine.resolve`)."""
    pattern_starts: Mapping[str, tuple[int, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    fallbacks: Mapping[str, tuple[PatternEra, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """Endpoint (``messages``) -> the timeline of the model DeepSeek serves there for a name it
    does not support (its Anthropic endpoint answers any such name as deepseek-v4-flash rather
    than refusing it); consulted only when the name itself cannot be priced. An era's `model`
    holds the endpoint."""
    fallback_starts: Mapping[str, tuple[int, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    change_instants: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """Every instant (POSIX microseconds) at which a model's or pattern's era or a schedule's
    rule starts: between two of them, only the time of day and the calendar day can change a
    price."""
    pattern_order: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)
    """(literal prefix, pattern), longest prefix first: the order in which patterns are tried,
    so the most specific one that matches wins."""

    def __post_init__(self) -> None:
        starts = {
            instant
            for timeline in (
                *self.model_starts.values(),
                *self.pattern_starts.values(),
                *self.fallback_starts.values(),
                *self.schedule_starts.values(),
            )
            for instant in timeline
        }
        object.__setattr__(self, "change_instants", tuple(sorted(starts)))
        order = sorted(self.patterns, key=lambda p: (-len(p), p))
        object.__setattr__(self, "pattern_order", tuple((pattern_prefix(p), p) for p in order))
