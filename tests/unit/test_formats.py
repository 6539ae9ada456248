"""Instants and amounts as text (`proxy.formats`): exact, in UTC, and fixed-width where stored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.formats import decimal_text, iso_instant

SHANGHAI = ZoneInfo("Asia/Shanghai")
OFFSETS = st.sampled_from([UTC, SHANGHAI, ZoneInfo("America/St_Johns")])


def utc_isoformat(instant: datetime, timespec: str = "auto") -> str:
    return instant.astimezone(UTC).isoformat(timespec=timespec).removesuffix("+00:00") + "Z"


@given(st.datetimes(timezones=OFFSETS))
def test_fixed_width_text_is_utc_isoformat_with_microseconds(instant: datetime) -> None:
    assert iso_instant(instant, fixed_width=True) == utc_isoformat(instant, "microseconds")


@given(st.datetimes(timezones=OFFSETS))
def test_text_is_utc_isoformat(instant: datetime) -> None:
    assert iso_instant(instant) == utc_isoformat(instant)


def test_microseconds_appear_when_there_are_any_or_when_asked_for() -> None:
    whole = datetime(2026, 11, 2, 9, 30, tzinfo=SHANGHAI)
    assert iso_instant(whole) == "2026-11-02T01:30:00Z"
    assert iso_instant(whole, fixed_width=True) == "2026-11-02T01:30:00.000000Z"
    assert iso_instant(whole + timedelta(microseconds=250_000)) == "2026-11-02T01:30:00.250000Z"


def test_text_is_right_when_instants_share_or_cross_a_second() -> None:
    """`iso_instant` reuses the text of the last second it formatted: instants on both sides
    of second boundaries, alternating, in several offsets and years far apart."""
    base = datetime(2026, 11, 28, 23, 59, 59, tzinfo=UTC)
    instants = [
        base + timedelta(microseconds=d)
        for d in (0, 999_999, 1_000_000, 999_998, 1_000_001, 0, 60_000_000, 59_999_999)
    ]
    instants += [
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        base.astimezone(SHANGHAI),
    ]
    for instant in [*instants, *reversed(instants), *instants]:
        assert iso_instant(instant, fixed_width=True) == utc_isoformat(instant, "microseconds")
        assert iso_instant(instant) == utc_isoformat(instant)


@given(st.decimals(allow_nan=False, allow_infinity=False, places=None))
def test_decimal_text_is_exact_plain_decimal(amount: Decimal) -> None:
    """No exponent, no trailing zeros, and the same number back."""
    text = decimal_text(amount)
    assert "E" not in text and "e" not in text
    assert Decimal(text) == amount
    if "." in text:
        assert not text.endswith(("0", "."))


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("0.00114560", "0.0011456"),
        ("1E+2", "100"),
        ("100.0", "100"),
        ("-0.00", "0"),
        ("1E-9", "0.000000001"),
        ("12345678901234567890.123456789012345", "12345678901234567890.123456789012345"),
    ],
)
def test_decimal_text_examples(amount: str, text: str) -> None:
    assert decimal_text(Decimal(amount)) == text
