"""Properties of the engine over the shipped book: additive, monotone, one version per instant."""

from __future__ import annotations

from bisect import bisect_right
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pricing import Pricer, load_price_book, price
from proxy.pricing.engine import to_micros
from proxy.pricing.model import AliasEra, PriceVersion, Retirement
from proxy.usage import TokenUsage
from tests.conftest import SHIPPED_BOOK

BOOK = load_price_book([SHIPPED_BOOK])
PRICER = Pricer(BOOK)
"""Warm across examples, as the app's is across calls."""
MODELS = [*sorted(BOOK.models), "unknown-model"]

instants = st.datetimes(
    min_value=datetime(2024, 12, 1), max_value=datetime(2028, 1, 1), timezones=st.just(UTC)
)
counts = st.integers(min_value=0, max_value=10**9)
usages = st.builds(
    TokenUsage,
    cache_hit=counts,
    cache_miss=counts,
    output=counts,
    tool_calls=st.fixed_dictionaries(
        {"search": st.integers(0, 10**4), "fetch": st.integers(0, 10**4)}
    ),
)


def _add(a: TokenUsage, b: TokenUsage) -> TokenUsage:
    tools = {
        k: a.tool_calls.get(k, 0) + b.tool_calls.get(k, 0) for k in {*a.tool_calls, *b.tool_calls}
    }
    return TokenUsage(
        a.cache_hit + b.cache_hit, a.cache_miss + b.cache_miss, a.output + b.output, 0, tools
    )


@settings(max_examples=400)
@given(model=st.sampled_from(MODELS), at=instants, a=usages, b=usages)
def test_cost_is_additive(model: str, at: datetime, a: TokenUsage, b: TokenUsage) -> None:
    whole = price(BOOK, model, _add(a, b), at)
    one, two = price(BOOK, model, a, at), price(BOOK, model, b, at)
    assert whole.priced == one.priced == two.priced
    for currency, cost in whole.costs.items():
        assert cost.total == one.costs[currency].total + two.costs[currency].total
        assert cost.total == cost.cache_hit + cost.cache_miss + cost.output + cost.tool_calls


@settings(max_examples=400)
@given(model=st.sampled_from(MODELS), at=instants, base=usages, extra=usages)
def test_cost_is_monotone_and_never_negative(
    model: str, at: datetime, base: TokenUsage, extra: TokenUsage
) -> None:
    small = price(BOOK, model, base, at)
    large = price(BOOK, model, _add(base, extra), at)
    for currency, cost in small.costs.items():
        assert 0 <= cost.total <= large.costs[currency].total


@settings(max_examples=1000)
@given(
    model=st.sampled_from(MODELS),
    at=instants,
    offset=st.sampled_from([timedelta(0), timedelta(hours=8), timedelta(hours=-5)]),
)
def test_every_instant_resolves_to_exactly_one_era(
    model: str, at: datetime, offset: timedelta
) -> None:
    """Brute force over the timeline: exactly one era contains the instant (or none before the
    first), and the engine applies that one, whatever offset the instant is written in."""
    local = at.astimezone(timezone(offset))
    pricing = price(BOOK, model, TokenUsage(output=1), local)
    assert pricing.at == at
    eras = BOOK.models.get(model, ())
    t = to_micros(at)
    containing = [
        era
        for i, era in enumerate(eras)
        if to_micros(era.effective) <= t
        and (i + 1 == len(eras) or t < to_micros(eras[i + 1].effective))
    ]
    assert len(containing) <= 1
    if not containing:
        assert not pricing.priced
        return
    era = containing[0]
    if isinstance(era, PriceVersion):
        assert pricing.version_id == era.id
    elif isinstance(era, Retirement):
        assert not pricing.priced
    else:
        assert isinstance(era, AliasEra)
        target = price(BOOK, era.target, TokenUsage(output=1), at)
        assert (pricing.version_id, pricing.tier) == (target.version_id, target.tier)
    if pricing.priced:
        assert pricing.tier is not None
        starts = BOOK.model_starts[model]
        assert bisect_right(starts, t) >= 1


def _near_changes() -> list[datetime]:
    """Every start in the book, and instants around it down to the microsecond and across the
    minute that holds it; plus every tier boundary hour of one Beijing week."""
    found = []
    for micros in BOOK.change_instants:
        start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
        minute = start.replace(second=0, microsecond=0)
        for instant in (start, minute, minute + timedelta(seconds=59, microseconds=999_999)):
            found += [instant + timedelta(microseconds=d) for d in (-1, 0, 1)]
    week = datetime(2026, 9, 27, 16, tzinfo=UTC)  # Monday 00:00 in Beijing
    found += [
        week + timedelta(minutes=30 * i, microseconds=d) for i in range(7 * 48) for d in (-1, 0)
    ]
    return found


