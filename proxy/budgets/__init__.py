"""Hard budgets, enforced before a call is dispatched.

A call is admitted only if what its team has spent in the period, plus what the calls already
running may still cost (their holds), plus this call's worst case stays within every hard
budget of the team. Check and hold happen in one step (synchronously on the event loop here; in
one ledger transaction across worker processes), so no concurrent request can slip between
them, the race that lets other gateways' budgets be overrun. When the call ends its hold is
settled to the real cost; a call that never reached DeepSeek, or that DeepSeek refused,
releases it.

Worst case of a call (`CallSize`, from `proxy.bounds`): its prompt bound, all of it at the
cache-miss price, plus its output bound (``max_tokens``, else DeepSeek's maximum output) at the
output price, at the dearest tier of the price version in force. So token costs never pass a
hard budget by a call that makes no server-side tool calls. The overshoot bound is what the
worst case cannot see: server-side tool fees of the calls running when the budget runs out
(0.005 CNY per search or fetch), the tokens those tool calls feed back into the model (trusted
up to `proxy.metering`'s bounds), and, only if a price change takes effect during a call, the
difference to the new price. A crash (``kill -9`` of the proxy or of one worker) ends its
running calls as ``interrupted`` with unknown usage, which adds nothing to the spend: each
crash can pass a budget by at most the worst cases of the calls it cut.

A call without ``max_tokens`` reserves DeepSeek's maximum output (393,216 tokens; 10.6 CNY at
deepseek-v4-pro's peak price), so a budget refuses calls long before it is spent when many run
at once. Two team settings keep the promise and the throughput (`proxy.config.TeamPolicy`):

- ``default_max_tokens`` is written into requests that set none, so the worst case is what the
  call can really cost;
- ``over_budget: lower_max_tokens`` admits a call that no longer fits with ``max_tokens``
  lowered to what every budget can still pay for (the reply then ends with
  ``finish_reason: length`` where DeepSeek stops), as long as that leaves at least
  `MIN_LOWERED_OUTPUT` tokens (or the call's own smaller limit); below that it is refused.

Either way the bound above holds: the lowered limit is part of the worst case reserved.

Where holds live is a strategy (`HoldStore`): in the process (`LocalHolds`), or in the shared
ledger for ``serve --workers N`` (`LedgerHolds`); the guard and its pure decisions (`decide`)
are the same for both.

Calls to a model the price book cannot price cannot be bounded: for a team with a hard budget
they are refused with 403 (`ModelNotPriced`). A call whose usage was lost counts at its
estimate (`proxy.metering`: never above what was held, though DeepSeek may bill it more, as it
may bill a call a crash cut); one whose cost is unknown altogether (nothing to estimate from)
counts nothing, here as in the ledger (it is counted by ``llm_usage_missing_total`` and
alerted as ``UsageMissing``). Spend comes from the ledger when a period starts (and at
start-up), then from settled calls; if the ledger cannot be read, calls of teams with
hard budgets are refused (fail closed, 503).

A live reload (`proxy.reload`) builds a new `BudgetGuard` with the new budgets and policies
around the same `HoldStore`: the holds of running calls stay held and settle as they would
have, and the new amounts apply from the next call (`LocalHolds` says how it follows a budget
added, removed, or moved to another period or currency).
"""

from proxy.budgets.decide import (
    MIN_LOWERED_OUTPUT,
    BudgetExceeded,
    BudgetUnavailable,
    CallSize,
    Standing,
    affordable_output,
    decide,
    worst_cost,
)
from proxy.budgets.guard import BudgetGuard, Reservation
from proxy.budgets.holds import HoldStore, LocalHolds
from proxy.budgets.ledger_holds import LedgerHolds

__all__ = [
    "MIN_LOWERED_OUTPUT",
    "BudgetExceeded",
    "BudgetGuard",
    "BudgetUnavailable",
    "CallSize",
    "HoldStore",
    "LedgerHolds",
    "LocalHolds",
    "Reservation",
    "Standing",
    "affordable_output",
    "decide",
    "worst_cost",
]
