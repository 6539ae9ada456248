"""Loading price-book YAML files into a validated `PriceBook`.

Several files form one book (the shipped ``deepseek.yaml`` plus, say, a team's local additions):
models, schedules, calendars and tool fees from all files are merged, and an instant defined twice
for the same name - in one file or across files - is an ambiguity, reported with both places.
The file format is documented in ``config/pricing/README.md``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.pricing.engine import to_micros
from proxy.pricing.errors import BookProblem, PriceBookError
from proxy.pricing.fields import Reader, format_minute_of_week
from proxy.pricing.model import (
    FLAT_TIER,
    AliasEra,
    Era,
    HolidayCalendar,
    PriceBook,
    PriceVersion,
    RateCard,
    Retirement,
    ScheduleVersion,
    TokenRates,
    ToolFeeVersion,
    Window,
)
from proxy.pricing.validate import check_cross_references
from proxy.yamlfile import YamlError, load_yaml

_WEEK = 7 * 1440
_TOP_KEYS = {"book", "currencies", "calendars", "schedules", "models", "tool_fees"}
_PROVENANCE = {"source", "confidence", "note"}


def _utc_id(name: str, instant: datetime) -> str:
    return f"{name}@{instant.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


@dataclass
class _Parts:
    """Entries gathered from all files, each with the file and entry path it came from."""

    currencies: tuple[str, ...] | None = None
    eras: dict[str, list[tuple[Era, str, str]]] = field(default_factory=dict)
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
        calendar = _read_calendar(reader, name, raw)
        if calendar is None:
            continue
        if name in parts.calendars:
            reader.fail(f"calendars.{name}", f"also defined in {parts.calendars[name][1]}")
            continue
        parts.calendars[name] = (calendar, reader.file)
    for name, raw in _named(reader, document, "schedules"):
        for version, entry in _read_schedule(reader, name, raw):
            parts.schedules.setdefault(name, []).append((version, reader.file, entry))
    for name, raw in _named(reader, document, "models"):
        for era, entry in _read_model(reader, name, raw, codes):
            parts.eras.setdefault(name, []).append((era, reader.file, entry))
    for name, raw in _named(reader, document, "tool_fees"):
        for fee, entry in _read_tool(reader, name, raw, codes):
            parts.tool_fees.setdefault(name, []).append((fee, reader.file, entry))


def _named(reader: Reader, document: Mapping[str, Any], key: str) -> Iterable[tuple[str, Any]]:
    section = document.get(key, {})
    if not isinstance(section, Mapping):
        reader.fail(key, "expected a mapping of names to entries")
        return []
    return [(str(name), raw) for name, raw in section.items()]


def _versions(reader: Reader, raw: Any, entry: str) -> list[tuple[int, Any]]:
    if not isinstance(raw, list) or not raw:
        reader.fail(entry, "expected a non-empty list of dated entries")
        return []
    return list(enumerate(raw))


def _read_calendar(reader: Reader, name: str, raw: Any) -> HolidayCalendar | None:
    entry = f"calendars.{name}"
    if not reader.mapping(
        raw,
        entry,
        {"years", "holidays", "workdays"} | _PROVENANCE,
        {"years", "holidays", "source", "confidence"},
    ):
        return None
    years = raw["years"]
    if not isinstance(years, list) or not all(isinstance(y, int) for y in years) or not years:
        reader.fail(f"{entry}.years", "expected a list of years such as [2026]")
        return None
    holidays = reader.dates(raw["holidays"], f"{entry}.holidays")
    workdays = reader.dates(raw.get("workdays", []), f"{entry}.workdays")
    provenance = reader.provenance(raw, entry)
    if holidays is None or workdays is None or provenance is None:
        return None
    for day in holidays + workdays:
        if day.year not in years:
            reader.fail(entry, f"date {day} lies outside the covered years {years}")
            return None
    both = set(holidays) & set(workdays)
    if both:
        reader.fail(entry, f"dates both holiday and workday: {sorted(map(str, both))}")
        return None
    return HolidayCalendar(
        name, frozenset(years), frozenset(holidays), frozenset(workdays), provenance
    )


def _read_schedule(reader: Reader, name: str, raw: Any) -> list[tuple[ScheduleVersion, str]]:
    entry = f"schedules.{name}"
    if not reader.mapping(raw, entry, {"timezone", "versions"}, {"timezone", "versions"}):
        return []
    try:
        tz = ZoneInfo(str(raw["timezone"]))
    except (ZoneInfoNotFoundError, ValueError):
        reader.fail(f"{entry}.timezone", f"unknown timezone {raw['timezone']!r}")
        return []
    allowed = {
        "from",
        "id",
        "label",
        "windows",
        "otherwise",
        "holidays",
        "makeup_workdays",
    } | _PROVENANCE
    result = []
    for i, item in _versions(reader, raw["versions"], f"{entry}.versions"):
        where = f"{entry}.versions[{i}]"
        if not reader.mapping(item, where, allowed, {"from", "windows", "source", "confidence"}):
            continue
        version = _read_schedule_version(reader, name, tz, item, where)
        if version is not None:
            result.append((version, where))
    return result


def _read_schedule_version(
    reader: Reader, name: str, tz: ZoneInfo, item: Mapping[str, Any], where: str
) -> ScheduleVersion | None:
    effective = reader.instant(item["from"], f"{where}.from")
    provenance = reader.provenance(item, where)
    windows = _read_windows(reader, item["windows"], f"{where}.windows")
    default = item.get("otherwise")
    if default is not None and not isinstance(default, str):
        reader.fail(f"{where}.otherwise", "expected a tier name")
        return None
    holiday_calendar = holiday_tier = None
    if "holidays" in item:
        spec = item["holidays"]
        keys = {"calendar", "tier"}
        if not reader.mapping(spec, f"{where}.holidays", keys, keys):
            return None
        holiday_calendar, holiday_tier = str(spec["calendar"]), str(spec["tier"])
    makeup = item.get("makeup_workdays", "weekend")
    if makeup not in ("weekend", "weekday"):
        reader.fail(f"{where}.makeup_workdays", f"expected 'weekend' or 'weekday', got {makeup!r}")
        return None
    if effective is None or provenance is None or windows is None:
        return None
    compiled = _compile_week(reader, windows, default, f"{where}.windows")
    if compiled is None:
        return None
    return ScheduleVersion(
        id=str(item.get("id") or _utc_id(name, effective)),
        schedule=name,
        effective=effective,
        timezone=tz,
        windows=tuple(windows),
        default_tier=default,
        boundaries=compiled[0],
        tiers=compiled[1],
        holiday_calendar=holiday_calendar,
        holiday_tier=holiday_tier,
        makeup_workdays_as_weekdays=makeup == "weekday",
        provenance=provenance,
    )


def _read_windows(reader: Reader, raw: Any, entry: str) -> list[Window] | None:
    if not isinstance(raw, list):
        reader.fail(entry, "expected a list of {tier, days, hours}")
        return None
    windows: list[Window] = []
    for i, item in enumerate(raw):
        where = f"{entry}[{i}]"
        if not reader.mapping(item, where, {"tier", "days", "hours"}, {"tier", "days", "hours"}):
            return None
        tier = reader.text(item["tier"], f"{where}.tier")
        days = reader.days(item["days"], f"{where}.days")
        hours = reader.hours(item["hours"], f"{where}.hours")
        if tier is None or days is None or hours is None:
            return None
        windows.extend(
            Window(tier, day * 1440 + start, day * 1440 + end)
            for day in days
            for start, end in hours
        )
    return windows


def _compile_week(
    reader: Reader, windows: list[Window], default: str | None, entry: str
) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    """Lay the windows on the 10,080 minutes of a week; overlaps of different tiers and (without
    `otherwise`) uncovered minutes are errors, because either would make a price ambiguous."""
    week: list[str | None] = [None] * _WEEK
    for window in windows:
        for minute in range(window.start, window.end):
            slot = minute % _WEEK
            current = week[slot]
            if current is not None and current != window.tier:
                reader.fail(
                    entry,
                    f"tiers {current!r} and {window.tier!r} overlap at "
                    f"{format_minute_of_week(slot)}",
                )
                return None
            week[slot] = window.tier
    gaps = [m for m in range(_WEEK) if week[m] is None]
    if gaps and default is None:
        start = gaps[0]
        end = start
        while end + 1 < _WEEK and week[end + 1] is None:
            end += 1
        reader.fail(
            entry,
            f"no tier covers {format_minute_of_week(start)}-"
            f"{format_minute_of_week(end + 1)} ({len(gaps)} minutes of the week "
            "uncovered); add windows or an 'otherwise' tier",
        )
        return None
    filled = [slot if slot is not None else default for slot in week]
    boundaries: list[int] = []
    tiers: list[str] = []
    for minute, tier in enumerate(filled):
        assert tier is not None
        if not tiers or tiers[-1] != tier:
            boundaries.append(minute)
            tiers.append(tier)
    return tuple(boundaries), tuple(tiers)


def _read_model(
    reader: Reader, name: str, raw: Any, currencies: tuple[str, ...]
) -> list[tuple[Era, str]]:
    allowed = {
        "from",
        "id",
        "label",
        "rates",
        "schedule",
        "tiers",
        "alias",
        "retired",
    } | _PROVENANCE
    result: list[tuple[Era, str]] = []
    for i, item in _versions(reader, raw, f"models.{name}"):
        where = f"models.{name}[{i}]"
        if not reader.mapping(item, where, allowed, {"from", "source", "confidence"}):
            continue
        kinds = [k for k in ("rates", "tiers", "alias", "retired") if k in item]
        if len(kinds) != 1:
            reader.fail(
                where,
                "needs exactly one of 'rates', 'tiers' (with 'schedule'), "
                f"'alias' or 'retired'; found {kinds or 'none'}",
            )
            continue
        era = _read_era(reader, name, item, where, kinds[0], currencies)
        if era is not None:
            result.append((era, where))
    return result


def _read_era(
    reader: Reader,
    name: str,
    item: Mapping[str, Any],
    where: str,
    kind: str,
    currencies: tuple[str, ...],
) -> Era | None:
    # Every field is read even after one fails, so a file's defects are all reported at once.
    effective = reader.instant(item["from"], f"{where}.from")
    provenance = reader.provenance(item, where, currencies)
    if ("schedule" in item) != (kind == "tiers"):
        reader.fail(where, "'tiers' and 'schedule' go together; flat prices use 'rates'")
        return None
    if kind == "alias":
        target = reader.text(item["alias"], f"{where}.alias")
        if effective is None or provenance is None or target is None:
            return None
        return AliasEra(_era_id(item, name, effective), name, effective, target, provenance)
    if kind == "retired":
        reason = reader.text(item["retired"], f"{where}.retired")
        if effective is None or provenance is None or reason is None:
            return None
        return Retirement(_era_id(item, name, effective), name, effective, reason, provenance)
    if kind == "rates":
        card = _read_card(reader, item["rates"], f"{where}.rates", currencies)
        tiers: dict[str, RateCard] | None = None if card is None else {FLAT_TIER: card}
        schedule = None
    else:
        tiers = _read_tiers(reader, item["tiers"], f"{where}.tiers", currencies)
        schedule = reader.text(item["schedule"], f"{where}.schedule")
    if tiers is None or effective is None or provenance is None:
        return None
    era_id = _era_id(item, name, effective)
    label = str(item.get("label", ""))
    return PriceVersion(
        era_id, name, effective, label, schedule, MappingProxyType(tiers), provenance
    )


def _era_id(item: Mapping[str, Any], name: str, effective: datetime) -> str:
    return str(item.get("id") or _utc_id(name, effective))


def _read_card(
    reader: Reader, raw: Any, entry: str, currencies: tuple[str, ...]
) -> RateCard | None:
    if not reader.mapping(raw, entry, set(currencies), set(currencies)):
        return None
    card = {c: reader.rates(raw[c], f"{entry}.{c}") for c in currencies}
    if any(rates is None for rates in card.values()):
        return None
    return MappingProxyType({c: r for c, r in card.items() if r is not None})


def _read_tiers(
    reader: Reader, raw: Any, entry: str, currencies: tuple[str, ...]
) -> dict[str, RateCard] | None:
    """Explicit rates per tier; ``{base: peak, multiplier: "0.5"}`` derives a tier from another
    explicit one (a shorthand only: DeepSeek publishes rounded explicit figures, so prefer them)."""
    if not isinstance(raw, Mapping) or not raw:
        reader.fail(entry, "expected a mapping of tier names to rates")
        return None
    tiers: dict[str, RateCard] = {}
    derived: dict[str, Mapping[str, Any]] = {}
    for tier, spec in raw.items():
        if isinstance(spec, Mapping) and "base" in spec:
            if reader.mapping(
                spec, f"{entry}.{tier}", {"base", "multiplier"}, {"base", "multiplier"}
            ):
                derived[str(tier)] = spec
            continue
        card = _read_card(reader, spec, f"{entry}.{tier}", currencies)
        if card is not None:
            tiers[str(tier)] = card
    for tier, spec in derived.items():
        base = tiers.get(str(spec["base"]))
        factor = reader.money(spec["multiplier"], f"{entry}.{tier}.multiplier")
        if base is None:
            reader.fail(
                f"{entry}.{tier}.base",
                f"base tier {spec['base']!r} is not a tier with explicit rates",
            )
            continue
        if factor is None:
            continue
        tiers[tier] = MappingProxyType(
            {
                c: TokenRates(r.cache_hit * factor, r.cache_miss * factor, r.output * factor)
                for c, r in base.items()
            }
        )
    return tiers if len(tiers) == len(raw) else None


def _read_tool(
    reader: Reader, name: str, raw: Any, currencies: tuple[str, ...]
) -> list[tuple[ToolFeeVersion, str]]:
    result = []
    for i, item in _versions(reader, raw, f"tool_fees.{name}"):
        where = f"tool_fees.{name}[{i}]"
        if not reader.mapping(
            item,
            where,
            {"from", "id", "per", "fee"} | _PROVENANCE,
            {"from", "per", "fee", "source", "confidence"},
        ):
            continue
        effective = reader.instant(item["from"], f"{where}.from")
        provenance = reader.provenance(item, where, currencies)
        per = item["per"]
        if (
            isinstance(per, bool)
            or not isinstance(per, int)
            or per <= 0
            or 10 ** (len(str(per)) - 1) != per
        ):
            # A power of ten keeps fee * calls / per exact in Decimal.
            reader.fail(f"{where}.per", f"expected 1, 10, 100, 1000, ... calls, got {per!r}")
            continue
        fees: dict[str, Any] = {}
        if reader.mapping(item["fee"], f"{where}.fee", set(currencies), set(currencies)):
            fees = {c: reader.money(item["fee"][c], f"{where}.fee.{c}") for c in currencies}
        if effective is None or provenance is None or not fees or None in fees.values():
            continue
        result.append(
            (
                ToolFeeVersion(
                    str(item.get("id") or _utc_id(name, effective)),
                    name,
                    effective,
                    per,
                    MappingProxyType(fees),
                    provenance,
                ),
                where,
            )
        )
    return result


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
    )


def _origins(parts: _Parts) -> dict[int, tuple[str, str]]:
    """Each entry object (by identity) -> its file and entry path, for cross-reference errors."""
    origins: dict[int, tuple[str, str]] = {}
    for group in (parts.eras, parts.schedules, parts.tool_fees):
        for entries in group.values():
            for obj, file, entry in entries:
                origins[id(obj)] = (file, entry)
    for name, (calendar, file) in parts.calendars.items():
        origins[id(calendar)] = (file, f"calendars.{name}")
    return origins
