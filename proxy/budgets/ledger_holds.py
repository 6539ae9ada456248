"""Hard-budget holds in the shared SQLite ledger, for ``serve --workers N``.

Holds live in the ledger's ``budget_holds`` table: the check (ledger spend plus every worker's
holds plus this call's worst case) and the new hold are one ``BEGIN IMMEDIATE`` transaction, so
workers cannot race past a budget either. A settled hold keeps the call's real cost until the
ledger writer stores the call's record and drops the hold in the same transaction that adds the
cost to the spend, so spend is never counted twice or not at all. SQLite work runs on one
dedicated thread, off the event loop.

Each hold carries `owner`, this worker's id: if the worker dies, its supervisor drops its holds
at once (`proxy.ledger.store.release_owner`), so they stop refusing calls.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from decimal import Decimal
from pathlib import Path

from proxy.budgets.decide import BudgetUnavailable, Standing
from proxy.budgets.holds import HELD_UNREADABLE, Admit, held_by_period
from proxy.config import Budget
from proxy.formats import ZERO, decimal_text
from proxy.ledger.connection import Transaction, connect
from proxy.periods import Period, period_start

log = logging.getLogger("proxy.budgets")

_SPENT = (
    "SELECT decimal_sum(amount) FROM spend_daily WHERE team = ? AND currency = ? "
    "AND day BETWEEN ? AND ?"
)
_HELD = "SELECT decimal_sum(amount) FROM budget_holds WHERE team = ? AND currency = ? AND day >= ?"
_INSERT = (
    "INSERT INTO budget_holds (request_id, team, currency, day, amount, owner) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_HELD_BY_DAY = (
    "SELECT day, currency, decimal_sum(amount) FROM budget_holds WHERE team = ? AND day >= ? "
    "GROUP BY day, currency"
)
_DROP = "DELETE FROM budget_holds WHERE request_id = ?"
_SETTLE = "UPDATE budget_holds SET amount = ? WHERE request_id = ? AND currency = ?"


class LedgerHolds:
    """Holds shared by the workers through the ledger at `ledger`, marked with `owner`."""

    def __init__(self, ledger: Path, *, owner: str | None = None) -> None:
        self._owner = owner
        self._conn = connect(ledger)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="budgets")

    async def hold(
        self, team: str, request_id: str, day: date, budgets: Sequence[Budget], admit: Admit
    ) -> int | None:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, self._hold, team, request_id, day, budgets, admit
            )
        except sqlite3.Error as exc:
            log.exception("cannot read or write budget holds")
            raise BudgetUnavailable() from exc

    async def settle(self, request_id: str, costs: Mapping[str, Decimal] | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._settle, request_id, costs)
        except sqlite3.Error:
            log.exception("cannot settle budget hold of %s", request_id)

    async def held(
        self, team: str, starts: Mapping[Period, date]
    ) -> dict[Period, dict[str, Decimal]]:
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(
                self._executor, self._held, team, min(starts.values())
            )
        except sqlite3.Error as exc:
            log.exception("cannot read budget holds")
            raise BudgetUnavailable(HELD_UNREADABLE) from exc
        return held_by_period(rows, starts)

    def configure(self, budgets: Sequence[Budget]) -> None:
        """Nothing to follow: every check reads the rows against the budgets it is given."""

    async def open(self) -> None:
        """The connection was opened with the store."""

    async def close(self) -> None:
        self._executor.shutdown()
        self._conn.close()

    def _hold(
        self, team: str, request_id: str, day: date, budgets: Sequence[Budget], admit: Admit
    ) -> int | None:
        with Transaction(self._conn) as conn:
            standings = []
            for budget in budgets:
                start = period_start(day, budget.period)
                first, last = start.isoformat(), day.isoformat()
                spent = _decimal(conn.execute(_SPENT, (team, budget.currency, first, last)))
                held = _decimal(conn.execute(_HELD, (team, budget.currency, first)))
                standings.append(Standing(budget, start, spent, held))
            holds, lowered = admit(standings)
            conn.executemany(
                _INSERT,
                [
                    (request_id, team, currency, day.isoformat(), decimal_text(amount), self._owner)
                    for currency, amount in holds.items()
                ],
            )
        return lowered

    def _held(self, team: str, since: date) -> list[tuple[date, str, Decimal]]:
        rows = self._conn.execute(_HELD_BY_DAY, (team, since.isoformat())).fetchall()
        return [
            (date.fromisoformat(day), currency, Decimal(amount)) for day, currency, amount in rows
        ]

    def _settle(self, request_id: str, costs: Mapping[str, Decimal] | None) -> None:
        with Transaction(self._conn) as conn:
            if costs is None:
                conn.execute(_DROP, (request_id,))
                return
            conn.executemany(
                _SETTLE,
                [
                    (decimal_text(amount), request_id, currency)
                    for currency, amount in costs.items()
                ],
            )


def _decimal(cursor: sqlite3.Cursor) -> Decimal:
    row = cursor.fetchone()
    return Decimal(row[0]) if row and row[0] is not None else ZERO
