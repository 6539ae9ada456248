"""The ledger's tables in PostgreSQL (step 3: replicas share one ledger), and their migrations.

The same tables as the SQLite ledger (`proxy.ledger.schema`), so a ledger copied from one to
the other means the same thing, plus ``replicas``: the leases by which replicas sharing the
database release a dead one's calls and holds (`proxy.ledger.leases`), which a ledger of one
machine does not need, and the function that checks and holds a hard budget in one statement
(`HOLD_FUNCTION`). Versions count on from SQLite's: version 3 is the SQLite ledger's version 3
in PostgreSQL, version 4 adds ``replicas``, version 5 the function, version 7 the balance
reconciliation's tables (`proxy.reconcile`). The ``usage`` table's
columns come from the record's own fields (`proxy.records.FIELDS`), each in its native type
(`Kind.pg_type`: ``timestamptz``, ``bigint``, ``boolean``, ``jsonb``), money is ``numeric``
(exact, as the SQLite ledger's decimal text is), and ``billing_day`` a ``date``.

Several replicas may start at once against a new or older database: `migrate` runs inside one
transaction holding a transaction-level advisory lock, so the first creates or migrates and the
others then find the schema current. A database written by a newer proxy is refused, as the
SQLite ledger refuses a newer file.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.ledger.rows import LEDGER_COLUMNS
from proxy.records import FIELDS

SCHEMA_VERSION = 7
"""Version 3 was the first PostgreSQL schema (the SQLite ledger's version 3); 4 adds the
replicas' leases; 5 the one-statement budget hold (`HOLD_FUNCTION`); 6 the attribution
columns (tags, end user; the SQLite ledger's version 4); 7 the balance snapshots, settled
windows and the poller's lease (the SQLite ledger's version 5)."""

MIGRATION_LOCK = 0x7072_6F78_7931
"""The advisory-lock key every replica takes while it creates or migrates the schema."""

_LEDGER_TYPES = {"state": "text NOT NULL", "billing_day": "date NOT NULL", "owner": "text"}
assert tuple(_LEDGER_TYPES) == LEDGER_COLUMNS, "the ledger's own columns are SQLite's"


_ATTRIBUTION_INDEXES = (
    "CREATE INDEX usage_key_day ON usage (key_id, billing_day)",
    "CREATE INDEX usage_user_day ON usage (end_user, billing_day) WHERE end_user IS NOT NULL",
    "CREATE INDEX usage_tags ON usage USING gin (tags jsonb_path_ops)",
)
"""Reports by key, end user and tag (``tags @> '{"project": "ranker"}'``)."""


def _usage_table() -> str:
    columns = [
        f"{field.name} {field.kind.pg_type}{'' if field.kind.empty is None else ' NOT NULL'}"
        for field in FIELDS
        if field.kind.stored
    ]
    columns += [f"{name} {kind}" for name, kind in _LEDGER_TYPES.items()]
    columns.append("PRIMARY KEY (request_id)")
    return "CREATE TABLE usage (\n    " + ",\n    ".join(columns) + "\n)"


_LEDGER: tuple[str, ...] = (
    "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    _usage_table(),
    "CREATE INDEX usage_started ON usage (started_at)",
    "CREATE INDEX usage_team_day ON usage (team, billing_day)",
    "CREATE INDEX usage_in_flight ON usage (owner) WHERE state = 'in_flight'",
    *_ATTRIBUTION_INDEXES,
    """CREATE TABLE usage_cost (
    request_id text NOT NULL REFERENCES usage (request_id),
    currency text NOT NULL,
    amount numeric NOT NULL,
    cache_savings numeric NOT NULL,
    PRIMARY KEY (request_id, currency)
)""",
    """CREATE TABLE cost_history (
    request_id text NOT NULL,
    currency text NOT NULL,
    amount numeric,
    price_book text NOT NULL,
    price_version text,
    replaced_at timestamptz NOT NULL,
    replaced_by_book text NOT NULL
)""",
    """CREATE TABLE budget_holds (
    request_id text NOT NULL,
    team text NOT NULL,
    currency text NOT NULL,
    day date NOT NULL,
    amount numeric NOT NULL,
    owner text,
    PRIMARY KEY (request_id, currency)
)""",
    "CREATE INDEX budget_holds_team ON budget_holds (team, currency, day)",
    """CREATE TABLE spend_daily (
    team text NOT NULL,
    day date NOT NULL,
    currency text NOT NULL,
    amount numeric NOT NULL,
    PRIMARY KEY (team, day, currency)
)""",
)
_REPLICAS = (
    "CREATE INDEX budget_holds_owner ON budget_holds (owner)",
    """CREATE TABLE replicas (
    owner text PRIMARY KEY,
    host text NOT NULL,
    started_at timestamptz NOT NULL,
    lease_until timestamptz NOT NULL
)""",
)
_RECONCILE = (
    """CREATE TABLE balance_snapshots (
    taken_at timestamptz NOT NULL,
    currency text NOT NULL,
    total_balance numeric NOT NULL,
    granted_balance numeric NOT NULL,
    topped_up_balance numeric NOT NULL,
    owner text,
    PRIMARY KEY (currency, taken_at)
)""",
    "CREATE INDEX balance_snapshots_taken ON balance_snapshots (taken_at)",
    """CREATE TABLE balance_windows (
    currency text NOT NULL,
    ended_at timestamptz NOT NULL,
    started_at timestamptz NOT NULL,
    spend numeric NOT NULL,
    ledger_cost numeric NOT NULL,
    spend_sum numeric NOT NULL,
    cost_sum numeric NOT NULL,
    PRIMARY KEY (currency, ended_at)
)""",
    """CREATE TABLE balance_poller (
    role text PRIMARY KEY,
    owner text NOT NULL,
    lease_until timestamptz NOT NULL
)""",
    "CREATE INDEX usage_ended ON usage (ended_at)",
)
"""Balance reconciliation (`proxy.reconcile`): the SQLite ledger's version 5 tables."""
HOLD_FUNCTION = """CREATE FUNCTION proxy_hold(
    lock_space integer, lock_key integer, hold_team text, hold_request text, hold_owner text,
    hold_day date, currencies text[], firsts date[], limits numeric[], worst numeric[],
    hold_currencies text[], hold_amounts numeric[]
) RETURNS TABLE (spent numeric[], held numeric[], admitted boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    fits boolean := true;
    spent_sum numeric;
    held_sum numeric;
BEGIN
    spent := '{}';
    held := '{}';
    PERFORM pg_advisory_xact_lock(lock_space, lock_key);
    -- VOLATILE: every query below takes a fresh snapshot, after the lock was granted.
    FOR i IN 1 .. cardinality(currencies) LOOP
        SELECT COALESCE(sum(s.amount), 0) INTO spent_sum FROM spend_daily s
        WHERE s.team = hold_team AND s.currency = currencies[i]
          AND s.day BETWEEN firsts[i] AND hold_day;
        SELECT COALESCE(sum(h.amount), 0) INTO held_sum FROM budget_holds h
        WHERE h.team = hold_team AND h.currency = currencies[i] AND h.day >= firsts[i];
        spent := spent || spent_sum;
        held := held || held_sum;
        IF spent_sum + held_sum + worst[i] > limits[i] THEN
            fits := false;
        END IF;
    END LOOP;
    IF fits THEN
        INSERT INTO budget_holds (request_id, team, currency, day, amount, owner)
        SELECT hold_request, hold_team, c, hold_day, a, hold_owner
        FROM unnest(hold_currencies, hold_amounts) AS x(c, a);
    END IF;
    admitted := fits;
    RETURN NEXT;
END
$$"""
"""A hard-budget admission in one statement, so one round trip: the team's advisory lock, its
standings, and the holds when every budget has room for the call's worst case (the rule of
`proxy.budgets.decide.decide` when nothing needs lowering); the standings are returned
either way, for the decision to be made in Python when the call does not fit as it is. The
lock is held until the statement's transaction ends."""

SCHEMA: tuple[str, ...] = (*_LEDGER, *_REPLICAS, HOLD_FUNCTION, *_RECONCILE)
"""The current schema, one statement each."""

MIGRATIONS: dict[int, tuple[str, ...]] = {
    3: _REPLICAS,
    4: (HOLD_FUNCTION,),
    5: (
        "ALTER TABLE usage ADD COLUMN tags jsonb NOT NULL DEFAULT '{}'",
        "ALTER TABLE usage ADD COLUMN end_user text",
        *_ATTRIBUTION_INDEXES,
    ),
    6: _RECONCILE,
}
"""Version -> the statements that bring a database of that version to the next one."""


class SchemaTooNew(Exception):
    """The database was written by a newer proxy, with a schema this code does not know."""

    def __init__(self, where: str, found: int) -> None:
        super().__init__(
            f"the PostgreSQL ledger {where} has schema version {found}, newer than this proxy "
            f"knows ({SCHEMA_VERSION}): run the proxy version that wrote it, or a newer one"
        )
        self.found = found


class Connection(Protocol):
    """What `migrate` needs of a database connection (asyncpg's has it)."""

    def transaction(self) -> Any: ...

    async def execute(self, query: str, *args: object) -> str: ...

    async def fetchval(self, query: str, *args: object) -> Any: ...


async def migrate(conn: Connection, where: str) -> int:
    """Create the schema in an empty database, or bring an older one to `SCHEMA_VERSION`;
    returns the version found (0: none). `where` names the database in errors (no password)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        exists = await conn.fetchval("SELECT to_regclass('meta') IS NOT NULL")
        if not exists:
            for statement in SCHEMA:
                await conn.execute(statement)
            found = 0
        else:
            found = int(await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'"))
            if found > SCHEMA_VERSION:
                raise SchemaTooNew(where, found)
            for version in range(found, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    await conn.execute(statement)
        await conn.execute(
            "INSERT INTO meta VALUES ('schema_version', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            str(SCHEMA_VERSION),
        )
    return found
