"""Every row of the shared price timeline (shared/deepseek-prices.md), in both currencies.

Rates are read back by pricing exactly one million tokens of one kind, which makes the cost equal
to the per-million rate; the instants are taken inside each era and at its edges.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from proxy.pricing import PriceBook, Pricing, price
from proxy.pricing.model import AliasEra, Era, PriceVersion
from proxy.usage import TokenUsage

M = 1_000_000
US = timedelta(microseconds=1)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def rates(book: PriceBook, model: str, when: datetime, currency: str) -> str:
    """The three per-million rates in force, as DeepSeek's tables write them."""
    parts = []
    for usage in (TokenUsage(cache_hit=M), TokenUsage(cache_miss=M), TokenUsage(output=M)):
        pricing = price(book, model, usage, when)
        assert pricing.priced, pricing.reason
        parts.append(format(pricing.costs[currency].total.normalize(), "f"))
    return " / ".join(parts)


# model, instant, billed model, tier, CNY, USD
TIMELINE = [
    # 2024-12-26 V3 launch promotion
    (
        "deepseek-chat",
        "2024-12-26T00:00:00Z",
        "deepseek-chat",
        "standard",
        "0.1 / 1 / 2",
        "0.014 / 0.14 / 0.28",
    ),
    (
        "deepseek-chat",
        "2025-02-08T15:59:59.999999Z",
        "deepseek-chat",
        "standard",
        "0.1 / 1 / 2",
        "0.014 / 0.14 / 0.28",
    ),
    # 2025-01-20 R1, never in the promotion
    (
        "deepseek-reasoner",
        "2025-01-20T00:00:00Z",
        "deepseek-reasoner",
        "standard",
        "1 / 4 / 16",
        "0.14 / 0.55 / 2.19",
    ),
    (
        "deepseek-reasoner",
        "2025-02-08T16:00:00Z",
        "deepseek-reasoner",
        "standard",
        "1 / 4 / 16",
        "0.14 / 0.55 / 2.19",
    ),
    # 2025-02-08 16:00 UTC V3 full price
    (
        "deepseek-chat",
        "2025-02-08T16:00:00Z",
        "deepseek-chat",
        "standard",
        "0.5 / 2 / 8",
        "0.07 / 0.27 / 1.1",
    ),
    # 2025-02-26 16:30 UTC nightly discount 16:30-00:30 UTC
    (
        "deepseek-chat",
        "2025-02-26T16:30:00Z",
        "deepseek-chat",
        "night_discount",
        "0.25 / 1 / 4",
        "0.035 / 0.135 / 0.55",
    ),
    (
        "deepseek-chat",
        "2025-02-26T16:29:59.999999Z",
        "deepseek-chat",
        "standard",
        "0.5 / 2 / 8",
        "0.07 / 0.27 / 1.1",
    ),
    (
        "deepseek-chat",
        "2025-03-04T00:29:59.999999Z",
        "deepseek-chat",
        "night_discount",
        "0.25 / 1 / 4",
        "0.035 / 0.135 / 0.55",
    ),
    (
        "deepseek-chat",
        "2025-03-04T00:30:00Z",
        "deepseek-chat",
        "standard",
        "0.5 / 2 / 8",
        "0.07 / 0.27 / 1.1",
    ),
    (
        "deepseek-reasoner",
        "2025-03-04T20:00:00Z",
        "deepseek-reasoner",
        "night_discount",
        "0.25 / 1 / 4",
        "0.035 / 0.135 / 0.55",
    ),
    (
        "deepseek-reasoner",
        "2025-03-04T08:00:00Z",
        "deepseek-reasoner",
        "standard",
        "1 / 4 / 16",
        "0.14 / 0.55 / 2.19",
    ),
    # 2025-08-21 V3.1: prices unchanged, discount still running
    (
        "deepseek-chat",
        "2025-08-21T18:00:00Z",
        "deepseek-chat",
        "night_discount",
        "0.25 / 1 / 4",
        "0.035 / 0.135 / 0.55",
    ),
    (
        "deepseek-reasoner",
        "2025-08-22T06:00:00Z",
        "deepseek-reasoner",
        "standard",
        "1 / 4 / 16",
        "0.14 / 0.55 / 2.19",
    ),
    # 2025-09-05 16:00 UTC discount cancelled, one price
    (
        "deepseek-chat",
        "2025-09-05T16:00:00Z",
        "deepseek-chat",
        "standard",
        "0.5 / 4 / 12",
        "0.07 / 0.56 / 1.68",
    ),
    (
        "deepseek-reasoner",
        "2025-09-05T17:00:00Z",
        "deepseek-reasoner",
        "standard",
        "0.5 / 4 / 12",
        "0.07 / 0.56 / 1.68",
    ),
    (
        "deepseek-reasoner",
        "2025-09-05T15:59:59.999999Z",
        "deepseek-reasoner",
        "standard",
        "1 / 4 / 16",
        "0.14 / 0.55 / 2.19",
    ),
    (
        "deepseek-reasoner",
        "2025-09-05T00:29:59.999999Z",
        "deepseek-reasoner",
        "night_discount",
        "0.25 / 1 / 4",
        "0.035 / 0.135 / 0.55",
    ),
    # 2025-09-29 V3.2-Exp
    (
        "deepseek-chat",
        "2025-09-29T00:00:00Z",
        "deepseek-chat",
        "standard",
        "0.2 / 2 / 3",
        "0.028 / 0.28 / 0.42",
    ),
    (
        "deepseek-reasoner",
        "2025-10-15T12:00:00Z",
        "deepseek-reasoner",
        "standard",
        "0.2 / 2 / 3",
        "0.028 / 0.28 / 0.42",
    ),
    # 2025-12-01 V3.2, same prices
    (
        "deepseek-chat",
        "2025-12-01T00:00:00Z",
        "deepseek-chat",
        "standard",
        "0.2 / 2 / 3",
        "0.028 / 0.28 / 0.42",
    ),
    (
        "deepseek-reasoner",
        "2026-04-23T23:59:59.999999Z",
        "deepseek-reasoner",
        "standard",
        "0.2 / 2 / 3",
        "0.028 / 0.28 / 0.42",
    ),
    # 2026-04-24 V4 preview; chat/reasoner billed at the Flash price
    (
        "deepseek-v4-flash",
        "2026-04-24T00:00:00Z",
        "deepseek-v4-flash",
        "standard",
        "0.2 / 1 / 2",
        "0.028 / 0.14 / 0.28",
    ),
    (
        "deepseek-v4-pro",
        "2026-04-24T00:00:00Z",
        "deepseek-v4-pro",
        "standard",
        "0.25 / 3 / 6",
        "0.03625 / 0.435 / 0.87",
    ),
    (
        "deepseek-chat",
        "2026-04-24T00:00:00Z",
        "deepseek-v4-flash",
        "standard",
        "0.2 / 1 / 2",
        "0.028 / 0.14 / 0.28",
    ),
    (
        "deepseek-reasoner",
        "2026-04-25T00:00:00Z",
        "deepseek-v4-flash",
        "standard",
        "0.2 / 1 / 2",
        "0.028 / 0.14 / 0.28",
    ),
    # 2026-04-26 12:15 UTC cache-hit price cut to a tenth
    (
        "deepseek-v4-flash",
        "2026-04-26T12:15:00Z",
        "deepseek-v4-flash",
        "standard",
        "0.02 / 1 / 2",
        "0.0028 / 0.14 / 0.28",
    ),
    (
        "deepseek-v4-flash",
        "2026-04-26T12:14:59.999999Z",
        "deepseek-v4-flash",
        "standard",
        "0.2 / 1 / 2",
        "0.028 / 0.14 / 0.28",
    ),
    (
        "deepseek-v4-pro",
        "2026-04-26T12:15:00Z",
        "deepseek-v4-pro",
        "standard",
        "0.025 / 3 / 6",
        "0.003625 / 0.435 / 0.87",
    ),
    (
        "deepseek-chat",
        "2026-05-01T00:00:00Z",
        "deepseek-v4-flash",
        "standard",
        "0.02 / 1 / 2",
        "0.0028 / 0.14 / 0.28",
    ),
    # 2026-05-31 15:59 UTC Pro promotion made permanent: no change in effect
    (
        "deepseek-v4-pro",
        "2026-05-31T15:59:00Z",
        "deepseek-v4-pro",
        "standard",
        "0.025 / 3 / 6",
        "0.003625 / 0.435 / 0.87",
    ),
    # 2026-07-24 15:59 UTC chat/reasoner retired: last instant still billed as Flash
    (
        "deepseek-chat",
        "2026-07-24T15:58:59.999999Z",
        "deepseek-v4-flash",
        "standard",
        "0.02 / 1 / 2",
        "0.0028 / 0.14 / 0.28",
    ),
    # 2026-08-16 16:00 UTC peak/off-peak, every day (Beijing 09-12, 14-18)
    (
        "deepseek-v4-flash",
        "2026-08-17T01:00:00Z",
        "deepseek-v4-flash",
        "peak",
        "0.1 / 3 / 9",
        "0.014 / 0.44 / 1.32",
    ),
    (
        "deepseek-v4-flash",
        "2026-08-16T16:00:00Z",
        "deepseek-v4-flash",
        "off_peak",
        "0.05 / 1.5 / 4.5",
        "0.007 / 0.22 / 0.66",
    ),
    (
        "deepseek-v4-pro",
        "2026-08-17T06:00:00Z",
        "deepseek-v4-pro",
        "peak",
        "0.3 / 9 / 27",
        "0.044 / 1.32 / 3.96",
    ),
    (
        "deepseek-v4-pro",
        "2026-08-17T04:30:00Z",
        "deepseek-v4-pro",
        "off_peak",
        "0.15 / 4.5 / 13.5",
        "0.022 / 0.66 / 1.98",
    ),
    (
        "deepseek-v4-pro",
        "2026-08-16T15:59:59.999999Z",
        "deepseek-v4-pro",
        "standard",
        "0.025 / 3 / 6",
        "0.003625 / 0.435 / 0.87",
    ),
    # Saturday 2026-08-22 (Beijing) still under the every-day rule
    (
        "deepseek-v4-flash",
        "2026-08-22T02:00:00Z",
        "deepseek-v4-flash",
        "peak",
        "0.1 / 3 / 9",
        "0.014 / 0.44 / 1.32",
    ),
    # 2026-08-21 vision-exp at the Flash price
    (
        "deepseek-v4-flash-vision-exp",
        "2026-08-21T02:00:00Z",
        "deepseek-v4-flash",
        "peak",
        "0.1 / 3 / 9",
        "0.014 / 0.44 / 1.32",
    ),
    # 2026-08-22 16:00 UTC weekends off-peak
    (
        "deepseek-v4-flash",
        "2026-08-23T02:00:00Z",
        "deepseek-v4-flash",
        "off_peak",
        "0.05 / 1.5 / 4.5",
        "0.007 / 0.22 / 0.66",
    ),
    (
        "deepseek-v4-pro",
        "2026-08-24T02:00:00Z",
        "deepseek-v4-pro",
        "peak",
        "0.3 / 9 / 27",
        "0.044 / 1.32 / 3.96",
    ),
    # 2026-09-10 04:00 UTC V4.1 Flash GA as deepseek-flash; old names billed at its price
    (
        "deepseek-flash",
        "2026-09-10T04:00:00Z",
        "deepseek-flash",
        "off_peak",
        "0.02 / 1 / 4",
        "0.003 / 0.15 / 0.6",
    ),
    (
        "deepseek-flash",
        "2026-09-10T06:00:00Z",
        "deepseek-flash",
        "peak",
        "0.04 / 2 / 8",
        "0.006 / 0.3 / 1.2",
    ),
    (
        "deepseek-v4-flash",
        "2026-09-10T06:00:00Z",
        "deepseek-flash",
        "peak",
        "0.04 / 2 / 8",
        "0.006 / 0.3 / 1.2",
    ),
    (
        "deepseek-v4-flash",
        "2026-09-10T03:59:59.999999Z",
        "deepseek-v4-flash",
        "peak",
        "0.1 / 3 / 9",
        "0.014 / 0.44 / 1.32",
    ),
    (
        "deepseek-v4-flash-vision-exp",
        "2026-09-10T04:00:00Z",
        "deepseek-flash",
        "off_peak",
        "0.02 / 1 / 4",
        "0.003 / 0.15 / 0.6",
    ),
    (
        "deepseek-v4-pro",
        "2026-09-14T02:00:00Z",
        "deepseek-v4-pro",
        "peak",
        "0.3 / 9 / 27",
        "0.044 / 1.32 / 3.96",
    ),
    # by 2026-09-21 statutory holidays off-peak: Mid-Autumn Friday 09-25, National Day 10-01
    (
        "deepseek-flash",
        "2026-09-25T02:00:00Z",
        "deepseek-flash",
        "off_peak",
        "0.02 / 1 / 4",
        "0.003 / 0.15 / 0.6",
    ),
    (
        "deepseek-v4-pro",
        "2026-10-01T07:00:00Z",
        "deepseek-v4-pro",
        "off_peak",
        "0.15 / 4.5 / 13.5",
        "0.022 / 0.66 / 1.98",
    ),
    (
        "deepseek-flash",
        "2026-10-08T02:00:00Z",
        "deepseek-flash",
        "peak",
        "0.04 / 2 / 8",
        "0.006 / 0.3 / 1.2",
    ),
    # Current page (Oct-Nov 2026)
    (
        "deepseek-flash",
        "2026-11-27T07:00:00Z",
        "deepseek-flash",
        "peak",
        "0.04 / 2 / 8",
        "0.006 / 0.3 / 1.2",
    ),
    (
        "deepseek-flash",
        "2026-11-27T12:00:00Z",
        "deepseek-flash",
        "off_peak",
        "0.02 / 1 / 4",
        "0.003 / 0.15 / 0.6",
    ),
    (
        "deepseek-v4-pro",
        "2026-11-27T07:00:00Z",
        "deepseek-v4-pro",
        "peak",
        "0.3 / 9 / 27",
        "0.044 / 1.32 / 3.96",
    ),
    (
        "deepseek-v4-pro",
        "2026-11-28T07:00:00Z",
        "deepseek-v4-pro",
        "off_peak",
        "0.15 / 4.5 / 13.5",
        "0.022 / 0.66 / 1.98",
    ),
]


