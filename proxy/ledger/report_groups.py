"""``report --by`` keys: what each groups ``usage`` rows by, as SQL for each ledger.

A key maps to a `Group`: one SQL expression per dialect (`proxy.ledger.queries.Dialect`),
whose value is the group's label as text, or NULL (an unpriced call has no tier or billed
model). Most are a column, written the same in both. Weeks and months are derived from the
stored ``billing_day`` (the call's date in the billing timezone), never from ``started_at``,
so both ledgers put a call in the same week: SQLite keeps the day as ISO text, PostgreSQL as a
``date``, hence an expression each. Weeks start on Monday (`proxy.periods`) and are labelled
by that Monday's date; months as ``YYYY-MM``.

These expressions are the only text a ``--by`` key puts into report SQL. A key that carries a
name of its own (a tag) passes it as a parameter (`Group.params`), never as SQL text: the
report selects ``(expression, ...)`` and groups by position (``GROUP BY 1, 2``), so each
expression, and its parameters, appears once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from proxy.attribution import TAG_KEY
from proxy.ledger.queries import Dialect


@dataclass(frozen=True, slots=True)
class Group:
    """How a ``--by`` key labels a ``usage`` row, in each ledger's SQL."""

    sqlite: str
    postgresql: str
    params: tuple[object, ...] = ()
    """Values the expression's ``?`` marks take (the same in both dialects)."""

    def sql(self, dialect: Dialect) -> str:
        return self.sqlite if dialect == "sqlite" else self.postgresql


def _column(name: str) -> Group:
    return Group(name, name)


GROUPS: Mapping[str, Group] = MappingProxyType(
    {
        "team": _column("team"),
        "key": _column("key_id"),
        "model": _column("model_requested"),
        "billed_model": _column("billed_model"),
        "endpoint": _column("endpoint"),
        "tier": _column("tier"),
        "outcome": _column("outcome"),
        "unpriced_reason": _column("unpriced_reason"),
        "user": _column("end_user"),
        "day": Group("billing_day", "to_char(billing_day, 'YYYY-MM-DD')"),
        # SQLite: forward to the week's Sunday (the day itself if it is one), back six days.
        # PostgreSQL: ISODOW is 1 on Monday; a date minus an integer is a date. No timestamps,
        # so the session's time zone plays no part.
        "week": Group(
            "date(billing_day, 'weekday 0', '-6 days')",
            "to_char(billing_day - (EXTRACT(ISODOW FROM billing_day)::int - 1), 'YYYY-MM-DD')",
        ),
        "month": Group("substr(billing_day, 1, 7)", "to_char(billing_day, 'YYYY-MM')"),
    }
)
"""Every ``--by`` key with a fixed meaning -> its `Group`."""
DEFAULT_GROUPS = ("team", "model")


TAG_PREFIX = "tag:"


def group(key: str) -> Group:
    """The `Group` a ``--by`` key names; `KeyError` for a key that names none.

    ``tag:NAME`` groups by the value of tag NAME (calls without it: no label). NAME must be a
    possible tag key (`proxy.attribution.TAG_KEY`: lower-case letters, digits, ``_``) and goes
    in as a parameter, never as SQL text; SQLite's JSON path is built from it in SQL."""
    if key.startswith(TAG_PREFIX):
        name = key.removeprefix(TAG_PREFIX)
        if not TAG_KEY.fullmatch(name):
            raise KeyError(key)
        return Group("json_extract(tags, '$.' || ?)", "tags ->> ?", (name,))
    return GROUPS[key]


def known(key: str) -> bool:
    """Whether `group` knows the key."""
    try:
        group(key)
    except KeyError:
        return False
    return True
