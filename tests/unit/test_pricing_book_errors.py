"""`prices check` semantics: every defect is reported with file, entry and reason."""

from __future__ import annotations

import textwrap
from datetime import datetime
from decimal import Decimal

import pytest

from proxy.pricing import load_price_book, price
from proxy.usage import TokenUsage
from tests.support.book_files import Write, problems_of


def prov(indent: int) -> str:
    """`source` and `confidence` lines for an entry whose keys sit at `indent` columns."""
    return f"source: https://example.com/prices\n{' ' * indent}confidence: verified"


SRC = prov(10)

BASE = f"""
currencies: [CNY, USD]
schedules:
  peak:
    timezone: Asia/Shanghai
    versions:
      - from: 2026-01-01T00:00:00+08:00
        windows:
          - {{tier: peak, days: mon-fri, hours: ["09:00-12:00"]}}
        otherwise: off_peak
        {prov(8)}
models:
  alpha:
    - from: 2026-01-01T00:00:00Z
      rates: {{CNY: 1 / 2 / 3, USD: 0.1 / 0.2 / 0.3}}
      {prov(6)}
"""


def model_entry(body: str) -> str:
    return BASE + textwrap.indent(textwrap.dedent(body), "  ")


def test_base_book_is_valid(write: Write) -> None:
    book = load_price_book([write("a.yaml", BASE)])
    assert list(book.models) == ["alpha"]


def test_same_instant_twice_is_ambiguous(write: Write) -> None:
    path = write(
        "a.yaml",
        model_entry(f"""
      beta:
        - from: 2026-02-01T00:00:00Z
          rates: {{CNY: 1 / 1 / 1, USD: 1 / 1 / 1}}
          {SRC}
        - from: 2026-02-01T08:00:00+08:00
          rates: {{CNY: 2 / 2 / 2, USD: 2 / 2 / 2}}
          {SRC}
    """),
    )
    assert problems_of(path) == [
        "a.yaml: models.beta[1]: model 'beta' already has an entry effective at "
        "2026-02-01T00:00:00+00:00 (" + str(path) + ": models.beta[0]); which one applies "
        "would be ambiguous"
    ]


def test_overlap_across_files_names_both(write: Write) -> None:
    first = write("a.yaml", BASE)
    second = write(
        "b.yaml",
        """
        currencies: [CNY, USD]
        models:
          alpha:
            - from: 2026-01-01T00:00:00Z
              rates: {CNY: 9 / 9 / 9, USD: 9 / 9 / 9}
              source: https://example.com/other
              confidence: unverified
    """,
    )
    [problem] = problems_of(first, second)
    assert problem.startswith("b.yaml: models.alpha[0]: model 'alpha' already has an entry")
    assert "a.yaml: models.alpha[0]" in problem


def test_bad_timezone(write: Write) -> None:
    path = write("a.yaml", BASE.replace("Asia/Shanghai", "Asia/Beijing"))
    assert problems_of(path) == ["a.yaml: schedules.peak.timezone: unknown timezone 'Asia/Beijing'"]


def test_uncovered_hours(write: Write) -> None:
    path = write("a.yaml", BASE.replace("        otherwise: off_peak\n", ""))
    [problem] = problems_of(path)
    assert problem == (
        "a.yaml: schedules.peak.versions[0].windows: no tier covers mon 00:00-mon 09:00 "
        "(9180 minutes of the week uncovered); add windows or an 'otherwise' tier"
    )


def test_overlapping_windows_of_different_tiers(write: Write) -> None:
    path = write(
        "a.yaml",
        BASE.replace(
            '- {tier: peak, days: mon-fri, hours: ["09:00-12:00"]}',
            '- {tier: peak, days: mon-fri, hours: ["09:00-12:00"]}\n'
            '          - {tier: busy, days: fri, hours: ["11:30-13:00"]}',
        ),
    )
    assert problems_of(path) == [
        "a.yaml: schedules.peak.versions[0].windows: tiers 'peak' and 'busy' overlap at fri 11:30"
    ]


def test_negative_rate(write: Write) -> None:
    path = write("a.yaml", BASE.replace("1 / 2 / 3", "1 / -2 / 3"))
    assert problems_of(path) == ["a.yaml: models.alpha[0].rates.CNY.cache_miss: negative rate '-2'"]


def test_alias_to_unknown_model(write: Write) -> None:
    path = write(
        "a.yaml",
        model_entry(f"""
      beta:
        - from: 2026-03-01T00:00:00Z
          alias: gamma
          {SRC}
    """),
    )
    assert problems_of(path) == [
        "a.yaml: models.beta[0]: alias target 'gamma' is not a model in the price book"
    ]


