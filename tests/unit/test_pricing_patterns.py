"""Name patterns (`model_patterns`): loading, validation errors, precedence and dated behaviour.

DeepSeek's Anthropic-format endpoint bills `claude-opus*` names as deepseek-v4-pro and every
other `claude*` name as deepseek-flash; the shipped book says so with two patterns.
"""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from proxy.pricing import PriceBook, Pricer, load_price_book, price
from proxy.pricing.engine import Resolution, resolve, to_micros
from proxy.usage import TokenUsage
from tests.support.book_files import Write, problems_of


def prov(indent: int) -> str:
    """`source` and `confidence` lines for an entry whose keys sit at `indent` columns."""
    return f"source: https://example.com/prices\n{' ' * indent}confidence: verified"


SRC = prov(6)
SRC12 = prov(12)

BOOK = f"""
currencies: [CNY, USD]
models:
  big:
    - from: 2026-01-01T00:00:00Z
      rates: {{CNY: 1 / 2 / 3, USD: 0.1 / 0.2 / 0.3}}
      {SRC}
  small:
    - from: 2026-01-01T00:00:00Z
      rates: {{CNY: 0.5 / 1 / 1.5, USD: 0.05 / 0.1 / 0.15}}
      {SRC}
  claude-special:
    - from: 2026-06-01T00:00:00Z
      rates: {{CNY: 7 / 7 / 7, USD: 0.7 / 0.7 / 0.7}}
      {SRC}
model_patterns:
  claude*:                        # listed first on purpose: order in the file does not matter
    - from: 2026-02-01T00:00:00Z
      alias: small
      {SRC}
    - from: 2026-09-01T00:00:00Z
      retired: no longer accepted
      {SRC}
  claude-opus*:
    - from: 2026-03-01T00:00:00Z
      alias: big
      {SRC}
"""

USAGE = TokenUsage(cache_hit=12_345, cache_miss=6_789, output=4_321, reasoning=100)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.fixture
def small_book(write: Write) -> PriceBook:
    return load_price_book([write("book.yaml", BOOK)])


def billed(book: PriceBook, model: str, when: str) -> str | None:
    pricing = price(book, model, USAGE, at(when))
    return pricing.billed_model if pricing.priced else pricing.reason


# --- the shipped book -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "target"),
    [
        ("claude-opus-4", "deepseek-v4-pro"),
        ("claude-opus-4-1-20250805", "deepseek-v4-pro"),
        ("claude-sonnet-4", "deepseek-flash"),
        ("claude-3-5-haiku-latest", "deepseek-flash"),
    ],
)
@pytest.mark.parametrize(
    "when", ["2026-09-10T04:00:00Z", "2026-11-02T09:30:00+08:00", "2026-11-07T09:30:00+08:00"]
)
def test_claude_name_costs_exactly_what_its_target_costs(
    book: PriceBook, requested: str, target: str, when: str
) -> None:
    """Same instant, same tokens: every component in every currency equal to the last decimal;
    the pricing names both the requested and the billed model."""
    mapped = price(book, requested, USAGE, at(when))
    direct = price(book, target, USAGE, at(when))
    assert mapped.priced and direct.priced
    assert mapped.model == requested
    assert mapped.billed_model == target
    assert mapped.costs == direct.costs
    assert (mapped.version_id, mapped.tier, mapped.schedule_version_id) == (
        direct.version_id,
        direct.tier,
        direct.schedule_version_id,
    )


def test_claude_opus_cost_in_figures(book: PriceBook) -> None:
    # Monday 09:30 Beijing is peak: Pro 0.3 / 9 / 27 CNY per 1M.
    pricing = price(
        book,
        "claude-opus-4",
        TokenUsage(1_000_000, 1_000_000, 1_000),
        at("2026-11-02T09:30:00+08:00"),
    )
    assert pricing.costs["CNY"].total == Decimal("9.327")  # 0.3 + 9 + 0.027


def test_claude_names_are_not_priced_before_the_mapping(book: PriceBook) -> None:
    before = price(book, "claude-opus-4", USAGE, at("2026-09-10T03:59:59.999999Z"))
    assert not before.priced and not before.costs
    assert before.reason == (
        "model 'claude-opus-4' matches pattern 'claude-opus*': no entry before 2026-09-10T04:00:00Z"
    )


