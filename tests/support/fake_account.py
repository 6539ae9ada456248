"""The fake DeepSeek's account: a balance that falls by exactly what each call is charged.

Independent of the proxy's price book and engine on purpose: the charge is computed here from
DeepSeek's published rates (``/work/shared/deepseek-prices.md``, "Current page (Oct-Nov 2026)",
marked [V]) and the usage the fake reports, so a test that finds zero drift has checked the
proxy's pricing against a second, separate computation. Only what the reconciliation tests use
is here: chat and FIM calls, Anthropic Messages and Responses calls (their usage read by the
converters below, written from the formats' own definitions, not the proxy's readers; a
``claude-*`` name charged as the model DeepSeek serves it with, any other unknown name on the
Anthropic endpoint as deepseek-flash), at the rates of one tier the test names (its calls all
happen in it), in one charged currency.

DeepSeek's rules, as the account applies them: a charge comes out of the granted balance
first, then the topped-up one (which may go below zero here: the fake never answers 402);
a top-up raises the topped-up balance, a grant the granted one. `overcharge_next` adds an
amount to the next call's charge (a DeepSeek bill that differs from its published prices).
Calls made straight to the fake with the company key are charged like any other: that is how
a test makes calls the proxy never sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Rates:
    """One model's published prices per million tokens: cache hit, cache miss, output."""

    cache_hit: Decimal
    cache_miss: Decimal
    output: Decimal

    def charge(self, usage: Mapping[str, Any]) -> Decimal:
        """The charge of one call's DeepSeek usage object, exactly (reasoning tokens are
        inside ``completion_tokens``)."""
        hit = int(usage.get("prompt_cache_hit_tokens", 0))
        miss = int(usage.get("prompt_cache_miss_tokens", 0))
        output = int(usage.get("completion_tokens", 0))
        return (hit * self.cache_hit + miss * self.cache_miss + output * self.output) / MILLION


def _rates(hit: str, miss: str, output: str) -> Rates:
    return Rates(Decimal(hit), Decimal(miss), Decimal(output))


def anthropic_as_chat(usage: Mapping[str, Any]) -> dict[str, int]:
    """An Anthropic usage object in DeepSeek's chat terms: ``input_tokens`` excludes the cache
    reads (hits) and the cache writes (billed as misses, DeepSeek caching on its own)."""
    return {
        "prompt_cache_hit_tokens": int(usage.get("cache_read_input_tokens") or 0),
        "prompt_cache_miss_tokens": int(usage["input_tokens"])
        + int(usage.get("cache_creation_input_tokens") or 0),
        "completion_tokens": int(usage["output_tokens"]),
    }


def responses_as_chat(usage: Mapping[str, Any]) -> dict[str, int]:
    """A Responses usage object in DeepSeek's chat terms: cached tokens are part of
    ``input_tokens``, reasoning tokens part of ``output_tokens``."""
    cached = int((usage.get("input_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "prompt_cache_hit_tokens": cached,
        "prompt_cache_miss_tokens": int(usage["input_tokens"]) - cached,
        "completion_tokens": int(usage["output_tokens"]),
    }


def anthropic_served(model: str, known: Mapping[str, Rates]) -> str:
    """The model DeepSeek's Anthropic endpoint serves (and bills) a name as: its own names as
    they are, ``claude-opus*`` as deepseek-v4-pro, anything else as deepseek-flash."""
    if model in known:
        return model
    return "deepseek-v4-pro" if model.startswith("claude-opus") else "deepseek-flash"


PEAK_CNY = {
    "deepseek-flash": _rates("0.04", "2", "8"),
    "deepseek-v4-pro": _rates("0.30", "9.0", "27.0"),
}
"""Weekdays 09:00-12:00 and 14:00-18:00 Beijing (`tests.support.proxy_harness.PEAK`)."""
OFF_PEAK_CNY = {
    "deepseek-flash": _rates("0.02", "1", "4"),
    "deepseek-v4-pro": _rates("0.15", "4.5", "13.5"),
}


@dataclass
class Wallet:
    granted: Decimal
    topped_up: Decimal


@dataclass
class FakeAccount:
    """Balances per currency; completions are charged in `currency` at `rates` (model ->
    `Rates`). `charges` lists every charge, in order."""

    wallets: dict[str, Wallet]
    rates: Mapping[str, Rates]
    currency: str = "CNY"
    charges: list[Decimal] = field(default_factory=list)
    _overcharge: Decimal = Decimal(0)

    @classmethod
    def opened(
        cls,
        granted: str,
        topped_up: str,
        rates: Mapping[str, Rates] = PEAK_CNY,
        currency: str = "CNY",
    ) -> FakeAccount:
        return cls({currency: Wallet(Decimal(granted), Decimal(topped_up))}, rates, currency)

    def charge(self, model: str, usage: Mapping[str, Any]) -> Decimal:
        """Take one call's charge from the balance, granted first; returns it."""
        if model not in self.rates:
            raise ValueError(f"the fake account has no rates for {model!r}")
        amount = self.rates[model].charge(usage) + self._overcharge
        self._overcharge = Decimal(0)
        wallet = self.wallets[self.currency]
        from_granted = min(amount, max(wallet.granted, Decimal(0)))
        wallet.granted -= from_granted
        wallet.topped_up -= amount - from_granted
        self.charges.append(amount)
        return amount

    def overcharge_next(self, amount: str) -> None:
        """The next charge is `amount` more than the published rates say."""
        self._overcharge = Decimal(amount)

    def top_up(self, amount: str) -> None:
        self.wallets[self.currency].topped_up += Decimal(amount)

    def grant(self, amount: str) -> None:
        self.wallets[self.currency].granted += Decimal(amount)

    def body(self) -> dict[str, Any]:
        """``GET /user/balance`` in DeepSeek's shape: amounts as plain decimal strings."""
        return {
            "is_available": True,
            "balance_infos": [
                {
                    "currency": currency,
                    "total_balance": _text(wallet.granted + wallet.topped_up),
                    "granted_balance": _text(wallet.granted),
                    "topped_up_balance": _text(wallet.topped_up),
                }
                for currency, wallet in self.wallets.items()
            ],
        }


def _text(amount: Decimal) -> str:
    return format(amount, "f")