def test_memo_gives_the_same_prices_as_fresh_lookups() -> None:
    """The per-minute memo (`proxy.pricing.Pricer`) never changes a result: prices at
    every start (one microsecond either side, and at both ends of its minute) and at every
    half hour of a week, warm and in shuffled order, equal prices from an empty memo."""
    usage = TokenUsage(cache_hit=123_457, cache_miss=98_765, output=4_321, tool_calls={"search": 3})
    instants = _near_changes()
    expected = {(m, at): price(BOOK, m, usage, at) for m in MODELS for at in instants}
    pricer = Pricer(BOOK)
    for at in [*reversed(instants), *instants]:
        for model in MODELS:
            assert pricer.price(model, usage, at) == expected[(model, at)], (model, at)
    assert pricer.cached  # the memo was used


@settings(max_examples=500)
@given(model=st.sampled_from(MODELS), at=instants, usage=usages)
def test_memo_agrees_with_fresh_lookups_anywhere(
    model: str, at: datetime, usage: TokenUsage
) -> None:
    warm = PRICER.price(model, usage, at)
    assert PRICER.price(model, usage, at) == warm == price(BOOK, model, usage, at)


MID_MINUTE_BOOK = """
currencies: [CNY]
schedules:
  hours:
    timezone: Asia/Shanghai
    versions:
      - from: 2026-03-01T00:00:00Z
        windows: [{tier: peak, days: daily, hours: ["09:00-12:00"]}]
        otherwise: off_peak
        source: https://example.com/prices
        confidence: verified
      - from: 2026-03-02T01:30:20.250000Z
        windows: [{tier: peak, days: daily, hours: ["08:00-12:00"]}]
        otherwise: off_peak
        source: https://example.com/prices
        confidence: verified
models:
  alpha:
    - from: 2026-03-01T00:00:00Z
      schedule: hours
      tiers:
        peak: {CNY: 1 / 2 / 3}
        off_peak: {CNY: 0.5 / 1 / 1.5}
      source: https://example.com/prices
      confidence: verified
    - from: 2026-03-02T01:30:40.000001Z
      rates: {CNY: 7 / 8 / 9}
      source: https://example.com/prices
      confidence: verified
  beta:
    - from: 2026-03-02T01:30:10Z
      alias: alpha
      source: https://example.com/prices
      confidence: verified
"""


def test_memo_skips_minutes_in_which_a_price_changes(tmp_path: Path) -> None:
    """Starts in the middle of a minute (a rule at :20.25, an alias at :10, a new version at
    :40.000001): every instant of that minute is looked up afresh, on both sides of each."""
    path = tmp_path / "book.yaml"
    path.write_text(MID_MINUTE_BOOK, encoding="utf-8")
    book = load_price_book([path])
    usage = TokenUsage(cache_hit=1_000_000, cache_miss=1_000_000, output=1_000_000)
    minute = datetime(2026, 3, 2, 1, 30, tzinfo=UTC)  # 09:30 in Beijing: peak either way
    pricer = Pricer(book)
    seen = []
    for step in range(0, 60_000_000, 250_000):  # every quarter second, twice over
        at = minute + timedelta(microseconds=step)
        for model in ("alpha", "beta"):
            first = pricer.price(model, usage, at)
            assert first == pricer.price(model, usage, at) == price(book, model, usage, at)
            seen.append(
                (
                    model,
                    step,
                    first.priced,
                    first.version_id,
                    first.costs["CNY"].total if first.priced else None,
                )
            )
    alpha = {step: total for model, step, _, _, total in seen if model == "alpha"}
    assert alpha[0] == alpha[40_000_000] == Decimal(6)  # peak, either rule
    assert alpha[40_250_000] == Decimal(24)  # the flat version from :40.000001
    beta = {step: priced for model, step, priced, _, _ in seen if model == "beta"}
    assert not beta[9_750_000] and beta[10_000_000]
    assert pricer.cached == 0  # nothing of that minute was cached
    early = datetime(2026, 3, 2, 0, 30, tzinfo=UTC)  # 08:30 Beijing: off-peak under rule 1
    assert pricer.price("alpha", usage, early).costs["CNY"].total == Decimal(3)
    assert pricer.cached == 1
