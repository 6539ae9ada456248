"""Endpoint fallbacks (`endpoint_fallbacks`): what a name nothing else prices is billed as on an
endpoint that serves it anyway.

DeepSeek's Anthropic endpoint does not refuse a model name it does not support: its guide says
such a name is served by deepseek-v4-flash (deepseek-chat before V4). The shipped book says so
for the ``messages`` endpoint only; on the others an unknown name stays unpriced.
"""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from proxy.app import ENDPOINTS
from proxy.pricing import PriceBook, Pricer, load_price_book, price
from proxy.pricing.engine import FLAG_ENDPOINT_FALLBACK, Resolution, resolve_on, to_micros
from proxy.pricing.model import ENDPOINT_NAMES
from proxy.usage import TokenUsage
from tests.support.book_files import Write, problems_of

SRC = "source: https://example.com/prices\n      confidence: verified"
USAGE = TokenUsage(cache_hit=12_345, cache_miss=6_789, output=4_321, reasoning=100)

SMALL = f"""
currencies: [CNY]
models:
  big:
    - from: 2026-01-01T00:00:00Z
      rates: {{CNY: 1 / 2 / 3}}
      {SRC}
  small:
    - from: 2026-01-01T00:00:00Z
      rates: {{CNY: 0.5 / 1 / 1.5}}
      {SRC}
    - from: 2026-06-01T00:00:00Z
      retired: gone
      {SRC}
model_patterns:
  claude*:
    - from: 2026-03-01T00:00:00Z
      alias: big
      {SRC}
endpoint_fallbacks:
  messages:
    - from: 2026-02-01T00:00:00Z
      alias: small
      {SRC}
    - from: 2026-05-01T00:00:00Z
      alias: big
      {SRC}
    - from: 2026-10-01T00:00:00Z
      retired: unsupported names are refused
      {SRC}
"""


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.fixture
def small(write: Write) -> PriceBook:
    return load_price_book([write("book.yaml", SMALL)])


# --- the shipped book -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "target"),
    [
        ("2025-09-01T10:00:00+08:00", "deepseek-chat"),
        ("2026-05-01T10:00:00+08:00", "deepseek-v4-flash"),
        ("2026-11-02T09:30:00+08:00", "deepseek-flash"),  # v4-flash is deepseek-flash's alias
    ],
)
def test_an_unsupported_name_on_messages_costs_what_the_fallback_costs(
    book: PriceBook, when: str, target: str
) -> None:
    mapped = price(book, "gpt-4o-mini", USAGE, at(when), "messages")
    direct = price(book, target, USAGE, at(when))
    assert mapped.priced and direct.priced
    assert mapped.model == "gpt-4o-mini"
    assert mapped.billed_model == direct.billed_model
    assert mapped.costs == direct.costs
    assert mapped.version_id == direct.version_id
    assert mapped.flags == (FLAG_ENDPOINT_FALLBACK,)
    assert direct.flags == ()


def test_the_fallback_in_figures(book: PriceBook) -> None:
    # Monday 09:30 Beijing is peak: deepseek-flash 0.04 / 2 / 8 CNY per 1M.
    pricing = price(
        book,
        "my-agent-model",
        TokenUsage(1_000_000, 1_000_000, 1_000),
        at("2026-11-02T09:30:00+08:00"),
        "messages",
    )
    assert pricing.billed_model == "deepseek-flash"
    assert pricing.costs["CNY"].total == Decimal("2.048")  # 0.04 + 2 + 0.008
    assert pricing.costs["USD"].total == Decimal("0.3072")  # 0.006 + 0.3 + 0.0012


@pytest.mark.parametrize("endpoint", ["", "chat", "fim", "responses"])
def test_other_endpoints_leave_an_unknown_name_unpriced(book: PriceBook, endpoint: str) -> None:
    pricing = price(book, "gpt-4o-mini", USAGE, at("2026-11-02T09:30:00+08:00"), endpoint)
    assert not pricing.priced and not pricing.costs
    assert pricing.reason == "model 'gpt-4o-mini' is not in the price book"


