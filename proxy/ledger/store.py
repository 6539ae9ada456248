"""The ledger store: usage records on disk, exactly, behind a small interface.

`LedgerStore` is what the rest of the proxy uses; `SQLiteLedger` is the embedded default (a
server database can implement the same interface later). Money is stored as decimal text and
summed with an exact `Decimal` aggregate (`decimal_sum`), never as floats.

Tables:

- ``usage``: one row per upstream dispatch (primary key: the request id). A row starts as
  ``in_flight`` when the call is dispatched and is replaced by the final record when it ends; a
  final row is never overwritten, so writes are idempotent. ``owner`` is the serving process
  that wrote it (`release_owner`).
- ``usage_cost``: cost and cache savings per row and currency, with the price-book digest and
  version that priced it.
- ``cost_history``: costs replaced by a re-pricing, so every past figure stays auditable.
- ``spend_daily``: spend per team, billing day and currency, kept in the same transaction as the
  rows, so spend gauges and budgets read a handful of rows instead of scanning the ledger.
- ``budget_holds``: what running calls may still cost, for hard budgets shared by several
  workers (`proxy.budgets.LedgerHolds`); a call's hold is dropped in the transaction that
  stores its final record and adds its cost to ``spend_daily``. ``owner`` as in ``usage``.
- ``meta``: schema version and the billing timezone ``spend_daily`` was built with.

A process's in-flight rows and holds must not outlive it: when it dies they are released
(`release_owner`), by the supervisor of ``serve --workers N`` as soon as it reaps the worker,
and for every owner when the proxy starts.

Schema versions: a new ledger gets the current schema; an older one is migrated in place when
it opens, in one transaction (`_MIGRATIONS`); a newer one is refused (`SchemaTooNew`), since
this code cannot know what the newer columns mean.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed transaction survives the
process being killed (``kill -9``); only an operating-system crash or power loss can lose the
last commits.

A ledger file deleted or replaced while the proxy runs would go on taking writes that no one
can read again (the open connection keeps the unlinked file); `SQLiteLedger.moved` tells, and
`SQLiteLedger.save_copy` rescues what the connection still sees (`proxy.ledger.writer`).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from proxy.records import UsageRecord

SCHEMA_VERSION = 2
_ZERO = Decimal(0)

_IN_FLIGHT_INDEX = "CREATE INDEX usage_in_flight ON usage (owner) WHERE state = 'in_flight'"
"""The calls running (or left running by a dead process): a few rows however large the ledger,
so releasing a dead worker's calls never scans the whole table."""

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
    owner TEXT                                 -- the process that wrote the row (NULL: v1)
)""",
    "CREATE INDEX usage_started ON usage (started_at)",
    "CREATE INDEX usage_team_day ON usage (team, billing_day)",
    _IN_FLIGHT_INDEX,
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
)
"""The current schema, one statement each (they run inside the transaction that checks the
ledger is new, which ``executescript`` would commit)."""

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 1 -> 2: holds and in-flight rows carry their owner, whose death releases them.
    1: (
        "ALTER TABLE usage ADD COLUMN owner TEXT",
        "ALTER TABLE budget_holds ADD COLUMN owner TEXT",
        _IN_FLIGHT_INDEX,
    ),
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


_INTERRUPT = (
    "UPDATE usage SET state = 'final', outcome = 'interrupted', "
    "unpriced_reason = 'the proxy process stopped before the call ended; usage unknown' "
    "WHERE state = 'in_flight' AND (?1 IS NULL OR owner = ?1)"
)
_DROP_HOLDS = "DELETE FROM budget_holds WHERE ?1 IS NULL OR owner = ?1"


def release_owner(conn: sqlite3.Connection, owner: str | None) -> tuple[int, int]:
    """End what a dead serving process left, in one transaction: its ``in_flight`` rows become
    final ``interrupted`` rows (usage unknown, so never priced) and its budget holds are
    dropped, so they stop counting against hard budgets. Returns (calls ended, holds dropped).

    `owner` None means every owner: at start-up, when no process of this ledger can be running
    (`SQLiteLedger`); the supervisor of ``serve --workers N`` names the worker it has just
    reaped (`proxy.workers`). Only a dead owner's state may be released: a live one would
    still settle its holds and finish its rows.
    """
    with Transaction(conn):
        calls = conn.execute(_INTERRUPT, (owner,)).rowcount
        holds = conn.execute(_DROP_HOLDS, (owner,)).rowcount
    return calls, holds


_COLUMNS = (
    "request_id",
    "state",
    "team",
    "key_id",
    "endpoint",
    "stream",
    "model_requested",
    "model_served",
    "started_at",
    "billing_day",
    "first_byte_at",
    "ended_at",
    "cache_hit_tokens",
    "cache_miss_tokens",
    "output_tokens",
    "reasoning_tokens",
    "prompt_tokens",
    "tool_calls",
    "upstream_status",
    "upstream_trace_id",
    "outcome",
    "usage_source",
    "priced",
    "unpriced_reason",
    "billed_model",
    "price_version",
    "schedule_version",
    "tier",
    "priced_at",
    "price_book",
    "flags",
    "owner",
)
# Built from the constant column names above, never from input; values are parameters.
_INSERT_USAGE = f"INSERT INTO usage ({', '.join(_COLUMNS)}) VALUES "  # noqa: S608
_ON_CONFLICT_USAGE = "".join(
    (
        " ON CONFLICT (request_id) DO UPDATE SET ",
        ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:]),
        # A final record replaces an in-flight row, or a row that recovery ended as `interrupted`
        # with unknown usage (the call's real record, spilled and replayed after a restart).
        " WHERE excluded.state = 'final' AND (usage.state = 'in_flight'",
        " OR (usage.outcome = 'interrupted' AND usage.usage_source = 'unknown'))",
    )
)
_INSERT_COST = "INSERT OR REPLACE INTO usage_cost VALUES "
MAX_ROWS_PER_STATEMENT = 64
"""Rows per multi-row INSERT (32 columns x 64 = 2,048 parameters, far below SQLite's 32,766)."""


def insert_rows(
    conn: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]], tail: str = ""
) -> None:
    """``head VALUES (...), (...) tail`` for many rows in a few statements.

    Why not ``executemany``: Python's sqlite3 releases the interpreter lock around every
    ``sqlite3_step``, once per row, and the ledger thread then has to win the lock back from
    the busy event loop each time; measured in bench/, that hand-off cost the proxy about
    60 us of CPU per call, three times the writing itself. One multi-row statement steps once.
    Statements are cut into power-of-two row counts (`statement_sizes`).
    """
    if not rows:
        return
    one = "(" + ", ".join("?" * len(rows[0])) + ")"
    for start, size in statement_sizes(len(rows)):
        params = [value for row in rows[start : start + size] for value in row]
        conn.execute(head + ", ".join([one] * size) + tail, params)


