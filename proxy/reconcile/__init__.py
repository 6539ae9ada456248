"""Proving the bill: DeepSeek's balance, polled and compared with the ledger's cost.

One process polls ``GET /user/balance`` with the company key every ``reconcile.
balance_interval`` seconds and stores each snapshot in the ledger; the fall of the balance
between two snapshots (top-ups and grants kept out) is what DeepSeek charged in that window,
and the ledger's cost of the calls that ended in it is what the proxy says it charged. The
difference is the drift: another consumer of the same key, a price the book gets wrong, or
calls the proxy could not see.

balance.py   DeepSeek's balance answer, read exactly (`Balance`, `parse_balance`)
drift.py     the arithmetic of one window: spend, top-ups, grants, drift (pure)
book.py      the SQL, over either ledger (`proxy.ledger.queries.Queries`): snapshots, windows,
             the ledger's cost of a window, the poller's lease, the figures the metrics export
live.py      the serving process's ledger connection for all of it, on a thread of its own
poller.py    `BalancePoller`: the lease, the poll, its failures (one process polls)
report.py    ``python -m proxy report reconcile``: the windows, as a table, CSV or JSON
"""
