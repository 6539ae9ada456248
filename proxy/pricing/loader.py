"""Loading price-book YAML files into a validated `PriceBook`.

Several files form one book (the shipped ``deepseek.yaml`` plus, say, a team's local additions):
models, name patterns, schedules, calendars and tool fees from all files are merged, and an
instant defined twice for the same name - in one file or across files - is an ambiguity,
reported with both places.
The file format is documented in ``config/pricing/README.md``; its sections are read by
`proxy.pricing.read_schedules` (calendars, schedules) and `proxy.pricing.read_models` (models,
name patterns, tool fees).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from proxy.pricing.engine import to_micros
from proxy.pricing.errors import BookProblem, PriceBookError
from proxy.pricing.fields import Reader
from proxy.pricing.model import (
    Era,
    HolidayCalendar,
    PatternEra,
    PriceBook,
    ScheduleVersion,
    ToolFeeVersion,
)
from proxy.pricing.read_models import read_fallback, read_model, read_pattern, read_tool_fees
from proxy.pricing.read_schedules import read_calendar, read_schedule
from proxy.pricing.validate import check_cross_references
from proxy.yamlfile import YamlError, load_yaml

_TOP_KEYS = {
    "book",
    "currencies",
    "calendars",
    "schedules",
    "models",
    "model_patterns",
    "endpoint_fallbacks",
    "tool_fees",
}


@dataclass
class _Parts:
    """Entries gathered from all files, each with the file and entry path it came from."""

    currencies: tuple[str, ...] | None = None
    eras: dict[str, list[tuple[Era, str, str]]] = field(default_factory=dict)
    patterns: dict[str, list[tuple[PatternEra, str, str]]] = field(default_factory=dict)
    fallbacks: dict[str, list[tuple[PatternEra, str, str]]] = field(default_factory=dict)
    schedules: dict[str, list[tuple[ScheduleVersion, str, str]]] = field(default_factory=dict)
    calendars: dict[str, tuple[HolidayCalendar, str]] = field(default_factory=dict)
    tool_fees: dict[str, list[tuple[ToolFeeVersion, str, str]]] = field(default_factory=dict)


def load_price_book(paths: Iterable[Path | str]) -> PriceBook:
    """Read, merge and validate price-book files; raise `PriceBookError` listing every defect."""
    files = [Path(p) for p in paths]
    if not files:
        raise PriceBookError([BookProblem("(none)", "files", "no price-book files given")])
    problems: list[BookProblem] = []
    parts = _Parts()
    digest = hashlib.sha256()
    for path in files:
        try:
            digest.update(path.read_bytes())
            document = load_yaml(path)
        except (OSError, YamlError) as exc:
            reason = exc.reason if isinstance(exc, YamlError) else f"cannot read: {exc}"
            problems.append(BookProblem(str(path), "(file)", reason))
            continue
        reader = Reader(str(path))
        _read_file(reader, document, parts)
        problems.extend(reader.problems)
    if problems:
        raise PriceBookError(problems)
    book = _assemble(parts, tuple(str(p) for p in files), digest.hexdigest(), problems)
    problems.extend(check_cross_references(book, _origins(parts)))
    if problems:
        raise PriceBookError(problems)
    return book


def _read_file(reader: Reader, document: Any, parts: _Parts) -> None:
    if not reader.mapping(document, "(file)", _TOP_KEYS, {"currencies"}):
        return
    currencies = document["currencies"]
    if (
        not isinstance(currencies, list)
        or not currencies
        or not all(isinstance(c, str) and c.isalpha() and c.isupper() for c in currencies)
    ):
        reader.fail("currencies", "expected a list of currency codes such as [CNY, USD]")
        return
    codes = tuple(currencies)
    if parts.currencies is None:
        parts.currencies = codes
    elif set(parts.currencies) != set(codes):
        reader.fail(
            "currencies",
            f"{list(codes)} differs from the other files' "
            f"{list(parts.currencies)}; every file must price the same ones",
        )
        return
    for name, raw in _named(reader, document, "calendars"):
        calendar = read_calendar(reader, name, raw)
        if calendar is None:
            continue
        if name in parts.calendars:
            reader.fail(f"calendars.{name}", f"also defined in {parts.calendars[name][1]}")
            continue
        parts.calendars[name] = (calendar, reader.file)
    for name, raw in _named(reader, document, "schedules"):
        for rule, entry in read_schedule(reader, name, raw):
            parts.schedules.setdefault(name, []).append((rule, reader.file, entry))
    for name, raw in _named(reader, document, "models"):
        for era, entry in read_model(reader, name, raw, codes):
            parts.eras.setdefault(name, []).append((era, reader.file, entry))
    for pattern, raw in _named(reader, document, "model_patterns"):
        for pattern_era, entry in read_pattern(reader, pattern, raw, codes):
            parts.patterns.setdefault(pattern, []).append((pattern_era, reader.file, entry))
    for endpoint, raw in _named(reader, document, "endpoint_fallbacks"):
        for fallback_era, entry in read_fallback(reader, endpoint, raw, codes):
            parts.fallbacks.setdefault(endpoint, []).append((fallback_era, reader.file, entry))
    for name, raw in _named(reader, document, "tool_fees"):
        for fee, entry in read_tool_fees(reader, name, raw, codes):
            parts.tool_fees.setdefault(name, []).append((fee, reader.file, entry))


def _named(reader: Reader, document: Mapping[str, Any], key: str) -> Iterable[tuple[str, Any]]:
    section = document.get(key, {})
    if not isinstance(section, Mapping):
        reader.fail(key, "expected a mapping of names to entries")
        return []
    return [(str(name), raw) for name, raw in section.items()]


class _Dated(Protocol):
    @property
    def effective(self) -> datetime: ...


_D = TypeVar("_D", bound=_Dated)


def _timeline(
    kind: str, name: str, entries: list[tuple[_D, str, str]], problems: list[BookProblem]
) -> tuple[tuple[_D, ...], tuple[int, ...]]:
    """Sort entries by instant; two entries at the same instant would make it ambiguous."""
    ordered = sorted(entries, key=lambda e: to_micros(e[0].effective))
    for (a, file_a, entry_a), (b, file_b, entry_b) in itertools.pairwise(ordered):
        if to_micros(a.effective) == to_micros(b.effective):
            problems.append(
                BookProblem(
                    file_b,
                    entry_b,
                    f"{kind} {name!r} already has an entry effective at "
                    f"{a.effective.isoformat()} ({file_a}: {entry_a}); "
                    "which one applies would be ambiguous",
                )
            )
    return tuple(e[0] for e in ordered), tuple(to_micros(e[0].effective) for e in ordered)


def _assemble(
    parts: _Parts, files: tuple[str, ...], digest: str, problems: list[BookProblem]
) -> PriceBook:
    models = {n: _timeline("model", n, e, problems) for n, e in parts.eras.items()}
    patterns = {n: _timeline("pattern", n, e, problems) for n, e in parts.patterns.items()}
    fallbacks = {n: _timeline("fallback", n, e, problems) for n, e in parts.fallbacks.items()}
    schedules = {n: _timeline("schedule", n, e, problems) for n, e in parts.schedules.items()}
    tools = {n: _timeline("tool", n, e, problems) for n, e in parts.tool_fees.items()}
    return PriceBook(
        currencies=parts.currencies or (),
        models=MappingProxyType({n: t[0] for n, t in models.items()}),
        model_starts=MappingProxyType({n: t[1] for n, t in models.items()}),
        schedules=MappingProxyType({n: t[0] for n, t in schedules.items()}),
        schedule_starts=MappingProxyType({n: t[1] for n, t in schedules.items()}),
        calendars=MappingProxyType({n: c for n, (c, _) in parts.calendars.items()}),
        tool_fees=MappingProxyType({n: t[0] for n, t in tools.items()}),
        tool_fee_starts=MappingProxyType({n: t[1] for n, t in tools.items()}),
        files=files,
        digest=digest,
        patterns=MappingProxyType({n: t[0] for n, t in patterns.items()}),
        pattern_starts=MappingProxyType({n: t[1] for n, t in patterns.items()}),
        fallbacks=MappingProxyType({n: t[0] for n, t in fallbacks.items()}),
        fallback_starts=MappingProxyType({n: t[1] for n, t in fallbacks.items()}),
    )


def _origins(parts: _Parts) -> dict[int, tuple[str, str]]:
    """Each entry object (by identity) -> its file and entry path, for cross-reference errors."""
    origins: dict[int, tuple[str, str]] = {}
    for group in (parts.eras, parts.patterns, parts.fallbacks, parts.schedules, parts.tool_fees):
        for entries in group.values():
            for obj, file, entry in entries:
                origins[id(obj)] = (file, entry)
    for name, (calendar, file) in parts.calendars.items():
        origins[id(calendar)] = (file, f"calendars.{name}")
    return origins
