"""The reconciliation's pure parts: DeepSeek's balance read exactly, and the arithmetic of a
window between two snapshots (spend, top-ups, grants, the granted balance spent first)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from proxy.reconcile.balance import Balance, BalanceUnreadable, parse_balance
from proxy.reconcile.drift import Running, Snapshot, window

T0 = datetime(2026, 11, 2, 1, 30, tzinfo=UTC)
D = Decimal


def test_the_documented_balance_is_read_exactly() -> None:
    body = (
        b'{"is_available": true, "balance_infos": [{"currency": "USD", "total_balance": '
        b'"1.10", "granted_balance": "0.10", "topped_up_balance": "1.00"}, {"currency": "CNY",'
        b' "total_balance": "110.00", "granted_balance": "10.00", "topped_up_balance": '
        b'"100.00"}]}'
    )
    assert parse_balance(body) == (
        Balance("CNY", D("110.00"), D("10.00"), D("100.00")),
        Balance("USD", D("1.10"), D("0.10"), D("1.00")),
    )


def test_a_number_instead_of_a_string_is_read_as_its_decimal_text() -> None:
    body = json.dumps(
        {
            "balance_infos": [
                {
                    "currency": "CNY",
                    "total_balance": 0.1,
                    "granted_balance": 0,
                    "topped_up_balance": "0.1",
                }
            ]
        }
    ).encode()
    assert parse_balance(body) == (Balance("CNY", D("0.1"), D(0), D("0.1")),)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>", "not JSON"),
        (b'{"is_available": true}', "expected 1 to 16 balance_infos"),
        (b'{"balance_infos": []}', "expected 1 to 16 balance_infos"),
        (b'{"balance_infos": [1]}', "not an object"),
        (
            b'{"balance_infos": [{"currency": "\\u001b[2J", "total_balance": "1",'
            b' "granted_balance": "0", "topped_up_balance": "1"}]}',
            "is not a currency code",
        ),
        (
            b'{"balance_infos": [{"currency": "CNY", "total_balance": "lots",'
            b' "granted_balance": "0", "topped_up_balance": "1"}]}',
            "total_balance is not an amount",
        ),
        (
            b'{"balance_infos": [{"currency": "CNY", "total_balance": "1",'
            b' "granted_balance": "NaN", "topped_up_balance": "1"}]}',
            "granted_balance is out of range",
        ),
        (
            b'{"balance_infos": [{"currency": "CNY", "total_balance": "1",'
            b' "granted_balance": "0"}]}',
            "topped_up_balance is not an amount",
        ),
        (
            b'{"balance_infos": [{"currency": "CNY", "total_balance": "1", "granted_balance":'
            b' "0", "topped_up_balance": "1"}, {"currency": "CNY", "total_balance": "1",'
            b' "granted_balance": "0", "topped_up_balance": "1"}]}',
            "a currency listed twice",
        ),
    ],
)
def test_anything_else_is_refused_whole(body: bytes, reason: str) -> None:
    with pytest.raises(BalanceUnreadable, match=reason):
        parse_balance(body)


def snap(minutes: int, granted: str, topped_up: str) -> Snapshot:
    g, t = D(granted), D(topped_up)
    return Snapshot(T0 + timedelta(minutes=minutes), Balance("CNY", g + t, g, t))


@pytest.mark.parametrize(
    ("before", "after", "cost", "spend", "top_ups", "grants"),
    [
        # Charges come out of the granted balance while it lasts ...
        (("10", "100"), ("9.5", "100"), "0.5", "0.5", "0", "0"),
        # ... then out of the topped-up one.
        (("0.2", "100"), ("0", "99.7"), "0.5", "0.5", "0", "0"),
        # A top-up while granted lasts is the whole rise of the topped-up balance.
        (("10", "100"), ("9.5", "150"), "0.5", "0.5", "50", "0"),
        # A grant is not spend either; nothing charged.
        (("0", "100"), ("5", "100"), "0", "0", "0", "5"),
        # Charged beyond the ledger: the drift.
        (("10", "100"), ("9", "100"), "0.25", "1", "0", "0"),
    ],
)
def test_a_window_keeps_top_ups_and_grants_out_of_the_spend(
    before: tuple[str, str],
    after: tuple[str, str],
    cost: str,
    spend: str,
    top_ups: str,
    grants: str,
) -> None:
    current = window(snap(0, *before), snap(5, *after), D(cost))
    assert (current.spend, current.top_ups, current.grants) == (D(spend), D(top_ups), D(grants))
    assert current.drift == D(spend) - D(cost)
    assert current.ratio == (None if D(cost) == 0 else (D(spend) - D(cost)) / D(cost))
    assert (current.start, current.end, current.currency) == (
        T0,
        T0 + timedelta(minutes=5),
        "CNY",
    )


def test_the_running_sums_add_windows_exactly() -> None:
    first = window(snap(0, "1", "100"), snap(5, "0.9", "100"), D("0.1"))
    second = window(snap(5, "0.9", "100"), snap(10, "0", "99.8"), D("0.9"))
    running = Running().plus(first).plus(second)
    assert (running.spend, running.ledger_cost, running.drift) == (D("1.2"), D("1.0"), D("0.2"))