def statement_sizes(count: int) -> Iterator[tuple[int, int]]:
    """(start, size) of consecutive groups covering `count` items, each a power of two of at
    most `MAX_ROWS_PER_STATEMENT`: a statement per exact size would be parsed anew for most
    batches and crowd the statement cache, while these are at most seven texts."""
    start = 0
    while start < count:
        size = min(MAX_ROWS_PER_STATEMENT, 1 << ((count - start).bit_length() - 1))
        yield start, size
        start += size


def settled_ids(
    conn: sqlite3.Connection, request_ids: list[str], *, interrupted: bool = False
) -> set[str]:
    """Which of these requests have their real final row already (a record written twice is
    not written again). A row that recovery ended as ``interrupted`` with unknown usage is
    not settled (the call's own record, spilled when the ledger could not take it, replaces
    it when it is replayed), unless `interrupted` says such rows count too."""
    found: set[str] = set()
    for start, size in statement_sizes(len(request_ids)):
        marks = ", ".join("?" * size)
        ids = request_ids[start : start + size]
        found.update(
            r
            for (r,) in (
                conn.execute(
                    f"SELECT request_id FROM usage WHERE state = 'final' "  # noqa: S608
                    f"AND request_id IN ({marks})",
                    ids,
                )
                if interrupted
                else conn.execute(
                    f"SELECT request_id FROM usage WHERE state = 'final' "  # noqa: S608
                    f"AND NOT (outcome = 'interrupted' AND usage_source = 'unknown') "
                    f"AND request_id IN ({marks})",
                    ids,
                )
            )
        )
    return found


class DecimalSum:
    """SQLite aggregate summing decimal text exactly (SQLite's SUM would use floats)."""

    def __init__(self) -> None:
        self.total: Decimal | None = None

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total = (self.total or Decimal(0)) + Decimal(value)

    def finalize(self) -> str | None:
        return None if self.total is None else money(self.total)


def money(amount: Decimal) -> str:
    """Exact decimal text without exponent or trailing zeros (``0.00114560`` -> ``0.0011456``).

    ``str`` first, as it is about half the work of ``format(amount, "f")`` (four amounts per
    row); it gives an exponent only for very small or large amounts, which ``f`` then writes.
    """
    text = str(amount)
    if "E" in text:
        text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


_THREE_DIGITS = tuple(f"{n:03d}" for n in range(1000))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


