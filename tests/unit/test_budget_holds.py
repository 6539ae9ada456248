"""The hold stores behind `BudgetGuard`: in process and in the shared ledger, held to the same
behaviour (check and hold in one step, settle, drop, fail closed), with the real `decide`; and
budgets that a live reload changes while calls run (each kind of change, on every store)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
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
from proxy.periods import Period
from proxy.pricing.model import TokenRates

BEIJING = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 11, 4)  # a Wednesday: the week began on 2 November
CARDS = [
    {
        "CNY": TokenRates(Decimal(1), Decimal(2), Decimal(8)),
        "USD": TokenRates(Decimal("0.1"), Decimal("0.3"), Decimal("1.2")),
    }
]
SIZE = CallSize(prompt=1000, output=100)
WORST = Decimal("0.0028")  # 1000 x 2 + 100 x 8 per million
WORST_USD = Decimal("0.00042")  # 1000 x 0.3 + 100 x 1.2 per million
DAILY = Budget("alpha", "day", Decimal("0.006"), "CNY", (), hard=True)
WEEKLY = Budget("alpha", "week", Decimal("0.01"), "CNY", (), hard=True)
MONTHLY = Budget("alpha", "month", Decimal("5.01"), "CNY", (), hard=True)
DAILY_USD = Budget("alpha", "day", Decimal("0.0012"), "USD", (), hard=True)


class Admit:
    """The guard's decision (`decide`, real) for a team whose budgets are in `currencies`,
    recording what each check saw: per budget, spent plus held (`seen`, the same in every
    store), and the two apart (`parts`: a ledger store keeps a settled cost as a hold until
    the ledger writer records the call)."""

    def __init__(self, *currencies: str) -> None:
        self.seen: list[list[Decimal]] = []
        self.parts: list[list[tuple[Decimal, Decimal]]] = []
        self.worst = {
            c: worst_cost(SIZE.prompt, SIZE.output, CARDS, c) for c in currencies or ("CNY",)
        }

    def __call__(self, standings: Sequence[Standing]) -> tuple[dict[str, Decimal], int | None]:
        self.seen.append([s.spent + s.held for s in standings])
        self.parts.append([(s.spent, s.held) for s in standings])
        return decide(standings, SIZE, CARDS, DEFAULT_POLICY, Refusal(BEIJING))


def cny(amount: str) -> dict[str, Decimal]:
    return {"CNY": Decimal(amount)}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SQLiteLedger]:
    ledger = SQLiteLedger(tmp_path / "ledger.sqlite3", BEIJING)
    spend(ledger, "2026-11-02", "0.001")  # Monday: this week
    spend(ledger, "2026-11-01", "5")  # Sunday: last week
    spend(ledger, "2026-11-04", "0.0001", "USD")  # today
    yield ledger
    ledger.close()


@pytest.fixture(params=["local", "ledger"])
async def holds(request: pytest.FixtureRequest, ledger: SQLiteLedger) -> AsyncIterator[HoldStore]:
    store: HoldStore = (
        LocalHolds(ledger.spend)
        if request.param == "local"
        else LedgerHolds(ledger.path, owner="w0")
    )
    yield store
    await store.close()


def spend(ledger: SQLiteLedger, day: str, amount: str, currency: str = "CNY") -> None:
    """Team alpha's spend in the ledger, as the ledger writer adds it."""
    with contextlib.closing(connect(ledger.path)) as conn, Transaction(conn):
        add_spend(conn, "alpha", day, currency, Decimal(amount))


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


async def test_held_is_what_checks_count_per_period(holds: HoldStore) -> None:
    """The spend API's view of the holds: per period and currency, what a check of that
    period counts. A settled call's cost stays a hold in the ledger until the ledger writer
    records the call; in the process it moves to the spend at once."""
    starts: dict[Period, date] = {"day": DAY, "week": date(2026, 11, 2), "month": date(2026, 11, 1)}
    for request_id in ("r1", "r2"):
        await holds.hold("alpha", request_id, DAY, (DAILY,), Admit())
    await holds.hold("alpha", "r3", DAY, (DAILY_USD,), Admit("USD"))
    await holds.settle("r1", cny("0.0005"))
    cny_held = WORST + (Decimal("0.0005") if isinstance(holds, LedgerHolds) else 0)
    running = {"CNY": cny_held, "USD": WORST_USD}
    assert await holds.held("alpha", starts) == dict.fromkeys(starts, running)
    assert await holds.held("beta", starts) == {period: {} for period in starts}


# A live reload (`proxy.reload`) builds a new guard around the same store: the budgets a
# team's calls bring change between calls while earlier calls still run, and calls admitted
# under the old budgets may still be checked after the change.