@pytest.mark.parametrize(("model", "instant", "billed", "tier", "cny", "usd"), TIMELINE)
def test_timeline_row(
    book: PriceBook, model: str, instant: str, billed: str, tier: str, cny: str, usd: str
) -> None:
    when = at(instant)
    pricing = price(book, model, TokenUsage(cache_miss=1), when)
    assert (pricing.billed_model, pricing.tier) == (billed, tier)
    assert rates(book, model, when, "CNY") == cny
    assert rates(book, model, when, "USD") == usd


def _applies(era: Era, pricing: Pricing) -> bool:
    """Whether `pricing` is what `era` produces: its own version, its alias, or no price."""
    if isinstance(era, PriceVersion):
        return pricing.version_id == era.id
    if isinstance(era, AliasEra):
        return pricing.priced and pricing.billed_model != era.model
    return not pricing.priced and "retired" in (pricing.reason or "")


def test_every_change_applies_from_its_exact_instant(book: PriceBook) -> None:
    """At each model change the instant itself gets the new entry and 1 us earlier the old."""
    checked = 0
    for name, eras in book.models.items():
        for previous, current in itertools.pairwise(eras):
            new = price(book, name, TokenUsage(cache_miss=M), current.effective)
            old = price(book, name, TokenUsage(cache_miss=M), current.effective - US)
            assert _applies(current, new), current.id
            assert _applies(previous, old), previous.id
            checked += 1
    assert checked == 21