def test_deepseek_names_are_unchanged_by_patterns(book: PriceBook) -> None:
    assert billed(book, "deepseek-v4-pro", "2026-11-02T01:30:00Z") == "deepseek-v4-pro"
    assert (
        billed(book, "gpt-4o", "2026-11-02T01:30:00Z") == "model 'gpt-4o' is not in the price book"
    )


def test_pricer_memo_agrees_for_pattern_names(book: PriceBook) -> None:
    pricer = Pricer(book)
    start = datetime(2026, 9, 10, 4, tzinfo=UTC)
    instants = [start + timedelta(microseconds=d) for d in (-1, 0, 1)]
    instants += [start + timedelta(minutes=30 * i) for i in range(2 * 48)]
    for model in ("claude-opus-4", "claude-sonnet-4", "claude", "deepseek-flash"):
        for when in [*instants, *reversed(instants)]:
            assert pricer.price(model, USAGE, when) == price(book, model, USAGE, when)


# --- precedence and dates ---------------------------------------------------------------------


def test_most_specific_pattern_wins_whatever_the_file_order(small_book: PriceBook) -> None:
    assert billed(small_book, "claude-opus-4", "2026-04-01T00:00:00Z") == "big"
    assert billed(small_book, "claude-sonnet-4", "2026-04-01T00:00:00Z") == "small"
    assert [p for _, p in small_book.pattern_order] == ["claude-opus*", "claude*"]


def test_the_resolution_names_the_pattern(small_book: PriceBook) -> None:
    found = resolve(small_book, "claude-opus-4", to_micros(at("2026-04-01T00:00:00Z")))
    assert isinstance(found, Resolution)
    assert found.chain == ("claude-opus-4", "big")
    assert found.pattern == "claude-opus*"
    exact = resolve(small_book, "big", to_micros(at("2026-04-01T00:00:00Z")))
    assert isinstance(exact, Resolution) and exact.pattern is None


def test_exact_name_wins_over_patterns_while_in_force(small_book: PriceBook) -> None:
    assert billed(small_book, "claude-special", "2026-06-01T00:00:00Z") == "claude-special"
    # Before its first entry the name goes through the patterns, so adding a model never
    # re-prices calls made before it.
    assert billed(small_book, "claude-special", "2026-05-31T23:59:59.999999Z") == "small"
    # ... and after the pattern is retired, the exact name is still priced.
    assert billed(small_book, "claude-special", "2026-10-01T00:00:00Z") == "claude-special"


def test_a_pattern_applies_from_its_exact_instant(small_book: PriceBook) -> None:
    assert billed(small_book, "claude-x", "2026-01-31T23:59:59.999999Z") == (
        "model 'claude-x' matches pattern 'claude*': no entry before 2026-02-01T00:00:00Z"
    )
    assert billed(small_book, "claude-x", "2026-02-01T00:00:00Z") == "small"


def test_a_specific_pattern_takes_part_only_from_its_first_entry(small_book: PriceBook) -> None:
    """Before `claude-opus*` begins, opus names still go through `claude*`: adding a specific
    pattern later leaves earlier calls as they were priced."""
    assert billed(small_book, "claude-opus-4", "2026-02-28T23:59:59.999999Z") == "small"
    assert billed(small_book, "claude-opus-4", "2026-03-01T00:00:00Z") == "big"


def test_a_retired_pattern_does_not_fall_back(small_book: PriceBook) -> None:
    assert billed(small_book, "claude-sonnet-4", "2026-09-01T00:00:00Z") == (
        "model 'claude-sonnet-4' matches pattern 'claude*': retired at 2026-09-01T00:00:00Z: "
        "no longer accepted"
    )
    # The more specific pattern is not retired.
    assert billed(small_book, "claude-opus-4", "2026-09-01T00:00:00Z") == "big"