def test_alias_cycle(write: Write) -> None:
    path = write(
        "a.yaml",
        model_entry(f"""
      beta:
        - from: 2026-03-01T00:00:00Z
          alias: gamma
          {SRC}
      gamma:
        - from: 2026-01-01T00:00:00Z
          rates: {{CNY: 1 / 1 / 1, USD: 1 / 1 / 1}}
          {SRC}
        - from: 2026-04-01T00:00:00Z
          alias: beta
          {SRC}
    """),
    )
    assert problems_of(path) == [
        "a.yaml: models.beta[0]: at 2026-04-01T00:00:00+00:00: beta is billed as gamma; "
        "alias cycle: beta -> gamma -> beta",
        "a.yaml: models.gamma[1]: at 2026-04-01T00:00:00+00:00: gamma is billed as beta; "
        "alias cycle: gamma -> beta -> gamma",
    ]


def test_alias_to_model_not_priced_yet_or_retired(write: Write) -> None:
    path = write(
        "a.yaml",
        model_entry(f"""
      beta:
        - from: 2025-12-01T00:00:00Z
          alias: alpha
          {SRC}
      delta:
        - from: 2026-01-02T00:00:00Z
          alias: alpha
          {SRC}
      alpha2:
        - from: 2026-01-01T00:00:00Z
          rates: {{CNY: 1 / 1 / 1, USD: 1 / 1 / 1}}
          {SRC}
    """).replace(
            "  alpha:\n",
            "  alpha:\n    - from: 2026-06-01T00:00:00Z\n"
            "      retired: gone\n      source: https://example.com/r\n"
            "      confidence: verified\n",
        ),
    )
    assert problems_of(path) == [
        "a.yaml: models.beta[0]: at 2025-12-01T00:00:00+00:00: beta is billed as alpha; "
        "model 'alpha' has no price before 2026-01-01T00:00:00Z",
        "a.yaml: models.delta[0]: at 2026-06-01T00:00:00+00:00: delta is billed as alpha; "
        "model 'alpha' was retired at 2026-06-01T00:00:00Z: gone",
    ]


def test_tiers_must_match_schedule(write: Write) -> None:
    path = write(
        "a.yaml",
        model_entry(f"""
      beta:
        - from: 2026-02-01T00:00:00Z
          schedule: peak
          tiers:
            peak: {{CNY: 2 / 2 / 2, USD: 2 / 2 / 2}}
            offpeak: {{CNY: 1 / 1 / 1, USD: 1 / 1 / 1}}
          {SRC}
    """),
    )
    assert problems_of(path) == [
        "a.yaml: models.beta[0]: no rates for tier(s) ['off_peak'] that schedule 'peak' uses "
        "while this version is in force",
        "a.yaml: models.beta[0]: tier(s) ['offpeak'] never occur in schedule 'peak' while this "
        "version is in force (a misspelt tier name?)",
    ]


def test_schedule_must_be_in_force_and_calendar_defined(write: Write) -> None:
    text = model_entry(f"""
      beta:
        - from: 2025-02-01T00:00:00Z
          schedule: peak
          tiers:
            peak: {{CNY: 2 / 2 / 2, USD: 2 / 2 / 2}}
            off_peak: {{CNY: 1 / 1 / 1, USD: 1 / 1 / 1}}
          {SRC}
    """).replace(
        "        otherwise: off_peak\n",
        "        otherwise: off_peak\n        holidays: {calendar: cn, tier: off_peak}\n",
    )
    problems = problems_of(write("a.yaml", text))
    assert problems == [
        "a.yaml: schedules.peak.versions[0]: holiday calendar 'cn' is not defined",
        "a.yaml: models.beta[0]: schedule 'peak' has no rule in force at "
        "2025-02-01T00:00:00+00:00 (its first begins 2026-01-01T00:00:00+08:00)",
    ]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "from: 2026-01-01T00:00:00Z",
            "from: 2026-01-01T00:00:00",
            "models.alpha[0].from: instant '2026-01-01T00:00:00' has no timezone offset; "
            "add Z or +08:00",
        ),
        (
            "from: 2026-01-01T00:00:00Z",
            "from: yesterday",
            "models.alpha[0].from: not an ISO 8601 instant: 'yesterday'",
        ),
        (
            "USD: 0.1 / 0.2 / 0.3",
            "USD: 0.1 / 0.2",
            "models.alpha[0].rates.USD: expected 'cache_hit / cache_miss / output', "
            "got '0.1 / 0.2'",
        ),
        (", USD: 0.1 / 0.2 / 0.3}", "}", "models.alpha[0].rates: missing key 'USD'"),
        (
            "rates: {CNY",
            "rate: {CNY",
            "models.alpha[0]: unknown key 'rate' (allowed: alias, confidence, from, id, label, "
            "note, rates, retired, schedule, source, tiers)",
        ),
        (
            "      source: https://example.com/prices",
            "      source: example.com",
            "models.alpha[0].source: expected an http(s) URL, got 'example.com'",
        ),
        (
            "      confidence: verified",
            "      confidence: sure",
            "models.alpha[0].confidence: confidence must be one of verified, third-party, "
            "unverified, got 'sure'",
        ),
        ("1 / 2 / 3", "1 / two / 3", "models.alpha[0].rates.CNY.cache_miss: not a number: 'two'"),
        (
            'hours: ["09:00-12:00"]',
            'hours: ["09:00-25:00"]',
            "schedules.peak.versions[0].windows[0].hours: time out of range in '09:00-25:00'",
        ),
        (
            "days: mon-fri",
            "days: weekdays",
            "schedules.peak.versions[0].windows[0].days: unknown day 'weekdays' "
            "(use mon..sun, ranges or 'daily')",
        ),
    ],
)
def test_field_errors(write: Write, old: str, new: str, expected: str) -> None:
    head, found, tail = BASE.rpartition(old)  # the last occurrence: the model entry's
    assert found
    assert problems_of(write("a.yaml", head + new + tail)) == [f"a.yaml: {expected}"]