@pytest.mark.parametrize(
    ("instant", "tier", "flags"),
    [
        # 01:30 UTC on a Monday is 09:30 Monday in Beijing: peak
        ("2026-11-02T01:30:00Z", "peak", ()),
        # 01:30 UTC on a Sunday is 09:30 Sunday in Beijing: weekend, off-peak
        ("2026-11-01T01:30:00Z", "off_peak", ()),
        # Sunday 17:00 UTC is Monday 01:00 Beijing: off-peak by the hour, not by the UTC weekday
        ("2026-11-01T17:00:00Z", "off_peak", ()),
        # Friday 18:00 Beijing ends the afternoon window; 1 us before is still peak
        ("2026-11-06T10:00:00Z", "off_peak", ()),
        ("2026-11-06T09:59:59.999999Z", "peak", ()),
        # Monday 09:00 Beijing starts the morning window
        ("2026-11-02T01:00:00Z", "peak", ()),
        ("2026-11-02T00:59:59.999999Z", "off_peak", ()),
        # lunch gap 12:00-14:00 Beijing
        ("2026-11-02T04:00:00Z", "off_peak", ()),
        ("2026-11-02T05:59:59Z", "off_peak", ()),
        ("2026-11-02T06:00:00Z", "peak", ()),
        # Friday 23:30 UTC is Saturday 07:30 Beijing
        ("2026-11-06T23:30:00Z", "off_peak", ()),
        # Offsets other than UTC give the same instant
        ("2026-11-02T09:30:00+08:00", "peak", ()),
        ("2026-11-01T20:30:00-05:00", "peak", ()),
        # holidays (by Beijing date): National Day Thursday, New Year's Day 2026 predates the rule
        ("2026-10-01T02:00:00Z", "off_peak", ()),
        ("2026-10-07T06:30:00Z", "off_peak", ()),
        ("2026-09-30T16:00:00Z", "off_peak", ()),  # 2026-10-01 00:00 Beijing
        ("2026-09-30T09:59:00Z", "peak", ()),  # Wednesday 17:59 Beijing, the eve of the holiday
        # make-up working days are weekend days under the Mon-Fri rule: stay off-peak
        ("2026-10-10T02:00:00Z", "off_peak", ()),
        # 2027 has no holiday calendar: its days fixed by law are holidays, flagged provisional
        # (New Year's Day, a Friday); other days follow the weekday rule, flagged missing
        ("2027-01-01T02:00:00Z", "off_peak", ("holiday_calendar_provisional",)),
        ("2027-01-02T02:00:00Z", "off_peak", ("holiday_calendar_missing",)),
        ("2027-01-04T02:00:00Z", "peak", ("holiday_calendar_missing",)),
        # 2026-12-31 16:00 UTC is already 2027 in Beijing
        ("2026-12-31T16:30:00Z", "off_peak", ("holiday_calendar_provisional",)),
        ("2026-12-31T15:30:00Z", "off_peak", ()),
    ],
)
def test_peak_tier_edges(book: PriceBook, instant: str, tier: str, flags: tuple[str, ...]) -> None:
    pricing = price(book, "deepseek-flash", TokenUsage(output=M), at(instant))
    assert (pricing.tier, pricing.flags) == (tier, flags)
    expected = {"peak": Decimal(8), "off_peak": Decimal(4)}[tier]
    assert pricing.costs["CNY"].total == expected


