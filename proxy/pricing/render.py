"""Presenting prices to people and scripts: decimal text, quote objects, the table in force."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from proxy.pricing.engine import (
    Resolution,
    resolve,
    resolve_fallback,
    resolve_pattern,
    schedule_version_at,
    tier_at,
    to_micros,
    tool_fee_at,
)
from proxy.pricing.model import FLAT_TIER, PriceBook, TokenRates
from proxy.pricing.pricer import Pricing


def decimal_text(value: Decimal) -> str:
    """Plain decimal notation without trailing zeros: ``Decimal('10.05500000')`` -> ``10.055``."""
    text = format(value.normalize(), "f")
    return text


def iso_utc(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def quote_objects(pricing: Pricing, currencies: list[str]) -> list[dict[str, Any]]:
    """One JSON-ready object per currency, the `prices quote --format json` contract."""
    objects = []
    for currency in currencies:
        cost = pricing.costs.get(currency)
        obj: dict[str, Any] = {
            "model": pricing.model,
            "billed_model": pricing.billed_model,
            "currency": currency,
            "at": iso_utc(pricing.at),
            "version": pricing.version_id,
            "schedule_version": pricing.schedule_version_id,
            "tier": pricing.tier,
            "priced": pricing.priced,
        }
        if not pricing.priced:
            obj["reason"] = pricing.reason
        obj["components"] = (
            None
            if cost is None
            else {
                "cache_hit": decimal_text(cost.cache_hit),
                "cache_miss": decimal_text(cost.cache_miss),
                "output": decimal_text(cost.output),
                "tool_calls": decimal_text(cost.tool_calls),
            }
        )
        obj["total"] = None if cost is None else decimal_text(cost.total)
        obj["confidence"] = None if cost is None else cost.confidence.value
        obj["source"] = pricing.source
        obj["flags"] = list(pricing.flags)
        objects.append(obj)
    return objects


def quote_text(pricing: Pricing, currencies: list[str]) -> str:
    """A short human-readable quote."""
    lines = [f"{pricing.model} at {iso_utc(pricing.at)}"]
    if not pricing.priced:
        lines.append(f"  not priced: {pricing.reason}")
        return "\n".join(lines)
    rule = f" ({pricing.schedule_version_id})" if pricing.schedule_version_id else ""
    lines.append(f"  billed as {pricing.billed_model}, version {pricing.version_id}")
    lines.append(f"  tier      {pricing.tier}{rule}")
    header = f"  {'':<11}" + "".join(f"{c:>16}" for c in currencies)
    lines.append(header)
    for label in ("cache_hit", "cache_miss", "output", "tool_calls", "total"):
        cells = "".join(f"{decimal_text(getattr(pricing.costs[c], label)):>16}" for c in currencies)
        lines.append(f"  {label:<11}{cells}")
    confidence = ", ".join(f"{c} {pricing.costs[c].confidence.value}" for c in currencies)
    lines.append(f"  confidence {confidence}; source {pricing.source}")
    if pricing.flags:
        lines.append(f"  flags     {', '.join(pricing.flags)}")
    return "\n".join(lines)


def _rates_text(rates: TokenRates) -> str:
    return " / ".join(decimal_text(r) for r in (rates.cache_hit, rates.cache_miss, rates.output))


def table_in_force(book: PriceBook, at: datetime, currencies: list[str]) -> str:
    """Every model's rates at an instant, one row per tier; ``*`` marks the tier in force.
    Name patterns follow the models, most specific first, as the engine tries them, then each
    endpoint's fallback model (what a name nothing else prices is billed as there)."""
    at_micros = to_micros(at)
    lines = [f"Prices in force at {iso_utc(at)}, per 1M tokens: cache hit / cache miss / output"]
    header = (
        f"{'model':<30}{'billed as':<20}{'tier':<17}"
        + "".join(f"{c:<22}" for c in currencies)
        + "version"
    )
    lines.append(header)
    rows: list[tuple[str, Resolution | str]] = [
        (model, resolve(book, model, at_micros)) for model in sorted(book.models)
    ]
    rows += [(p, resolve_pattern(book, p, at_micros)) for _, p in book.pattern_order]
    rows += [
        (f"(other names on {endpoint})", resolve_fallback(book, endpoint, at_micros))
        for endpoint in sorted(book.fallbacks)
    ]
    for model, resolution in rows:
        if isinstance(resolution, str):
            lines.append(f"{model:<30}-- {resolution}")
            continue
        version = resolution.version
        current = FLAT_TIER
        if version.schedule is not None:
            rule = schedule_version_at(book, version.schedule, at_micros)
            current = tier_at(book, rule, at)[0] if rule is not None else ""
        for i, (tier, card) in enumerate(sorted(version.rate_cards.items())):
            mark = "*" if tier == current and version.schedule is not None else ""
            name, billed = (model, resolution.chain[-1]) if i == 0 else ("", "")
            cells = "".join(f"{_rates_text(card[c]):<22}" for c in currencies)
            lines.append(
                f"{name:<30}{billed:<20}{tier + mark:<17}{cells}{version.id if i == 0 else ''}"
            )
    for tool in sorted(book.tool_fees):
        fee = tool_fee_at(book, tool, at_micros)
        if fee is None:
            lines.append(f"tool {tool}: not billed yet")
            continue
        amounts = ", ".join(f"{decimal_text(fee.fees[c])} {c}" for c in currencies)
        lines.append(f"tool {tool}: {amounts} per {fee.per_calls} calls ({fee.id})")
    return "\n".join(lines)
