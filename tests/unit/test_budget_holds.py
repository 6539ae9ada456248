"""The hold stores behind `BudgetGuard`: in process and in the shared ledger, held to the same
behaviour (check and hold in one step, settle, drop, fail closed), with the real `decide`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import date
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.budgets import (
    BudgetExceeded,
    BudgetUnavailable,
    CallSize,
    HoldStore,
    LedgerHolds,
    LocalHolds,
    Standing,
    decide,
)
from proxy.budgets.decide import Refusal, worst_cost
from proxy.config import DEFAULT_POLICY, Budget
from proxy.ledger.connection import Transaction, connect
from proxy.ledger.store import SpendRow, SQLiteLedger, add_spend
from proxy.pricing.model import TokenRates

BEIJING = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 11, 4)  # a Wednesday: the week began on 2 November
CARDS = [{"CNY": TokenRates(Decimal(1), Decimal(2), Decimal(8))}]
SIZE = CallSize(prompt=1000, output=100)
WORST = Decimal("0.0028")  # 1000 x 2 + 100 x 8 per million
DAILY = Budget("alpha", "day", Decimal("0.006"), "CNY", (), hard=True)
WEEKLY = Budget("alpha", "week", Decimal("0.01"), "CNY", (), hard=True)


class Admit:
    """The guard's decision (`decide`, real), recording what each check saw: per budget,
    spent plus held."""

    def __init__(self) -> None:
        self.seen: list[list[Decimal]] = []
        self.worst = {"CNY": worst_cost(SIZE.prompt, SIZE.output, CARDS, "CNY")}

    def __call__(self, standings: Sequence[Standing]) -> tuple[dict[str, Decimal], int | None]:
        self.seen.append([s.spent + s.held for s in standings])
        return decide(standings, SIZE, CARDS, DEFAULT_POLICY, Refusal(BEIJING))


@pytest.fixture(params=["local", "ledger"])
async def holds(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HoldStore]:
    path = tmp_path / "ledger.sqlite3"
    ledger = SQLiteLedger(path, BEIJING)
    with contextlib.closing(connect(path)) as conn, Transaction(conn):
        add_spend(conn, "alpha", "2026-11-02", "CNY", Decimal("0.001"))  # Monday: this week
        add_spend(conn, "alpha", "2026-11-01", "CNY", Decimal("5"))  # last week
    store: HoldStore = (
        LocalHolds(ledger.spend) if request.param == "local" else LedgerHolds(path, owner="w0")
    )
    yield store
    await store.close()
    ledger.close()


async def test_check_and_hold_see_the_spend_and_every_running_call(holds: HoldStore) -> None:
    admit = Admit()
    budgets = (DAILY, WEEKLY)
    assert await holds.hold("alpha", "r1", DAY, budgets, admit) is None
    assert await holds.hold("alpha", "r2", DAY, budgets, admit) is None
    with pytest.raises(BudgetExceeded):  # the week: 0.001 + 3 x 0.0028 > 0.01
        await holds.hold("alpha", "r3", DAY, budgets, admit)
    assert admit.seen == [
        [Decimal(0), Decimal("0.001")],
        [WORST, Decimal("0.001") + WORST],
        [2 * WORST, Decimal("0.001") + 2 * WORST],
    ]


async def test_a_refused_call_holds_nothing(holds: HoldStore) -> None:
    admit = Admit()
    for request_id in ("r1", "r2"):
        await holds.hold("alpha", request_id, DAY, (DAILY,), admit)
    with pytest.raises(BudgetExceeded):
        await holds.hold("alpha", "r3", DAY, (DAILY,), admit)
    with pytest.raises(BudgetExceeded):
        await holds.hold("alpha", "r4", DAY, (DAILY,), admit)
    assert admit.seen[-1] == admit.seen[-2] == [2 * WORST]


async def test_settling_keeps_the_real_cost_and_dropping_frees_the_hold(holds: HoldStore) -> None:
    admit = Admit()
    for request_id in ("r1", "r2"):
        await holds.hold("alpha", request_id, DAY, (DAILY,), admit)
    await holds.settle("r1", {"CNY": Decimal("0.0005")})
    await holds.settle("r2", None)  # nothing billable: the call never went out
    await holds.hold("alpha", "r3", DAY, (DAILY,), admit)
    assert admit.seen[-1] == [Decimal("0.0005")]


async def test_unreadable_state_fails_closed(tmp_path: Path) -> None:
    def unreadable(since: date, until: date) -> list[SpendRow]:
        raise OSError("disk gone")

    not_a_ledger = tmp_path / "empty.sqlite3"  # no tables: every read fails
    for store in (LocalHolds(unreadable), LedgerHolds(not_a_ledger)):
        with pytest.raises(BudgetUnavailable):
            await store.hold("alpha", "r1", DAY, (DAILY,), Admit())
        await store.close()