def test_known_names_and_patterns_come_before_the_fallback(book: PriceBook) -> None:
    when = at("2026-11-02T09:30:00+08:00")
    for model, billed in [
        ("deepseek-v4-pro", "deepseek-v4-pro"),
        ("claude-opus-4", "deepseek-v4-pro"),
    ]:
        pricing = price(book, model, USAGE, when, "messages")
        assert (pricing.billed_model, pricing.flags) == (billed, ())


def test_claude_names_before_their_patterns_fall_back(book: PriceBook) -> None:
    """Before the book's claude patterns begin, DeepSeek's endpoint still served claude names,
    as unsupported ones: the fallback of that time bills them."""
    when = at("2026-09-10T03:59:59.999999Z")
    assert not price(book, "claude-opus-4", USAGE, when).priced
    pricing = price(book, "claude-opus-4", USAGE, when, "messages")
    assert pricing.billed_model == "deepseek-v4-flash"
    assert pricing.flags == (FLAG_ENDPOINT_FALLBACK,)


def test_a_retired_name_on_messages_is_billed_as_the_fallback(book: PriceBook) -> None:
    """deepseek-chat is refused on chat since 2026-07-24; if the Anthropic endpoint served it
    (it had usage), it served it as its fallback model."""
    when = at("2026-11-02T09:30:00+08:00")
    assert not price(book, "deepseek-chat", USAGE, when, "chat").priced
    assert price(book, "deepseek-chat", USAGE, when, "messages").billed_model == "deepseek-flash"


def test_no_fallback_before_the_anthropic_endpoint_existed(book: PriceBook) -> None:
    pricing = price(book, "gpt-4o-mini", USAGE, at("2025-08-20T23:59:59.999999Z"), "messages")
    assert pricing.reason == "model 'gpt-4o-mini' is not in the price book"


def test_the_book_names_only_endpoints_the_proxy_routes() -> None:
    assert {endpoint.name for endpoint in ENDPOINTS} == ENDPOINT_NAMES


# --- dates, memo, resolution ------------------------------------------------------------------


def test_each_fallback_entry_applies_from_its_exact_instant(small: PriceBook) -> None:
    def billed(when: str) -> str | None:
        pricing = price(small, "x", USAGE, at(when), "messages")
        return pricing.billed_model if pricing.priced else pricing.reason

    assert billed("2026-01-31T23:59:59.999999Z") == "model 'x' is not in the price book"
    assert billed("2026-02-01T00:00:00Z") == "small"
    assert billed("2026-04-30T23:59:59.999999Z") == "small"
    assert billed("2026-05-01T00:00:00Z") == "big"
    assert billed("2026-10-01T00:00:00Z") == (
        "model 'x' is not in the price book; the messages endpoint has no fallback model since "
        "2026-10-01T00:00:00Z: unsupported names are refused"
    )


def test_a_retired_name_falls_back_while_the_fallback_prices(small: PriceBook) -> None:
    when = to_micros(at("2026-07-01T00:00:00Z"))
    found = resolve_on(small, "small", when, "messages")
    assert isinstance(found, Resolution)
    assert found.chain == ("small", "big")
    assert found.fallback == "messages"
    assert found.pattern is None


def test_the_fallback_starts_are_change_instants(small: PriceBook) -> None:
    for instant in ("2026-02-01T00:00:00Z", "2026-05-01T00:00:00Z", "2026-10-01T00:00:00Z"):
        assert to_micros(at(instant)) in small.change_instants


def test_pricer_memo_keeps_endpoints_apart(small: PriceBook) -> None:
    """One memo serves every endpoint: the same name in the same minute is priced on messages
    and unpriced on chat, whichever is asked first."""
    pricer = Pricer(small)
    start = datetime(2026, 5, 1, tzinfo=UTC)
    instants = [start + timedelta(microseconds=d) for d in (-1, 0, 1)]
    instants += [start + timedelta(minutes=17 * i) for i in range(50)]
    for when in [*instants, *reversed(instants)]:
        for endpoint in ("messages", "chat", "messages"):
            expected = price(small, "x", USAGE, when, endpoint)
            assert pricer.price("x", USAGE, when, endpoint) == expected
            assert pricer.resolve("x", when, endpoint) == resolve_on(
                small, "x", to_micros(when), endpoint
            )


