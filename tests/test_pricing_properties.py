"""Properties of the engine over the shipped book: additive, monotone, one version per instant."""

from __future__ import annotations

from bisect import bisect_right
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pricing import load_price_book, price
from proxy.pricing.engine import to_micros
from proxy.pricing.model import AliasEra, PriceVersion, Retirement
from proxy.usage import TokenUsage
from tests.conftest import SHIPPED_BOOK

BOOK = load_price_book([SHIPPED_BOOK])
MODELS = [*sorted(BOOK.models), "unknown-model"]

instants = st.datetimes(min_value=datetime(2024, 12, 1), max_value=datetime(2028, 1, 1),
                        timezones=st.just(UTC))
counts = st.integers(min_value=0, max_value=10**9)
usages = st.builds(TokenUsage, cache_hit=counts, cache_miss=counts, output=counts,
                   tool_calls=st.fixed_dictionaries({"search": st.integers(0, 10**4),
                                                     "fetch": st.integers(0, 10**4)}))


def _add(a: TokenUsage, b: TokenUsage) -> TokenUsage:
    tools = {k: a.tool_calls.get(k, 0) + b.tool_calls.get(k, 0)
             for k in {*a.tool_calls, *b.tool_calls}}
    return TokenUsage(a.cache_hit + b.cache_hit, a.cache_miss + b.cache_miss,
                      a.output + b.output, 0, tools)


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
def test_cost_is_monotone_and_never_negative(model: str, at: datetime, base: TokenUsage,
                                             extra: TokenUsage) -> None:
    small = price(BOOK, model, base, at)
    large = price(BOOK, model, _add(base, extra), at)
    for currency, cost in small.costs.items():
        assert 0 <= cost.total <= large.costs[currency].total


@settings(max_examples=1000)
@given(model=st.sampled_from(MODELS), at=instants,
       offset=st.sampled_from([timedelta(0), timedelta(hours=8), timedelta(hours=-5)]))
def test_every_instant_resolves_to_exactly_one_era(model: str, at: datetime,
                                                   offset: timedelta) -> None:
    """Brute force over the timeline: exactly one era contains the instant (or none before the
    first), and the engine applies that one, whatever offset the instant is written in."""
    local = at.astimezone(timezone(offset))
    pricing = price(BOOK, model, TokenUsage(output=1), local)
    assert pricing.at == at
    eras = BOOK.models.get(model, ())
    t = to_micros(at)
    containing = [era for i, era in enumerate(eras)
                  if to_micros(era.effective) <= t
                  and (i + 1 == len(eras) or t < to_micros(eras[i + 1].effective))]
    assert len(containing) <= 1
    if not containing:
        assert not pricing.priced
        return
    era = containing[0]
    if isinstance(era, PriceVersion):
        assert pricing.version == era.id
    elif isinstance(era, Retirement):
        assert not pricing.priced
    else:
        assert isinstance(era, AliasEra)
        target = price(BOOK, era.target, TokenUsage(output=1), at)
        assert (pricing.version, pricing.tier) == (target.version, target.tier)
    if pricing.priced:
        assert pricing.tier is not None
        starts = BOOK.model_starts[model]
        assert bisect_right(starts, t) >= 1
