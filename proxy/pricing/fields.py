"""Readers for the scalar fields of a price-book file: instants, money, rates, days, hours.

Each reader takes the raw YAML value and the entry path, and either returns the parsed value or
records a `BookProblem` and returns None, so one pass reports every defect in a file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from proxy.pricing.errors import BookProblem
from proxy.pricing.model import Confidence, Provenance, TokenRates

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS = re.compile(r"^(\d{2}):(\d{2})\s*-\s*(\d{2}):(\d{2})$")
_RATE_KEYS = ("cache_hit", "cache_miss", "output")
_URL = re.compile(r"^https?://\S+$")
PROVENANCE_KEYS = {"source", "confidence", "note"}
"""Keys every entry may carry to say where it comes from (`Reader.provenance`)."""


def utc_id(name: str, instant: datetime) -> str:
    """The id of an entry that names none: ``deepseek-flash@2026-11-30T16:00:00Z``."""
    return f"{name}@{instant.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


class Reader:
    """Collects problems for one file while its entries are read."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[BookProblem] = []

    def fail(self, entry: str, reason: str) -> None:
        self.problems.append(BookProblem(self.file, entry, reason))

    def mapping(self, value: Any, entry: str, allowed: set[str], required: set[str]) -> bool:
        """Check that `value` is a mapping with only `allowed` keys and all `required` ones."""
        if not isinstance(value, Mapping):
            self.fail(entry, f"expected a mapping, got {type(value).__name__}")
            return False
        ok = True
        for key in value:
            if key not in allowed:
                self.fail(entry, f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
                ok = False
        for key in sorted(required - set(value)):
            self.fail(entry, f"missing key {key!r}")
            ok = False
        return ok

    def versions(self, raw: Any, entry: str) -> list[tuple[int, Any]]:
        """The dated entries of a name, numbered for their entry paths."""
        if not isinstance(raw, list) or not raw:
            self.fail(entry, "expected a non-empty list of dated entries")
            return []
        return list(enumerate(raw))

    def text(self, value: Any, entry: str) -> str | None:
        if isinstance(value, str) and value.strip():
            return value.strip()
        self.fail(entry, f"expected non-empty text, got {value!r}")
        return None

    def instant(self, value: Any, entry: str) -> datetime | None:
        """An ISO 8601 instant with an explicit offset (``Z`` or ``+08:00``)."""
        if not isinstance(value, str):
            self.fail(entry, f"expected an ISO 8601 instant, got {value!r}")
            return None
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            self.fail(entry, f"not an ISO 8601 instant: {value!r}")
            return None
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            self.fail(entry, f"instant {value!r} has no timezone offset; add Z or +08:00")
            return None
        return parsed

    def money(self, value: Any, entry: str) -> Decimal | None:
        """An exact non-negative amount; YAML floats arrive as their text, so none is rounded."""
        if isinstance(value, bool) or not isinstance(value, int | str):
            self.fail(entry, f"expected an amount, got {value!r}")
            return None
        try:
            amount = Decimal(str(value).strip())
        except InvalidOperation:
            self.fail(entry, f"not a number: {value!r}")
            return None
        if not amount.is_finite():
            self.fail(entry, f"not a finite number: {value!r}")
            return None
        if amount < 0:
            self.fail(entry, f"negative rate {value!r}")
            return None
        return amount

    def rates(self, value: Any, entry: str) -> TokenRates | None:
        """Rates as ``"hit / miss / output"`` (the way DeepSeek's tables read) or a mapping."""
        if isinstance(value, str):
            parts = [part.strip() for part in value.split("/")]
            if len(parts) != 3:
                self.fail(entry, f"expected 'cache_hit / cache_miss / output', got {value!r}")
                return None
            raw: Mapping[str, Any] = dict(zip(_RATE_KEYS, parts, strict=True))
        elif self.mapping(value, entry, set(_RATE_KEYS), set(_RATE_KEYS)):
            raw = value
        else:
            return None
        hit, miss, out = (self.money(raw[key], f"{entry}.{key}") for key in _RATE_KEYS)
        if hit is None or miss is None or out is None:
            return None
        return TokenRates(cache_hit=hit, cache_miss=miss, output=out)

    def confidence(
        self, value: Any, entry: str, currencies: tuple[str, ...]
    ) -> tuple[Confidence, Mapping[str, Confidence] | None] | None:
        """A mark, or one mark per currency; the overall mark is then the weakest of them."""
        if isinstance(value, Mapping):
            marks: dict[str, Confidence] = {}
            for currency, mark in value.items():
                if currency not in currencies:
                    self.fail(entry, f"confidence for unknown currency {currency!r}")
                    return None
                parsed = self._mark(mark, f"{entry}.{currency}")
                if parsed is None:
                    return None
                marks[currency] = parsed
            order = list(Confidence)
            weakest = max(marks.values(), key=order.index, default=Confidence.UNVERIFIED)
            return weakest, marks
        mark = self._mark(value, entry)
        return None if mark is None else (mark, None)

    def _mark(self, value: Any, entry: str) -> Confidence | None:
        try:
            return Confidence(value)
        except ValueError:
            choices = ", ".join(c.value for c in Confidence)
            self.fail(entry, f"confidence must be one of {choices}, got {value!r}")
            return None

    def provenance(
        self, raw: Mapping[str, Any], entry: str, currencies: tuple[str, ...] = ()
    ) -> Provenance | None:
        """`source` (a URL), `confidence` and an optional `note`, required on every entry."""
        source = raw.get("source")
        if not isinstance(source, str) or not _URL.match(source.strip()):
            self.fail(f"{entry}.source", f"expected an http(s) URL, got {source!r}")
            return None
        marks = self.confidence(raw.get("confidence"), f"{entry}.confidence", currencies)
        if marks is None:
            return None
        note = raw.get("note", "")
        if not isinstance(note, str):
            self.fail(f"{entry}.note", "expected text")
            return None
        return Provenance(source.strip(), marks[0], note.strip(), marks[1])

    def days(self, value: Any, entry: str) -> list[int] | None:
        """Weekday indexes (Monday = 0) from ``mon``, ``mon-fri``, ``[sat, sun]`` or ``daily``."""
        items = value if isinstance(value, list) else [value]
        result: set[int] = set()
        for item in items:
            token = str(item).strip().lower()
            if token in ("daily", "every day", "mon-sun"):
                result.update(range(7))
            elif "-" in token:
                first, _, last = token.partition("-")
                if first not in _DAYS or last not in _DAYS:
                    self.fail(entry, f"unknown day range {item!r}")
                    return None
                a, b = _DAYS.index(first), _DAYS.index(last)
                if b < a:
                    self.fail(entry, f"day range {item!r} runs backwards")
                    return None
                result.update(range(a, b + 1))
            elif token in _DAYS:
                result.add(_DAYS.index(token))
            else:
                self.fail(entry, f"unknown day {item!r} (use mon..sun, ranges or 'daily')")
                return None
        return sorted(result)

    def hours(self, value: Any, entry: str) -> list[tuple[int, int]] | None:
        """Local time ranges ``HH:MM-HH:MM`` as minute offsets; an end at or before the start
        crosses midnight into the next day."""
        items = value if isinstance(value, list) else [value]
        result = []
        for item in items:
            match = _HOURS.match(str(item).strip())
            if not match:
                self.fail(entry, f"expected 'HH:MM-HH:MM', got {item!r}")
                return None
            h1, m1, h2, m2 = (int(g) for g in match.groups())
            if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
                self.fail(entry, f"time out of range in {item!r}")
                return None
            start, end = h1 * 60 + m1, h2 * 60 + m2
            if end <= start:
                end += 24 * 60
            result.append((start, end))
        return result

    def dates(self, value: Any, entry: str) -> list[date] | None:
        """ISO dates and inclusive ranges ``2026-02-15..2026-02-23``."""
        if not isinstance(value, list):
            self.fail(entry, "expected a list of dates")
            return None
        result: list[date] = []
        for item in value:
            first, sep, last = str(item).partition("..")
            try:
                start = date.fromisoformat(first.strip())
                end = date.fromisoformat(last.strip()) if sep else start
            except ValueError:
                self.fail(entry, f"not a date or date range: {item!r}")
                return None
            if end < start:
                self.fail(entry, f"date range {item!r} runs backwards")
                return None
            while start <= end:
                result.append(start)
                start += timedelta(days=1)
        return result


def format_minute_of_week(minute: int) -> str:
    """``sat 09:30`` for minute 7,770 of the week (used in coverage errors)."""
    day, rest = divmod(minute % (7 * 1440), 1440)
    return f"{_DAYS[day]} {rest // 60:02d}:{rest % 60:02d}"