def test_pattern_starts_are_change_instants(small_book: PriceBook) -> None:
    for instant in ("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "2026-09-01T00:00:00Z"):
        assert to_micros(at(instant)) in small_book.change_instants


# --- validation -------------------------------------------------------------------------------


def with_patterns(body: str) -> str:
    head = BOOK.split("model_patterns:", maxsplit=1)[0]
    return head + "model_patterns:\n" + textwrap.indent(textwrap.dedent(body), "  ")


SYNTAX = (
    "a pattern is a literal name prefix followed by one trailing '*' (e.g. 'claude-opus*'); "
    "no other wildcard, no whitespace, no bare '*'"
)


@pytest.mark.parametrize("pattern", ["claude", "'*'", "claude*x*", "'cl?ude*'", "'[c]laude*'"])
def test_invalid_pattern_syntax(write: Write, pattern: str) -> None:
    path = write(
        "a.yaml",
        with_patterns(f"""
        {pattern}:
          - from: 2026-02-01T00:00:00Z
            alias: small
            {SRC12}
        """),
    )
    assert problems_of(path) == [f"a.yaml: model_patterns.{pattern.strip(chr(39))}: {SYNTAX}"]


def test_unknown_alias_target(write: Write) -> None:
    path = write(
        "a.yaml",
        with_patterns(f"""
        claude*:
          - from: 2026-02-01T00:00:00Z
            alias: medium
            {SRC12}
        """),
    )
    assert problems_of(path) == [
        "a.yaml: model_patterns.claude*[0]: alias target 'medium' is not a model in the price book"
    ]


def test_alias_target_unpriced_in_the_patterns_era(write: Write) -> None:
    path = write(
        "a.yaml",
        with_patterns(f"""
        claude*:
          - from: 2025-12-01T00:00:00Z
            alias: small
            {SRC12}
        """),
    )
    assert problems_of(path) == [
        "a.yaml: model_patterns.claude*[0]: at 2025-12-01T00:00:00+00:00: billed as small; "
        "model 'small' has no price before 2026-01-01T00:00:00Z"
    ]


def test_alias_target_retired_under_the_pattern(write: Write) -> None:
    text = BOOK.replace(
        "  claude-special:",
        f"""    - from: 2026-05-01T00:00:00Z
      retired: gone
      {SRC}
  claude-special:""",
        1,
    )
    path = write("a.yaml", text)
    # `small` (listed second) is retired at 2026-05-01 while claude* still bills names as it.
    assert problems_of(path) == [
        "a.yaml: model_patterns.claude*[0]: at 2026-05-01T00:00:00+00:00: billed as small; "
        "model 'small' was retired at 2026-05-01T00:00:00Z: gone"
    ]


def test_same_pattern_at_the_same_instant_across_files(write: Write) -> None:
    first = write("a.yaml", BOOK)
    second = write(
        "b.yaml",
        f"""
        currencies: [CNY, USD]
        model_patterns:
          claude-opus*:
            - from: 2026-03-01T08:00:00+08:00
              alias: small
              {prov(14)}
        """,
    )
    assert problems_of(first, second) == [
        "b.yaml: model_patterns.claude-opus*[0]: pattern 'claude-opus*' already has an entry "
        f"effective at 2026-03-01T00:00:00+00:00 ({first}: model_patterns.claude-opus*[0]); "
        "which one applies would be ambiguous"
    ]


def test_same_pattern_twice_in_one_file(write: Write) -> None:
    path = write("a.yaml", BOOK + "  claude*:\n    - from: 2027-01-01T00:00:00Z\n")
    [problem] = problems_of(path)
    assert problem.startswith("a.yaml: (file): invalid YAML: duplicate key 'claude*' (line 34)")


def test_pattern_entries_carry_no_rates(write: Write) -> None:
    path = write(
        "a.yaml",
        with_patterns(f"""
        claude*:
          - from: 2026-02-01T00:00:00Z
            rates: {{CNY: 1 / 1 / 1, USD: 1 / 1 / 1}}
            {SRC12}
          - from: 2026-03-01T00:00:00Z
            alias: small
            retired: both
            {SRC12}
        """),
    )
    assert problems_of(path) == [
        "a.yaml: model_patterns.claude*[0]: unknown key 'rates' "
        "(allowed: alias, confidence, from, id, note, retired, source)",
        "a.yaml: model_patterns.claude*[1]: needs exactly one of 'alias' or 'retired'; "
        "found ['alias', 'retired']",
    ]


def test_pattern_entries_need_provenance(write: Write) -> None:
    path = write(
        "a.yaml",
        with_patterns("""
        claude*:
          - from: 2026-02-01T00:00:00Z
            alias: small
        """),
    )
    assert problems_of(path) == [
        "a.yaml: model_patterns.claude*[0]: missing key 'confidence'",
        "a.yaml: model_patterns.claude*[0]: missing key 'source'",
    ]
