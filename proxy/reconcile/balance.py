"""DeepSeek's ``GET /user/balance`` answer, read exactly.

```json
{"is_available": true, "balance_infos": [{"currency": "CNY", "total_balance": "110.00",
  "granted_balance": "10.00", "topped_up_balance": "100.00"}]}
```

Amounts are strings, read as `Decimal` (never floats); several currencies may appear, each
once. An answer that is not that shape is refused whole (`BalanceUnreadable`): a snapshot half
read would show as drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

MAX_CURRENCIES = 16
"""More currencies than any account has: a bound on what one answer may add to the ledger."""
_AMOUNTS = ("total_balance", "granted_balance", "topped_up_balance")


class BalanceUnreadable(Exception):
    """DeepSeek's answer is not a balance this code can read (the reason says why)."""


@dataclass(frozen=True, slots=True)
class Balance:
    """One currency's balance. DeepSeek spends `granted` before `topped_up`; `total` is their
    sum as DeepSeek states it."""

    currency: str
    total: Decimal
    granted: Decimal
    topped_up: Decimal


def parse_balance(body: bytes) -> tuple[Balance, ...]:
    """Every currency's balance in `body`, sorted by currency; `BalanceUnreadable` if the
    body is not DeepSeek's balance shape."""
    try:
        data: Any = json.loads(body, parse_float=Decimal)
    except ValueError as exc:
        raise BalanceUnreadable(f"not JSON: {exc}") from None
    infos = data.get("balance_infos") if isinstance(data, dict) else None
    if not isinstance(infos, list) or not 0 < len(infos) <= MAX_CURRENCIES:
        raise BalanceUnreadable(f"expected 1 to {MAX_CURRENCIES} balance_infos")
    balances = [_balance(info) for info in infos]
    currencies = [b.currency for b in balances]
    if len(set(currencies)) != len(currencies):
        raise BalanceUnreadable(f"a currency listed twice: {', '.join(currencies)}")
    return tuple(sorted(balances, key=lambda b: b.currency))


def _balance(info: Any) -> Balance:
    if not isinstance(info, dict):
        raise BalanceUnreadable("a balance_infos entry is not an object")
    currency = info.get("currency")
    if not isinstance(currency, str) or not (currency.isascii() and currency.isalpha()):
        raise BalanceUnreadable(f"currency {str(currency)[:16]!r} is not a currency code")
    if len(currency) != 3:
        raise BalanceUnreadable(f"currency {currency[:16]!r} is not a three-letter code")
    amounts = [_amount(info.get(name), name) for name in _AMOUNTS]
    return Balance(currency.upper(), *amounts)


def _amount(value: Any, name: str) -> Decimal:
    """An amount as DeepSeek sends it (a string); a JSON number is read as its decimal text
    (``parse_float=Decimal``), never through a float."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise BalanceUnreadable(f"{name} is not an amount: {str(value)[:32]!r}")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise BalanceUnreadable(f"{name} is not an amount: {str(value)[:32]!r}") from None
    if not amount.is_finite() or abs(amount) >= 10**15:
        raise BalanceUnreadable(f"{name} is out of range: {str(value)[:32]!r}")
    return amount
