"""The arithmetic of one window between two balance snapshots: pure, exact, no I/O.

Per currency, between a snapshot `before` and a later one `after`, with ``G`` the granted and
``T`` the topped-up balance (DeepSeek spends the granted balance first):

    spend   = max(0, G_before - G_after) + max(0, T_before - T_after)
    grants  = max(0, G_after - G_before)           a rise of the granted balance
    top_ups = max(0, T_after - T_before)           a rise of the topped-up balance
    drift   = spend - ledger_cost                  what DeepSeek charged beyond the ledger
    ratio   = drift / ledger_cost                  (none when the ledger cost is 0)

A rise is never spend: a top-up or a grant in the window is recognized and kept out of it. The
granted-first rule is what makes that work: while the granted balance lasts, every charge
comes out of it, so a rise of the topped-up balance is the whole top-up. What balances alone
cannot tell apart: in a window where a top-up came in once the granted balance was used up (0
at the window's end: every top-up of a paid account without grants) the topped-up balance
shows the top-up net of the charges taken from it after it came in; likewise a grant and the
charges taken from the granted balance after it. In such a window the charges the rise hides
are taken as the ledger says: spend is the ledger cost when that is more than the balance
shows, and the top-up (or grant) that much larger, so the balance still adds up; the window's
drift is then 0. A top-up is therefore never a false drift, at the price of not judging the
calls of that one window: an overcharge in it reads as a slightly smaller top-up. A charge
the balance shows beyond the ledger's (a fall of the granted balance above it) still shows.

The ledger cost of a window is the cost of the calls that *ended* in it, ``(start, end]``, by
the proxy's clock (`proxy.reconcile.book.ledger_costs`). DeepSeek charges when its side of a
call ends, which is not exactly the proxy's instant: a call that ends around a snapshot may be
charged in the neighbouring window, so one window's drift can be off by such calls, in
opposite directions in two adjacent windows; the running sums are not, and the alert looks
at drift sustained over many windows (docs/operations.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from proxy.formats import ZERO
from proxy.reconcile.balance import Balance


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One currency's balance as polled at `taken_at` (the proxy's clock when the answer
    arrived)."""

    taken_at: datetime
    balance: Balance


@dataclass(frozen=True, slots=True)
class Window:
    """One currency between two consecutive snapshots."""

    before: Snapshot
    after: Snapshot
    spend: Decimal
    """What the balance fell by, top-ups and grants kept out."""
    top_ups: Decimal
    grants: Decimal
    ledger_cost: Decimal
    """The ledger's cost of the calls that ended in ``(start, end]``."""

    @property
    def currency(self) -> str:
        return self.after.balance.currency

    @property
    def start(self) -> datetime:
        return self.before.taken_at

    @property
    def end(self) -> datetime:
        return self.after.taken_at

    @property
    def drift(self) -> Decimal:
        return self.spend - self.ledger_cost

    @property
    def ratio(self) -> Decimal | None:
        return ratio(self.drift, self.ledger_cost)


def ratio(drift: Decimal, ledger_cost: Decimal) -> Decimal | None:
    """Drift as a share of the ledger's cost: how far the book is off; None when the ledger
    has no cost to compare with (the absolute drift still says it)."""
    return None if ledger_cost == ZERO else drift / ledger_cost


def window(before: Snapshot, after: Snapshot, ledger_cost: Decimal) -> Window:
    """The window from `before` to `after` (same currency, `after` later)."""
    assert before.balance.currency == after.balance.currency, "one currency per window"
    assert before.taken_at < after.taken_at, "snapshots in time order"
    granted = after.balance.granted - before.balance.granted
    topped = after.balance.topped_up - before.balance.topped_up
    spend = max(ZERO, -granted) + max(ZERO, -topped)
    top_ups, grants = max(ZERO, topped), max(ZERO, granted)
    topped_up_after_running_out = topped > ZERO and after.balance.granted <= ZERO
    if (topped_up_after_running_out or granted > ZERO) and ledger_cost > spend:
        # The rise hides the charges taken from the same balance after it: count them as
        # the ledger says and the rise as that much larger (see the module docstring).
        hidden = ledger_cost - spend
        spend = ledger_cost
        if topped_up_after_running_out:
            top_ups += hidden
        else:
            grants += hidden
    return Window(before, after, spend, top_ups, grants, ledger_cost)


@dataclass(frozen=True, slots=True)
class Running:
    """Sums over every window since a currency's first snapshot."""

    spend: Decimal = ZERO
    ledger_cost: Decimal = ZERO

    @property
    def drift(self) -> Decimal:
        return self.spend - self.ledger_cost

    def plus(self, window: Window) -> Running:
        return Running(self.spend + window.spend, self.ledger_cost + window.ledger_cost)