def test_rule_versions_replayed_exactly(book: PriceBook) -> None:
    """Each schedule version applies from its own instant, independent of the price versions."""
    saturday_under_everyday_rule = price(
        book, "deepseek-v4-flash", TokenUsage(output=M), at("2026-08-22T15:59:59.999999Z")
    )  # Sat 23:59 Beijing
    sunday_under_weekday_rule = price(
        book, "deepseek-v4-flash", TokenUsage(output=M), at("2026-08-22T16:00:00Z")
    )
    assert saturday_under_everyday_rule.schedule_version_id == "peak-hours@2026-08-16T16:00:00Z"
    assert sunday_under_weekday_rule.schedule_version_id == "peak-hours@2026-08-22T16:00:00Z"
    holiday_rule = price(book, "deepseek-flash", TokenUsage(output=M), at("2026-09-25T02:00:00Z"))
    assert holiday_rule.schedule_version_id == "peak-hours@2026-09-20T16:00:00Z"


@pytest.mark.parametrize(
    ("model", "instant", "reason"),
    [
        (
            "deepseek-chat",
            "2024-12-25T23:59:59.999999Z",
            "model 'deepseek-chat' has no price before 2024-12-26T00:00:00Z",
        ),
        (
            "deepseek-reasoner",
            "2025-01-19T23:59:59Z",
            "model 'deepseek-reasoner' has no price before 2025-01-20T00:00:00Z",
        ),
        (
            "deepseek-chat",
            "2026-07-24T15:59:00Z",
            "model 'deepseek-chat' was retired at 2026-07-24T15:59:00Z: "
            "requests with this name fail upstream",
        ),
        (
            "deepseek-reasoner",
            "2026-11-01T00:00:00Z",
            "model 'deepseek-reasoner' was retired at 2026-07-24T15:59:00Z: "
            "requests with this name fail upstream",
        ),
        (
            "deepseek-flash",
            "2026-09-10T03:59:59.999999Z",
            "model 'deepseek-flash' has no price before 2026-09-10T04:00:00Z",
        ),
        (
            "deepseek-v4-flash-vision-exp",
            "2026-08-20T23:00:00Z",
            "model 'deepseek-v4-flash-vision-exp' has no price before 2026-08-21T00:00:00Z",
        ),
        ("gpt-4o", "2026-11-01T00:00:00Z", "model 'gpt-4o' is not in the price book"),
    ],
)
def test_unpriced_never_zero(book: PriceBook, model: str, instant: str, reason: str) -> None:
    pricing = price(book, model, TokenUsage(cache_hit=5, cache_miss=5, output=5), at(instant))
    assert not pricing.priced
    assert pricing.reason == reason
    assert dict(pricing.costs) == {}
    assert pricing.version_id is None