async def test_a_changed_amount_applies_to_the_next_call_with_spend_and_holds_kept(
    holds: HoldStore,
) -> None:
    admit = Admit()
    for request_id in ("r1", "r2"):
        await holds.hold("alpha", request_id, DAY, (DAILY,), admit)
    with pytest.raises(BudgetExceeded):
        await holds.hold("alpha", "r3", DAY, (DAILY,), admit)
    raised = dataclasses.replace(DAILY, amount=Decimal("0.01"))
    await holds.hold("alpha", "r3", DAY, (raised,), admit)  # room for a third call now
    await holds.settle("r1", cny("0.0005"))
    lowered = dataclasses.replace(DAILY, amount=Decimal("0.0045"))
    with pytest.raises(BudgetExceeded):
        await holds.hold("alpha", "r4", DAY, (lowered,), admit)
    await holds.settle("r2", None)
    await holds.settle("r3", cny("0.001"))
    await holds.hold("alpha", "r4", DAY, (lowered,), admit)  # 0.0015 + 0.0028 <= 0.0045
    assert admit.seen == [
        [Decimal(0)],
        [WORST],
        [2 * WORST],
        [2 * WORST],
        [Decimal("0.0005") + 2 * WORST],
        [Decimal("0.0015")],
    ]


async def test_an_added_budget_counts_the_spend_and_the_calls_already_running(
    holds: HoldStore,
) -> None:
    admit = Admit()
    for request_id in ("r1", "r2"):
        await holds.hold("alpha", request_id, DAY, (DAILY,), admit)
    wider = dataclasses.replace(DAILY, amount=Decimal("0.01"))
    await holds.hold("alpha", "r3", DAY, (wider, WEEKLY), admit)
    with pytest.raises(BudgetExceeded):  # the week: 0.001 + 4 x 0.0028 > 0.01
        await holds.hold("alpha", "r4", DAY, (wider, WEEKLY), admit)
    await holds.settle("r1", cny("0.0005"))  # held before the week's budget existed
    await holds.settle("r2", None)
    await holds.hold("alpha", "r4", DAY, (wider, WEEKLY), admit)
    assert admit.seen[2:] == [
        [2 * WORST, Decimal("0.001") + 2 * WORST],
        [3 * WORST, Decimal("0.001") + 3 * WORST],
        [Decimal("0.0005") + WORST, Decimal("0.0015") + WORST],
    ]


async def test_a_removed_budget_is_no_longer_checked_and_is_right_if_it_returns(
    holds: HoldStore,
) -> None:
    """While the daily budget is gone the team still has its weekly one, so every call it
    makes is still held and settled: the daily budget comes back knowing them."""
    admit = Admit()
    await holds.hold("alpha", "r1", DAY, (DAILY, WEEKLY), admit)
    await holds.hold("alpha", "r2", DAY, (WEEKLY,), admit)
    await holds.hold("alpha", "r3", DAY, (WEEKLY,), admit)  # over the old daily budget
    for request_id in ("r1", "r2", "r3"):
        await holds.settle(request_id, cny("0.0005"))
    await holds.hold("alpha", "r4", DAY, (DAILY, WEEKLY), admit)
    with pytest.raises(BudgetExceeded):  # the day: 0.0015 + 2 x 0.0028 > 0.006
        await holds.hold("alpha", "r5", DAY, (DAILY, WEEKLY), admit)
    assert admit.seen == [
        [Decimal(0), Decimal("0.001")],
        [Decimal("0.001") + WORST],
        [Decimal("0.001") + 2 * WORST],
        [Decimal("0.0015"), Decimal("0.0025")],
        [Decimal("0.0015") + WORST, Decimal("0.0025") + WORST],
    ]


async def test_a_changed_period_reads_the_new_period_and_keeps_the_running_calls(
    holds: HoldStore,
) -> None:
    admit = Admit()
    await holds.hold("alpha", "r1", DAY, (DAILY,), admit)
    await holds.hold("alpha", "r2", DAY, (MONTHLY,), admit)  # November: 5 + 0.001 spent
    await holds.settle("r1", cny("0.0005"))
    await holds.hold("alpha", "r3", DAY, (MONTHLY,), admit)
    with pytest.raises(BudgetExceeded):  # back to the day, with two monthly calls running
        await holds.hold("alpha", "r4", DAY, (DAILY,), admit)
    assert admit.seen == [
        [Decimal(0)],
        [Decimal("5.001") + WORST],
        [Decimal("5.0015") + WORST],
        [Decimal("0.0005") + 2 * WORST],
    ]