# --- validation -------------------------------------------------------------------------------


def with_fallbacks(section: str) -> str:
    models = (
        "currencies: [CNY]\nmodels:\n  small:\n    - from: 2026-01-01T00:00:00Z\n"
        f"      rates: {{CNY: 1 / 1 / 1}}\n      {SRC}\n"
        "    - from: 2026-06-01T00:00:00Z\n      retired: gone\n"
        f"      {SRC}\n"
    )
    return models + "endpoint_fallbacks:\n" + textwrap.indent(textwrap.dedent(section), "  ")


def test_an_endpoint_the_proxy_does_not_route_is_an_error(write: Write) -> None:
    path = write(
        "a.yaml",
        with_fallbacks(f"""
        anthropic:
          - from: 2026-02-01T00:00:00Z
            alias: small
            {SRC.replace(chr(10) + "      ", chr(10) + "            ")}
        """),
    )
    assert problems_of(path) == [
        "a.yaml: endpoint_fallbacks.anthropic: not an endpoint of the proxy; expected one of "
        "['chat', 'fim', 'messages', 'responses']"
    ]


def test_an_unknown_fallback_target_is_an_error(write: Write) -> None:
    path = write(
        "a.yaml",
        with_fallbacks(f"""
        messages:
          - from: 2026-02-01T00:00:00Z
            alias: medium
            {SRC.replace(chr(10) + "      ", chr(10) + "            ")}
        """),
    )
    assert problems_of(path) == [
        "a.yaml: endpoint_fallbacks.messages[0]: alias target 'medium' is not a model in the "
        "price book"
    ]


def test_a_fallback_target_retired_under_it_is_an_error(write: Write) -> None:
    path = write(
        "a.yaml",
        with_fallbacks(f"""
        messages:
          - from: 2026-02-01T00:00:00Z
            alias: small
            {SRC.replace(chr(10) + "      ", chr(10) + "            ")}
        """),
    )
    assert problems_of(path) == [
        "a.yaml: endpoint_fallbacks.messages[0]: at 2026-06-01T00:00:00+00:00: model 'small' was "
        "retired at 2026-06-01T00:00:00Z: gone"
    ]


def test_two_fallback_entries_at_one_instant_across_files(write: Write) -> None:
    entry = f"""
    endpoint_fallbacks:
      messages:
        - from: 2026-02-01T00:00:00Z
          alias: small
          {SRC.replace(chr(10) + "      ", chr(10) + "          ")}
    """
    first = write("a.yaml", with_fallbacks("{}").replace("endpoint_fallbacks:\n  {}", ""))
    second = write("b.yaml", "currencies: [CNY]\n" + textwrap.dedent(entry))
    third = write("c.yaml", "currencies: [CNY]\n" + textwrap.dedent(entry))
    problems = [p.replace(f"{second.parent}/", "") for p in problems_of(first, second, third)]
    assert problems == [
        "c.yaml: endpoint_fallbacks.messages[0]: fallback 'messages' already has an entry "
        "effective at 2026-02-01T00:00:00+00:00 (b.yaml: endpoint_fallbacks.messages[0]); which "
        "one applies would be ambiguous",
        "c.yaml: endpoint_fallbacks.messages[0]: at 2026-06-01T00:00:00+00:00: model 'small' was "
        "retired at 2026-06-01T00:00:00Z: gone",
    ]


def test_fallback_entries_carry_no_rates(write: Write) -> None:
    path = write(
        "a.yaml",
        with_fallbacks(f"""
        messages:
          - from: 2026-02-01T00:00:00Z
            rates: {{CNY: 1 / 1 / 1}}
            {SRC.replace(chr(10) + "      ", chr(10) + "            ")}
        """),
    )
    problems = problems_of(path)
    assert problems[0].startswith("a.yaml: endpoint_fallbacks.messages[0]: ")
    assert "rates" in problems[0]