def test_exact_arithmetic_without_rounding(book: PriceBook) -> None:
    usage = TokenUsage(cache_hit=123_456, cache_miss=7_890, output=4_321, reasoning=4_000)
    pricing = price(book, "deepseek-v4-pro", usage, at("2026-05-01T00:00:00Z"))
    usd = pricing.costs["USD"]
    assert usd.cache_hit == Decimal("0.000447528")
    assert usd.cache_miss == Decimal("0.00343215")
    assert usd.output == Decimal("0.00375927")
    assert usd.total == Decimal("0.007638948")
    cny = pricing.costs["CNY"]
    assert cny.total == Decimal("0.0030864") + Decimal("0.02367") + Decimal("0.025926")


def test_reasoning_is_inside_output_never_billed_twice(book: PriceBook) -> None:
    when = at("2026-11-27T12:00:00Z")
    plain = price(book, "deepseek-flash", TokenUsage(output=1000), when)
    thinking = price(book, "deepseek-flash", TokenUsage(output=1000, reasoning=800), when)
    assert thinking.costs["CNY"].total == plain.costs["CNY"].total == Decimal("0.004")
    odd = price(book, "deepseek-flash", TokenUsage(output=10, reasoning=11), when)
    assert odd.flags == ("reasoning_exceeds_output",)