class _SecondText:
    """The last second `iso` formatted and its text up to the seconds, as one tuple, so a
    thread always reads a matching pair."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: tuple[int, str] = (0, "1970-01-01T00:00:00")


_SECOND_TEXT = _SecondText()


def iso(instant: datetime | None) -> str | None:
    """Fixed-width UTC text (microseconds always present), so text order is time order.

    Every row has four instants, and `datetime.isoformat` (or ``%``) was a tenth of the ledger
    thread's work: the text up to the second is reused while instants stay in the same second,
    and the microseconds come from a table.
    """
    if instant is None:
        return None
    if instant.tzinfo is not UTC:
        instant = instant.astimezone(UTC)
    second = (instant - _EPOCH) // _SECOND
    cached, text = _SECOND_TEXT.last
    if second != cached:
        text = "%04d-%02d-%02dT%02d:%02d:%02d" % (  # noqa: UP031
            instant.year,
            instant.month,
            instant.day,
            instant.hour,
            instant.minute,
            instant.second,
        )
        _SECOND_TEXT.last = (second, text)
    micros = instant.microsecond
    return text + "." + _THREE_DIGITS[micros // 1000] + _THREE_DIGITS[micros % 1000] + "Z"


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the ledger's settings and the `decimal_sum` aggregate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA foreign_keys = ON")
    # typeshed types aggregate steps as taking ints; ours takes the stored decimal text.
    conn.create_aggregate("decimal_sum", 1, DecimalSum)  # type: ignore[arg-type]
    return conn


def add_spend(conn: sqlite3.Connection, team: str, day: str, currency: str, delta: Decimal) -> None:
    """Adjust a daily spend sum exactly (the caller holds the transaction)."""
    row = conn.execute(
        "SELECT amount FROM spend_daily WHERE team = ? AND day = ? AND currency = ?",
        (team, day, currency),
    ).fetchone()
    total = Decimal(row[0]) + delta if row else delta
    conn.execute(
        "INSERT OR REPLACE INTO spend_daily VALUES (?, ?, ?, ?)",
        (team, day, currency, money(total)),
    )


@dataclass(frozen=True, slots=True)
class SpendRow:
    team: str
    day: date
    currency: str
    amount: Decimal


SpendReader = Callable[[date, date], Sequence[SpendRow]]
"""Daily spend rows between two billing days (inclusive): `SQLiteLedger.spend`."""


class LedgerStore(Protocol):
    """What the proxy needs from a ledger (the SQLite one below is the default)."""

    path: Path
    """Where the ledger lives; what is rescued from it is saved beside it."""

    def write(self, pending: Sequence[UsageRecord], final: Sequence[UsageRecord]) -> None: ...

    def spend(self, since: date, until: date) -> list[SpendRow]: ...

    def moved(self) -> bool: ...

    def save_copy(self, target: Path) -> None: ...

    def close(self) -> None: ...


class SQLiteLedger:
    """The embedded ledger. One writer (the `LedgerWriter` thread); readers open their own."""

    def __init__(
        self,
        path: Path,
        billing_timezone: ZoneInfo,
        *,
        recover: bool = True,
        owner: str | None = None,
    ) -> None:
        """Open (creating or migrating if needed) the ledger; `SchemaTooNew` if a newer proxy
        wrote it. `recover` ends rows left in flight and drops budget holds: only for the one
        process that starts first, never for a worker that joins running siblings (it would
        end their calls). `owner` marks the rows this store writes (`release_owner`); tools
        and tests that serve no calls may leave it None."""
        self.path = path
        self.billing_timezone = billing_timezone
        self._owner = owner
        self._conn = connect(path)  # the writer thread's
        self._identity = _file_identity(path)
        try:
            migrate(self._conn, path)
        except BaseException:
            self._conn.close()
            raise
        self._reader = connect(path)  # the event loop's (spend gauges, budgets)
        self._check_meta()
        self.interrupted = self._recover() if recover else 0

    def _check_meta(self) -> None:
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        tz = str(self.billing_timezone.key)
        with self._transaction():
            if meta.get("billing_timezone") not in (None, tz):
                self._rebuild_billing_days()
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('billing_timezone', ?)", (tz,))

    def _rebuild_billing_days(self) -> None:
        """The billing timezone changed: re-derive every row's billing day and the daily sums."""
        rows = self._conn.execute("SELECT request_id, started_at FROM usage").fetchall()
        self._conn.executemany(
            "UPDATE usage SET billing_day = ? WHERE request_id = ?",
            [(self._day(datetime.fromisoformat(s)), r) for r, s in rows],
        )
        self._conn.execute("DELETE FROM spend_daily")
        self._conn.execute(
            "INSERT INTO spend_daily SELECT u.team, u.billing_day, c.currency, "
            "decimal_sum(c.amount) FROM usage u JOIN usage_cost c USING (request_id) "
            "GROUP BY u.team, u.billing_day, c.currency"
        )

    def _recover(self) -> int:
        """Rows still in flight when the ledger opens belong to a proxy that died mid-call."""
        calls, _ = release_owner(self._conn, None)
        return calls

    def _transaction(self) -> Transaction:
        return Transaction(self._conn)

    def _day(self, instant: datetime) -> str:
        return instant.astimezone(self.billing_timezone).date().isoformat()

    def _row(self, record: UsageRecord, state: str, day: str) -> tuple[Any, ...]:
        started, ended = iso(record.started_at), iso(record.ended_at)
        priced_at = record.priced_at
        return (
            record.request_id,
            state,
            record.team,
            record.key_id,
            record.endpoint,
            int(record.stream),
            record.model_requested,
            record.model_served,
            started,
            day,
            iso(record.first_byte_at),
            ended,
            record.cache_hit_tokens,
            record.cache_miss_tokens,
            record.output_tokens,
            record.reasoning_tokens,
            record.prompt_tokens,
            json.dumps(dict(record.tool_calls), sort_keys=True) if record.tool_calls else "{}",
            record.upstream_status,
            record.upstream_trace_id,
            record.outcome,
            record.usage_source,
            int(record.priced),
            record.unpriced_reason,
            record.billed_model,
            record.price_version,
            record.schedule_version,
            record.tier,
            started
            if priced_at is record.started_at
            else ended
            if priced_at is record.ended_at
            else iso(priced_at),
            record.price_book,
            json.dumps(list(record.flags)) if record.flags else "[]",
            self._owner,
        )

    def write(self, pending: Sequence[UsageRecord], final: Sequence[UsageRecord]) -> None:
        """Store a batch in one transaction. Idempotent: a final row is never written twice.

        The writer thread shares the interpreter with the event loop, so the batch is written
        with few statements (multi-row INSERTs, `insert_rows`) and the daily sums are adjusted
        once per team, day and currency rather than once per row.
        """
        conn = self._conn
        with self._transaction():
            if pending:
                insert_rows(
                    conn,
                    _INSERT_USAGE,
                    [self._row(r, "in_flight", self._day(r.started_at)) for r in pending],
                    _ON_CONFLICT_USAGE,
                )
            if not final:
                return
            done = self._already_final([r.request_id for r in final])
            rows = []
            costs = []
            spend: dict[tuple[str, str, str], Decimal] = {}
            for record in final:
                if record.request_id in done:
                    continue
                day = self._day(record.started_at)
                rows.append(self._row(record, "final", day))
                for currency, amount in record.costs.items():
                    savings = record.cache_savings.get(currency, _ZERO)
                    costs.append((record.request_id, currency, money(amount), money(savings)))
                    key = (record.team, day, currency)
                    spend[key] = spend.get(key, _ZERO) + amount
            insert_rows(conn, _INSERT_USAGE, rows, _ON_CONFLICT_USAGE)
            insert_rows(conn, _INSERT_COST, costs)
            for (team, day, currency), delta in spend.items():
                add_spend(conn, team, day, currency, delta)
            if conn.execute("SELECT EXISTS (SELECT 1 FROM budget_holds)").fetchone()[0]:
                conn.executemany(
                    "DELETE FROM budget_holds WHERE request_id = ?",
                    [(record.request_id,) for record in final],
                )

    def _already_final(self, request_ids: list[str]) -> set[str]:
        return settled_ids(self._conn, request_ids)

    def spend(self, since: date, until: date) -> list[SpendRow]:
        """Daily spend rows with ``since <= day <= until`` (billing days)."""
        rows = self._reader.execute(
            "SELECT team, day, currency, amount FROM spend_daily WHERE day BETWEEN ? AND ?",
            (since.isoformat(), until.isoformat()),
        ).fetchall()
        return [SpendRow(t, date.fromisoformat(d), c, Decimal(a)) for t, d, c, a in rows]

    def moved(self) -> bool:
        """Whether `path` no longer leads to the file this ledger opened: deleted, renamed or
        replaced. One ``stat``, cheap enough for the writer to ask every second. A ``stat``
        that fails for another reason (permissions, I/O) cannot tell, and says no."""
        try:
            return _file_identity(self.path) != self._identity
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def save_copy(self, target: Path) -> None:
        """Copy the database as the writer's connection sees it (the last commits included)
        to `target`, with SQLite's backup API: once the file was deleted, that connection is
        the only way left to its rows. Written under a temporary name and renamed, so
        `target` is either complete or absent. Called from the writer's thread only."""
        partial = target.with_name(target.name + ".partial")
        try:
            with contextlib.closing(sqlite3.connect(partial)) as copy:
                self._conn.backup(copy)
            partial.replace(target)
        except BaseException:
            for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
                leftover.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        self._conn.close()
        self._reader.close()


def _file_identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


class Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection.

    SQLite rolls a transaction back by itself on some errors (a full disk, an I/O error), and
    a ``ROLLBACK`` then would fail and hide the error that matters; a ``COMMIT`` that fails may
    leave it open, and the connection could never begin another. So: roll back exactly when a
    transaction is still open.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
