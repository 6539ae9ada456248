"""Reading the ``models``, ``model_patterns``, ``endpoint_fallbacks`` and ``tool_fees`` sections
of a price-book file: dated eras (prices, aliases, retirements), dated name patterns, dated
fallback models and dated tool fees."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

from proxy.pricing.fields import PROVENANCE_KEYS, Reader, utc_id
from proxy.pricing.model import (
    ENDPOINT_NAMES,
    FLAT_TIER,
    AliasEra,
    Era,
    PatternEra,
    PriceVersion,
    RateCard,
    Retirement,
    TokenRates,
    ToolFeeVersion,
)


def read_model(
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
    } | PROVENANCE_KEYS
    result: list[tuple[Era, str]] = []
    for i, item in reader.versions(raw, f"models.{name}"):
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


_PATTERN = re.compile(r"^[^*?\[\]\s]+\*$")
"""A literal name prefix and one trailing ``*``: the only pattern form, so two patterns that
match the same name always differ in specificity (one prefix extends the other)."""


def read_pattern(
    reader: Reader, pattern: str, raw: Any, currencies: tuple[str, ...]
) -> list[tuple[PatternEra, str]]:
    """The dated entries of a name pattern: each an ``alias`` or a ``retired``."""
    if not _PATTERN.match(pattern):
        reader.fail(
            f"model_patterns.{pattern}",
            "a pattern is a literal name prefix followed by one trailing '*' "
            "(e.g. 'claude-opus*'); no other wildcard, no whitespace, no bare '*'",
        )
        return []
    return _dated_aliases(reader, "model_patterns", pattern, raw, currencies)


def read_fallback(
    reader: Reader, endpoint: str, raw: Any, currencies: tuple[str, ...]
) -> list[tuple[PatternEra, str]]:
    """The dated entries of an endpoint's fallback model: each an ``alias`` (the model an
    unsupported name is served as there) or a ``retired`` (the endpoint refuses such names)."""
    if endpoint not in ENDPOINT_NAMES:
        reader.fail(
            f"endpoint_fallbacks.{endpoint}",
            f"not an endpoint of the proxy; expected one of {sorted(ENDPOINT_NAMES)}",
        )
        return []
    return _dated_aliases(reader, "endpoint_fallbacks", endpoint, raw, currencies)


def _dated_aliases(
    reader: Reader, section: str, name: str, raw: Any, currencies: tuple[str, ...]
) -> list[tuple[PatternEra, str]]:
    allowed = {"from", "id", "alias", "retired"} | PROVENANCE_KEYS
    result: list[tuple[PatternEra, str]] = []
    for i, item in reader.versions(raw, f"{section}.{name}"):
        where = f"{section}.{name}[{i}]"
        if not reader.mapping(item, where, allowed, {"from", "source", "confidence"}):
            continue
        kinds = [k for k in ("alias", "retired") if k in item]
        if len(kinds) != 1:
            found = kinds or "none"
            reader.fail(where, f"needs exactly one of 'alias' or 'retired'; found {found}")
            continue
        effective = reader.instant(item["from"], f"{where}.from")
        provenance = reader.provenance(item, where, currencies)
        value = reader.text(item[kinds[0]], f"{where}.{kinds[0]}")
        if effective is None or provenance is None or value is None:
            continue
        era_id = _era_id(item, name, effective)
        era: PatternEra = (
            AliasEra(era_id, name, effective, value, provenance)
            if kinds[0] == "alias"
            else Retirement(era_id, name, effective, value, provenance)
        )
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
        cards: dict[str, RateCard] | None = None if card is None else {FLAT_TIER: card}
        schedule = None
    else:
        cards = _read_rate_cards(reader, item["tiers"], f"{where}.tiers", currencies)
        schedule = reader.text(item["schedule"], f"{where}.schedule")
    if cards is None or effective is None or provenance is None:
        return None
    era_id = _era_id(item, name, effective)
    label = str(item.get("label", ""))
    return PriceVersion(
        era_id, name, effective, label, schedule, MappingProxyType(cards), provenance
    )


def _era_id(item: Mapping[str, Any], name: str, effective: datetime) -> str:
    return str(item.get("id") or utc_id(name, effective))


def _read_card(
    reader: Reader, raw: Any, entry: str, currencies: tuple[str, ...]
) -> RateCard | None:
    if not reader.mapping(raw, entry, set(currencies), set(currencies)):
        return None
    card = {c: reader.rates(raw[c], f"{entry}.{c}") for c in currencies}
    if any(rates is None for rates in card.values()):
        return None
    return MappingProxyType({c: r for c, r in card.items() if r is not None})


def _read_rate_cards(
    reader: Reader, raw: Any, entry: str, currencies: tuple[str, ...]
) -> dict[str, RateCard] | None:
    """A rate card per tier, from the ``tiers`` key; ``{base: peak, multiplier: "0.5"}`` derives
    a tier from another explicit one (a shorthand only: DeepSeek publishes rounded explicit
    figures, so prefer them)."""
    if not isinstance(raw, Mapping) or not raw:
        reader.fail(entry, "expected a mapping of tier names to rates")
        return None
    cards: dict[str, RateCard] = {}
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
            cards[str(tier)] = card
    for tier, spec in derived.items():
        base = cards.get(str(spec["base"]))
        factor = reader.money(spec["multiplier"], f"{entry}.{tier}.multiplier")
        if base is None:
            reader.fail(
                f"{entry}.{tier}.base",
                f"base tier {spec['base']!r} is not a tier with explicit rates",
            )
            continue
        if factor is None:
            continue
        cards[tier] = MappingProxyType(
            {
                c: TokenRates(r.cache_hit * factor, r.cache_miss * factor, r.output * factor)
                for c, r in base.items()
            }
        )
    return cards if len(cards) == len(raw) else None


def read_tool_fees(
    reader: Reader, name: str, raw: Any, currencies: tuple[str, ...]
) -> list[tuple[ToolFeeVersion, str]]:
    result = []
    for i, item in reader.versions(raw, f"tool_fees.{name}"):
        where = f"tool_fees.{name}[{i}]"
        if not reader.mapping(
            item,
            where,
            {"from", "id", "per", "fee"} | PROVENANCE_KEYS,
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
                    str(item.get("id") or utc_id(name, effective)),
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
