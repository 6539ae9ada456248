"""Checks that span entries: schedules, calendars and alias targets that must exist and agree.

Single entries are checked while they are read (`proxy.pricing.loader`); what can only be seen
once the whole book is assembled is checked here, by asking the engine itself to resolve every
model at every instant where anything in the book changes. If the engine can resolve all of those
instants, it can resolve every instant in between, because nothing changes there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from proxy.pricing.engine import (
    Resolution,
    resolve,
    resolve_fallback,
    resolve_pattern,
    schedule_version_at,
)
from proxy.pricing.errors import BookProblem
from proxy.pricing.model import AliasEra, PriceBook, PriceVersion, ScheduleVersion

_Fail = Callable[[object, str], None]


def check_cross_references(
    book: PriceBook, origins: Mapping[int, tuple[str, str]]
) -> list[BookProblem]:
    """Every defect that involves more than one entry, each reported at the entry that owns it."""
    problems: list[BookProblem] = []

    def fail(obj: object, reason: str) -> None:
        file, entry = origins.get(id(obj), ("(book)", "(book)"))
        problems.append(BookProblem(file, entry, reason))

    for versions in book.schedules.values():
        for rule in versions:
            _check_rule_calendar(book, rule, fail)
    change_points = list(book.change_instants)
    for name, eras in book.models.items():
        starts = book.model_starts[name]
        for index, era in enumerate(eras):
            end = starts[index + 1] if index + 1 < len(eras) else None
            if isinstance(era, PriceVersion) and era.schedule is not None:
                _check_tiers(book, era, starts[index], end, fail)
            elif isinstance(era, AliasEra):
                _check_alias(
                    book, era, (starts[index], end), change_points, fail, _exact(book, name)
                )
    for timelines, all_starts, resolver in (
        (book.patterns, book.pattern_starts, _pattern),
        (book.fallbacks, book.fallback_starts, _fallback),
    ):
        for key, key_eras in timelines.items():
            starts = all_starts[key]
            for index, key_era in enumerate(key_eras):
                end = starts[index + 1] if index + 1 < len(key_eras) else None
                if isinstance(key_era, AliasEra):
                    span = (starts[index], end)
                    _check_alias(book, key_era, span, change_points, fail, resolver(book, key))
    return problems


_Resolver = Callable[[int], Resolution | str]


def _exact(book: PriceBook, name: str) -> _Resolver:
    return lambda instant: resolve(book, name, instant, patterns=False)


def _pattern(book: PriceBook, pattern: str) -> _Resolver:
    return lambda instant: resolve_pattern(book, pattern, instant)


def _fallback(book: PriceBook, endpoint: str) -> _Resolver:
    return lambda instant: resolve_fallback(book, endpoint, instant)


def _check_rule_calendar(book: PriceBook, rule: ScheduleVersion, fail: _Fail) -> None:
    if rule.holiday_calendar is not None and rule.holiday_calendar not in book.calendars:
        fail(rule, f"holiday calendar {rule.holiday_calendar!r} is not defined")


def _check_tiers(
    book: PriceBook, version: PriceVersion, start: int, end: int | None, fail: _Fail
) -> None:
    """A tiered version must rate every tier its schedule can produce while it is in force."""
    assert version.schedule is not None
    if version.schedule not in book.schedules:
        fail(version, f"schedule {version.schedule!r} is not defined")
        return
    if schedule_version_at(book, version.schedule, start) is None:
        first = book.schedules[version.schedule][0].effective
        fail(
            version,
            f"schedule {version.schedule!r} has no rule in force at "
            f"{version.effective.isoformat()} (its first begins {first.isoformat()})",
        )
        return
    produced: set[str] = set()
    for rule_start, rule in zip(
        book.schedule_starts[version.schedule], book.schedules[version.schedule], strict=True
    ):
        rule_end = _next_start(book.schedule_starts[version.schedule], rule_start)
        if (end is None or rule_start < end) and (rule_end is None or rule_end > start):
            produced |= rule.tier_names()
    missing = produced - set(version.rate_cards)
    unused = set(version.rate_cards) - produced
    if missing:
        fail(
            version,
            f"no rates for tier(s) {sorted(missing)} that schedule "
            f"{version.schedule!r} uses while this version is in force",
        )
    if unused:
        fail(
            version,
            f"tier(s) {sorted(unused)} never occur in schedule {version.schedule!r} "
            "while this version is in force (a misspelt tier name?)",
        )


def _next_start(starts: tuple[int, ...], start: int) -> int | None:
    later = [s for s in starts if s > start]
    return later[0] if later else None


def _check_alias(
    book: PriceBook,
    alias: AliasEra,
    span: tuple[int, int | None],
    change_points: list[int],
    fail: _Fail,
    resolver: _Resolver,
) -> None:
    """The alias must resolve to a priced model at its start and at every later change in the
    book until it ends: this catches unknown targets, cycles and targets retired under it.
    A pattern's or an endpoint fallback's alias is checked the same way; its target must be an
    exact model name, as every alias target is."""
    if alias.target not in book.models:
        fail(alias, f"alias target {alias.target!r} is not a model in the price book")
        return
    start, end = span
    instants = [start] + [p for p in change_points if p > start and (end is None or p < end)]
    for instant in instants:
        resolution = resolver(instant)
        if isinstance(resolution, str):
            fail(alias, f"at {_instant_text(instant)}: {resolution}")
            return


def _instant_text(micros: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)).isoformat()