def test_tool_call_fees(book: PriceBook) -> None:
    usage = TokenUsage(cache_miss=1000, output=100, tool_calls={"search": 3, "fetch": 1})
    before = price(book, "deepseek-flash", usage, at("2026-10-31T15:59:59.999999Z"))
    after = price(book, "deepseek-flash", usage, at("2026-10-31T16:00:00Z"))  # Sunday 00:00 BJ
    assert before.costs["CNY"].tool_calls == 0
    assert after.costs["CNY"].tool_calls == Decimal("0.020")
    assert after.costs["USD"].tool_calls == Decimal("0.003")
    assert after.costs["CNY"].total == Decimal("0.001") + Decimal("0.0004") + Decimal("0.02")
    unknown = price(
        book, "deepseek-flash", TokenUsage(tool_calls={"code": 2}), at("2026-11-01T00:00:00Z")
    )
    assert unknown.flags == ("unknown_tool:code",)
    assert unknown.costs["CNY"].total == 0


def test_confidence_and_source_travel_with_the_price(book: PriceBook) -> None:
    promo = price(book, "deepseek-chat", TokenUsage(output=1), at("2025-01-01T00:00:00Z"))
    assert promo.costs["CNY"].confidence.value == "verified"
    assert promo.costs["USD"].confidence.value == "unverified"
    assert promo.source == "https://api-docs.deepseek.com/news/news1226"


def test_cache_savings(book: PriceBook) -> None:
    pricing = price(
        book,
        "deepseek-flash",
        TokenUsage(cache_hit=640, cache_miss=360),
        at("2026-11-02T01:30:00Z"),
    )
    assert pricing.costs["CNY"].cache_savings == Decimal("0.0012544")  # 640 x (2 - 0.04) / 1M
    assert pricing.costs["USD"].cache_savings == Decimal("0.00018816")  # 640 x 0.294 / 1M
