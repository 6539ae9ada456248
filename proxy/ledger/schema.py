"""The ledger's tables, and how a ledger written by an older proxy is brought up to date.

Tables:

- ``usage``: one row per upstream dispatch (primary key: the request id). A row starts as
  ``in_flight`` when the call is dispatched and is replaced by the final record when it ends; a
  final row is never overwritten, so writes are idempotent. ``owner`` is the serving process
  that wrote it (`proxy.ledger.store.release_owner`). Its columns are the record's
  (`proxy.ledger.rows`) and three of the ledger's own: ``state``, ``billing_day``, ``owner``.
- ``usage_cost``: cost and cache savings per row and currency, with the price-book digest and
  version that priced it.
- ``cost_history``: costs replaced by a re-pricing, so every past figure stays auditable.
- ``spend_daily``: spend per team, billing day and currency, kept in the same transaction as the
  rows, so spend gauges and budgets read a handful of rows instead of scanning the ledger.
- ``budget_holds``: what running calls may still cost, for hard budgets shared by several
  workers (`proxy.budgets.LedgerHolds`); a call's hold is dropped in the transaction that
  stores its final record and adds its cost to ``spend_daily``. ``owner`` as in ``usage``.
- ``balance_snapshots``: DeepSeek's balance per currency as the poller read it (total, granted,
  topped up, exact decimal text), and ``balance_windows``: the windows between two snapshots
  that the poller has settled, with their running sums; ``balance_poller``: the lease of the
  one process that polls (`proxy.reconcile`).
- ``meta``: schema version and the billing timezone ``spend_daily`` was built with.

Schema versions: a new ledger gets the current schema; an older one is migrated in place when
it opens, in one transaction (`_MIGRATIONS`); a newer one is refused (`SchemaTooNew`), since
this code cannot know what the newer columns mean. The statements below are what ledgers of
each version hold on disk, so they stay written out: a test checks that the ``usage`` table has
exactly the columns `proxy.ledger.rows` writes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from proxy.ledger.connection import Transaction

SCHEMA_VERSION = 5

_ATTRIBUTION_INDEXES = (
    "CREATE INDEX usage_key_day ON usage (key_id, billing_day)",
    "CREATE INDEX usage_user_day ON usage (end_user, billing_day) WHERE end_user IS NOT NULL",
)
"""Reports and statements by key and by end user read a team's or a user's rows by day.
Tags are a JSON object: SQLite reads them with ``json_extract`` over the rows of the period
(``usage_started``), which no index could narrow for any tag key the config may name."""

_IN_FLIGHT_INDEX = "CREATE INDEX usage_in_flight ON usage (owner) WHERE state = 'in_flight'"
"""The calls running (or left running by a dead process): a few rows however large the ledger,
so releasing a dead worker's calls never scans the whole table."""

_ENDED_INDEX = "CREATE INDEX usage_ended ON usage (ended_at)"
"""Reconciliation sums the cost of the calls that ended between two balance snapshots."""

