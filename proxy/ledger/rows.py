"""A usage record as a ledger row and back, from the record's own schema.

The ``usage`` table's columns are the record's stored fields (`proxy.records.FIELDS`: all but
the money, which goes to ``usage_cost``, one row per currency) and three of the ledger's own:
``state`` (``in_flight`` or ``final``), ``billing_day`` (``started_at``'s date in the billing
timezone) and ``owner`` (the serving process that wrote the row). Every column list, statement
and row tuple here is derived from those, so a field is named once, where the record declares
it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

from proxy import record_schema
from proxy.formats import ZERO, decimal_text
from proxy.ledger.connection import statement_sizes
from proxy.records import FIELDS, UNBILLABLE_SOURCES, UsageRecord

STORED_FIELDS = tuple(field for field in FIELDS if field.kind.stored)
"""The record's fields that are ``usage`` columns (money goes to ``usage_cost``)."""
RECORD_COLUMNS = tuple(field.name for field in STORED_FIELDS)
"""The ``usage`` columns that hold a record's fields, in the record's order."""
ABSENT_VALUES = tuple(record_schema.absent_column(field) for field in STORED_FIELDS)
"""Per `RECORD_COLUMNS` entry, what a ledger of an older schema without that column holds
(NULL, or ``'{}'`` for tags)."""
LEDGER_COLUMNS = ("state", "billing_day", "owner")
COLUMNS = (*RECORD_COLUMNS, *LEDGER_COLUMNS)
"""Every ``usage`` column, in the order of `usage_row`'s values."""

stored_values = operator.attrgetter(*RECORD_COLUMNS)
"""A record's `RECORD_COLUMNS` values, as the record holds them, in one call."""
_TO_COLUMN = tuple(
    (index, field.kind.to_column)
    for index, field in enumerate(STORED_FIELDS)
    if field.kind.to_column is not None
)
_FROM_COLUMN = tuple((field.name, field.kind.from_column) for field in STORED_FIELDS)

# Built from the record's field names, never from input; values are parameters.
INSERT_USAGE = f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES "  # noqa: S608
ON_CONFLICT_USAGE = "".join(
    (
        " ON CONFLICT (request_id) DO UPDATE SET ",
        ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "request_id"),
        # A final record replaces an in-flight row, or a row that recovery ended as `interrupted`
        # with unknown usage (the call's real record, spilled and replayed after a restart).
        " WHERE excluded.state = 'final' AND (usage.state = 'in_flight'",
        " OR (usage.outcome = 'interrupted' AND usage.usage_source = 'unknown'))",
    )
)
INSERT_COST = "INSERT OR REPLACE INTO usage_cost VALUES "
BILLABLE_SQL = f"usage_source NOT IN ({', '.join(repr(s) for s in UNBILLABLE_SOURCES)})"
"""`proxy.records.billable` as a condition on a ``usage`` row."""


def usage_row(record: UsageRecord, state: str, day: str, owner: str | None) -> list[Any]:
    """The values of `COLUMNS` for a record. On the ledger thread's path for every call: the
    fields are read in one `operator.attrgetter` call and only those stored as other than
    themselves (flags, instants, JSON) are converted."""
    row = list(stored_values(record))
    for index, convert in _TO_COLUMN:
        value = row[index]
        if value is not None:
            row[index] = convert(value)
    row += (state, day, owner)
    return row


def cost_rows(record: UsageRecord) -> list[tuple[str, str, str, str]]:
    """The record's ``usage_cost`` rows: one per currency, its cost and cache savings."""
    savings = record.cache_savings
    return [
        (
            record.request_id,
            currency,
            decimal_text(amount),
            decimal_text(savings.get(currency, ZERO)),
        )
        for currency, amount in record.costs.items()
    ]


def stored_record(
    values: Sequence[Any], costs: Mapping[str, Decimal], savings: Mapping[str, Decimal]
) -> UsageRecord:
    """The record a row holds: `RECORD_COLUMNS`' values, and its ``usage_cost`` amounts."""
    fields: dict[str, Any] = {
        name: None if value is None else convert(value)
        for (name, convert), value in zip(_FROM_COLUMN, values, strict=True)
    }
    return UsageRecord(**fields, costs=costs, cache_savings=savings)


class Executes(Protocol):
    """What `settled_ids` reads through: a SQLite connection, or the ledger commands' `Queries`
    (either ledger), both taking ``?`` parameters."""

    def execute(self, sql: str, params: Sequence[Any], /) -> Iterable[Sequence[Any]]: ...


def settled_ids(conn: Executes, request_ids: list[str], *, interrupted: bool = False) -> set[str]:
    """Which of these requests have their real final row already (a record written twice is
    not written again). A row that recovery ended as ``interrupted`` with unknown usage is
    not settled (the call's own record, spilled when the ledger could not take it, replaces
    it when it is replayed), unless `interrupted` says such rows count too."""
    found: set[str] = set()
    for start, size in statement_sizes(len(request_ids)):
        marks = ", ".join("?" * size)
        ids = request_ids[start : start + size]
        found.update(
            str(r)
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
