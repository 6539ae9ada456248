"""How the proxy writes an instant and an amount of money as text: one rule for each.

Instants are ISO 8601 in UTC with a ``Z``. Where the text is stored and compared (the ledger),
it always carries six digits of microseconds, so the text's order is the time's order; elsewhere
(reports, price listings, the JSON form of a record) microseconds appear only when there are
any, as `datetime.isoformat` writes them.

Amounts are exact plain decimals: no exponent, no trailing zeros, never a float on the way.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

ZERO = Decimal(0)


def decimal_text(amount: Decimal) -> str:
    """Exact decimal text without exponent or trailing zeros (``0.00114560`` -> ``0.0011456``).

    ``str`` first, as it is about half the work of ``format(amount, "f")`` (the ledger writes
    four amounts per row); it gives an exponent only for very small or large amounts, which
    ``f`` then writes. Not `Decimal.normalize`, which rounds to the context's precision.
    """
    text = str(amount)
    if "E" in text:
        text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


_THREE_DIGITS = tuple(f"{n:03d}" for n in range(1000))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


class _SecondText:
    """The last second `iso_instant` formatted and its text up to the seconds, as one tuple,
    so a thread always reads a matching pair."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: tuple[int, str] = (0, "1970-01-01T00:00:00")


_SECOND_TEXT = _SecondText()


def iso_instant(instant: datetime, *, fixed_width: bool = False) -> str:
    """``2026-11-02T01:30:00Z``, or ``2026-11-02T01:30:00.250000Z`` when the instant has
    microseconds or `fixed_width` asks for them always (stored instants: text order is time
    order).

    The ledger writes four instants a row, and `datetime.isoformat` (or ``%``) was a tenth of
    its thread's work: the text up to the second is reused while instants stay in the same
    second, and the microseconds come from a table.
    """
    if instant.tzinfo is not UTC:
        instant = instant.astimezone(UTC)
    second = (instant - _EPOCH) // _SECOND
    cached, text = _SECOND_TEXT.last
    if second != cached:
        text = "%04d-%02d-%02dT%02d:%02d:%02d" % (  # noqa: UP031
            instant.year,
            instant.month,
            instant.day,
            instant.hour,
            instant.minute,
            instant.second,
        )
        _SECOND_TEXT.last = (second, text)
    micros = instant.microsecond
    if micros or fixed_width:
        return text + "." + _THREE_DIGITS[micros // 1000] + _THREE_DIGITS[micros % 1000] + "Z"
    return text + "Z"