_RECONCILE = (
    """CREATE TABLE balance_snapshots (   -- DeepSeek's GET /user/balance, one row per currency
    taken_at TEXT NOT NULL,                    -- ISO 8601 UTC, microseconds: sorts as time
    currency TEXT NOT NULL,
    total_balance TEXT NOT NULL,               -- exact decimal text
    granted_balance TEXT NOT NULL,
    topped_up_balance TEXT NOT NULL,
    owner TEXT,                                -- the process that polled
    PRIMARY KEY (currency, taken_at)
)""",
    "CREATE INDEX balance_snapshots_taken ON balance_snapshots (taken_at)",
    """CREATE TABLE balance_windows (     -- windows between two snapshots, settled by the poller
    currency TEXT NOT NULL,
    ended_at TEXT NOT NULL,                    -- the later snapshot's instant
    started_at TEXT NOT NULL,                  -- the earlier one's
    spend TEXT NOT NULL,                       -- the balance's fall, top-ups and grants apart
    ledger_cost TEXT NOT NULL,                 -- the ledger's cost of the calls that ended in it
    spend_sum TEXT NOT NULL,                   -- running sums since the first snapshot
    cost_sum TEXT NOT NULL,
    PRIMARY KEY (currency, ended_at)
)""",
    """CREATE TABLE balance_poller (      -- the lease of the one process that polls the balance
    role TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    lease_until TEXT NOT NULL
)""",
    _ENDED_INDEX,
)
"""Balance reconciliation (`proxy.reconcile`), added by version 5."""

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE usage (
    request_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,                       -- 'in_flight' or 'final'
    team TEXT NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    stream INTEGER NOT NULL,
    model_requested TEXT NOT NULL,
    model_served TEXT,
    started_at TEXT NOT NULL,                  -- ISO 8601 UTC, microseconds: sorts as time
    billing_day TEXT NOT NULL,                 -- started_at's date in the billing timezone
    first_byte_at TEXT,
    ended_at TEXT NOT NULL,
    cache_hit_tokens INTEGER,
    cache_miss_tokens INTEGER,
    output_tokens INTEGER,
    reasoning_tokens INTEGER,
    prompt_tokens INTEGER,
    tool_calls TEXT NOT NULL,                  -- JSON object
    upstream_status INTEGER,
    upstream_trace_id TEXT,
    outcome TEXT NOT NULL,
    usage_source TEXT NOT NULL,
    priced INTEGER NOT NULL,
    unpriced_reason TEXT,
    billed_model TEXT,
    price_version TEXT,
    schedule_version TEXT,
    tier TEXT,
    priced_at TEXT,
    price_book TEXT NOT NULL,
    flags TEXT NOT NULL,                       -- JSON list
    owner TEXT,                                -- the process that wrote the row (NULL: v1)
    client_status INTEGER,                     -- the status the client got (NULL: v1, v2)
    tags TEXT NOT NULL DEFAULT '{}',           -- JSON object of attribution tags (v4)
    end_user TEXT                              -- the end user the client named (v4)
)""",
    "CREATE INDEX usage_started ON usage (started_at)",
    "CREATE INDEX usage_team_day ON usage (team, billing_day)",
    _IN_FLIGHT_INDEX,
    *_ATTRIBUTION_INDEXES,
    """CREATE TABLE usage_cost (
    request_id TEXT NOT NULL REFERENCES usage (request_id),
    currency TEXT NOT NULL,
    amount TEXT NOT NULL,                      -- exact decimal text
    cache_savings TEXT NOT NULL,
    PRIMARY KEY (request_id, currency)
)""",
    """CREATE TABLE cost_history (
    request_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount TEXT,                               -- NULL: the row was not priced
    price_book TEXT NOT NULL,
    price_version TEXT,
    replaced_at TEXT NOT NULL,
    replaced_by_book TEXT NOT NULL
)""",
    """CREATE TABLE budget_holds (   -- hard-budget reservations across workers
    request_id TEXT NOT NULL,
    team TEXT NOT NULL,
    currency TEXT NOT NULL,
    day TEXT NOT NULL,
    amount TEXT NOT NULL,
    owner TEXT,                                -- the process holding it (NULL: v1)
    PRIMARY KEY (request_id, currency)
)""",
    "CREATE INDEX budget_holds_team ON budget_holds (team, currency, day)",
    """CREATE TABLE spend_daily (
    team TEXT NOT NULL,
    day TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount TEXT NOT NULL,
    PRIMARY KEY (team, day, currency)
)""",
    *_RECONCILE,
)
"""The current schema, one statement each (they run inside the transaction that checks the
ledger is new, which ``executescript`` would commit). Columns added by a migration come last,
as ``ALTER TABLE`` puts them, so a migrated ledger and a new one have the same shape."""

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 1 -> 2: holds and in-flight rows carry their owner, whose death releases them.
    1: (
        "ALTER TABLE usage ADD COLUMN owner TEXT",
        "ALTER TABLE budget_holds ADD COLUMN owner TEXT",
        _IN_FLIGHT_INDEX,
    ),
    # 2 -> 3: the status the client got is recorded, not re-derived (it may differ from
    # DeepSeek's when the proxy answered in its stead).
    2: ("ALTER TABLE usage ADD COLUMN client_status INTEGER",),
    # 3 -> 4: attribution below the team: tags from the request header and the end user.
    3: (
        "ALTER TABLE usage ADD COLUMN tags TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE usage ADD COLUMN end_user TEXT",
        *_ATTRIBUTION_INDEXES,
    ),
    # 4 -> 5: DeepSeek's balance polled and reconciled with the ledger's cost.
    4: _RECONCILE,
}
"""Version -> the statements that bring a ledger of that version to the next one."""


class SchemaTooNew(Exception):
    """The ledger was written by a newer proxy, with a schema this code does not know."""

    def __init__(self, path: Path, found: int) -> None:
        super().__init__(
            f"{path} has ledger schema version {found}, newer than this proxy "
            f"knows ({SCHEMA_VERSION}): run the proxy version that wrote it, or a "
            "newer one"
        )


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema in a new ledger, or bring an older one to `SCHEMA_VERSION`, in one
    transaction (concurrent openers wait for it, then find the ledger current)."""
    with Transaction(conn):
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            for statement in _SCHEMA:
                conn.execute(statement)
            found = SCHEMA_VERSION
        else:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            found = int(row[0]) if row else 1  # version 1 wrote it in a second transaction
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(path, found)
        for version in range(found, SCHEMA_VERSION):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