def test_duplicate_key_and_bad_yaml(write: Write) -> None:
    dup = write("dup.yaml", BASE + "currencies: [CNY]\n")
    [problem] = problems_of(dup)
    assert problem.startswith("dup.yaml: (file): invalid YAML: ")
    assert "duplicate key 'currencies'" in problem
    broken = write("broken.yaml", "models: [\n")
    assert problems_of(broken)[0].startswith("broken.yaml: (file): invalid YAML:")


def test_currencies_must_agree_across_files(write: Write) -> None:
    other = write("b.yaml", "currencies: [CNY]\n")
    assert problems_of(write("a.yaml", BASE), other) == [
        "b.yaml: currencies: ['CNY'] differs from the other files' ['CNY', 'USD']; every "
        "file must price the same ones"
    ]


def test_every_problem_is_reported_not_just_the_first(write: Write) -> None:
    text = BASE.replace("1 / 2 / 3", "-1 / 2 / 3").replace("Asia/Shanghai", "Mars/Base")
    assert len(problems_of(write("a.yaml", text))) == 2


def test_floats_stay_exact_and_multiplier_is_a_shorthand(write: Write) -> None:
    path = write(
        "a.yaml",
        model_entry(f"""
      beta:
        - from: 2026-02-01T00:00:00Z
          schedule: peak
          tiers:
            peak: {{CNY: {{cache_hit: 0.135, cache_miss: 0.1, output: 3}}, USD: 0.1 / 0.2 / 0.3}}
            off_peak: {{base: peak, multiplier: 0.5}}
          {SRC}
    """),
    )
    book = load_price_book([path])
    offpeak = price(
        book,
        "beta",
        TokenUsage(cache_hit=1_000_000, cache_miss=1_000_000),
        datetime.fromisoformat("2026-02-07T10:00:00+08:00"),
    )  # Saturday
    assert offpeak.tier == "off_peak"
    assert offpeak.costs["CNY"].cache_hit == Decimal("0.0675")
    assert offpeak.costs["CNY"].cache_miss == Decimal("0.05")
    peak = price(
        book,
        "beta",
        TokenUsage(cache_hit=1_000_000),
        datetime.fromisoformat("2026-02-06T10:00:00+08:00"),
    )
    assert str(peak.costs["CNY"].cache_hit) == "0.135000000"


def test_windows_may_cross_midnight(write: Write) -> None:
    text = BASE.replace(
        '- {tier: peak, days: mon-fri, hours: ["09:00-12:00"]}',
        '- {tier: night, days: daily, hours: ["22:00-02:00"]}',
    ).replace("otherwise: off_peak", "otherwise: day")
    text = model_entry(f"""
      beta:
        - from: 2026-02-01T00:00:00Z
          schedule: peak
          tiers:
            night: {{CNY: 1 / 1 / 1, USD: 1 / 1 / 1}}
            day: {{CNY: 2 / 2 / 2, USD: 2 / 2 / 2}}
          {SRC}
    """).replace(BASE, text)
    book = load_price_book([write("a.yaml", text)])
    sunday_late = datetime.fromisoformat("2026-02-08T23:30:00+08:00")
    monday_early = datetime.fromisoformat("2026-02-09T01:59:00+08:00")
    monday_day = datetime.fromisoformat("2026-02-09T02:00:00+08:00")
    tiers = [
        price(book, "beta", TokenUsage(output=1), t).tier
        for t in (sunday_late, monday_early, monday_day)
    ]
    assert tiers == ["night", "night", "day"]


def test_shipped_book_digest_identifies_its_bytes(write: Write) -> None:
    one = load_price_book([write("a.yaml", BASE)])
    two = load_price_book([write("b.yaml", BASE + "\n# a comment\n")])
    assert one.digest != two.digest
    assert len(one.digest) == 64