async def test_a_changed_currency_counts_only_that_currency(holds: HoldStore) -> None:
    in_cny, in_usd = Admit("CNY"), Admit("USD")
    await holds.hold("alpha", "r1", DAY, (DAILY,), in_cny)
    await holds.hold("alpha", "r2", DAY, (DAILY_USD,), in_usd)  # 0.0001 USD spent today
    await holds.hold("alpha", "r3", DAY, (DAILY_USD,), in_usd)
    with pytest.raises(BudgetExceeded):
        await holds.hold("alpha", "r4", DAY, (DAILY_USD,), in_usd)
    await holds.settle("r1", cny("0.0005"))
    await holds.settle("r2", {"USD": Decimal("0.0002")})
    await holds.hold("alpha", "r4", DAY, (DAILY,), in_cny)
    await holds.hold("alpha", "r5", DAY, (DAILY_USD,), in_usd)
    assert in_cny.seen == [[Decimal(0)], [Decimal("0.0005")]]
    assert in_usd.seen == [
        [Decimal("0.0001")],
        [Decimal("0.0001") + WORST_USD],
        [Decimal("0.0001") + 2 * WORST_USD],
        [Decimal("0.0003") + WORST_USD],
    ]


async def test_local_holds_keep_spent_and_held_apart_through_changes(ledger: SQLiteLedger) -> None:
    """`LocalHolds`' own sums: a call still checked with the old budgets meets their amounts,
    a settled cost moves from held to spent in every state of its currency whatever changed
    since its call was held, and once every call has settled nothing is held."""
    store, admit = LocalHolds(ledger.spend), Admit()
    raised = dataclasses.replace(DAILY, amount=Decimal("0.01"))
    await store.hold("alpha", "r1", DAY, (DAILY,), admit)
    await store.hold("alpha", "r2", DAY, (raised, WEEKLY), admit)
    with pytest.raises(BudgetExceeded):  # a call of the old configuration: 3 x 0.0028 > 0.006
        await store.hold("alpha", "r3", DAY, (DAILY,), admit)
    await store.settle("r1", cny("0.0005"))
    await store.hold("alpha", "r3", DAY, (WEEKLY,), admit)
    await store.settle("r2", None)
    await store.settle("r3", cny("0.001"))
    await store.hold("alpha", "r4", DAY, (raised, WEEKLY), admit)
    await store.settle("r4", None)
    await store.hold("alpha", "r5", DAY, (DAILY, WEEKLY, MONTHLY), admit)
    assert admit.parts == [
        [(Decimal(0), Decimal(0))],
        [(Decimal(0), WORST), (Decimal("0.001"), WORST)],
        [(Decimal(0), 2 * WORST)],
        [(Decimal("0.0015"), WORST)],
        [(Decimal("0.0015"), Decimal(0)), (Decimal("0.0025"), Decimal(0))],
        # the month is new: read from the ledger, which the settled calls have not reached
        [(Decimal("0.0015"), 0), (Decimal("0.0025"), 0), (Decimal("5.001"), 0)],
    ]


async def test_a_team_that_lost_its_hard_budgets_reads_its_spend_again(
    ledger: SQLiteLedger,
) -> None:
    """A team without a hard budget has its calls recorded in the ledger but not held here:
    when a later guard gives it one again (`configure`), its spend is read anew, and its call
    still running from before settles into the new reading. A guard that only changes
    amounts keeps the spend counted in process."""
    store, admit = LocalHolds(ledger.spend), Admit()
    store.configure((DAILY,))
    await store.hold("alpha", "r1", DAY, (DAILY,), admit)
    await store.settle("r1", cny("0.0005"))  # in process only: no ledger writer here
    raised = dataclasses.replace(DAILY, amount=Decimal("0.01"))
    store.configure((raised,))
    await store.hold("alpha", "r2", DAY, (raised,), admit)
    store.configure(())
    spend(ledger, "2026-11-04", "0.0025")  # r1, and calls made while alpha had no hard budget
    store.configure((raised,))
    await store.hold("alpha", "r3", DAY, (raised,), admit)
    await store.settle("r2", cny("0.001"))
    await store.hold("alpha", "r4", DAY, (raised,), admit)
    assert admit.parts == [
        [(Decimal(0), Decimal(0))],
        [(Decimal("0.0005"), Decimal(0))],
        [(Decimal("0.0025"), WORST)],
        [(Decimal("0.0035"), WORST)],
    ]


async def test_unreadable_state_fails_closed(tmp_path: Path) -> None:
    def unreadable(since: date, until: date) -> list[SpendRow]:
        raise OSError("disk gone")

    not_a_ledger = tmp_path / "empty.sqlite3"  # no tables: every read fails
    for store in (LocalHolds(unreadable), LedgerHolds(not_a_ledger)):
        with pytest.raises(BudgetUnavailable):
            await store.hold("alpha", "r1", DAY, (DAILY,), Admit())
        await store.close()
