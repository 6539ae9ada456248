"""The usage record's schema, read from `proxy.records.UsageRecord` itself.

Each field's type says how it is written as JSON (spill files, log lines) and as a ledger column,
how it is read back and checked, and what it is in a call's ``in_flight`` record. So the
record's fields are declared once, in the dataclass, and the JSON form, the ledger's columns
and rows (`proxy.ledger.rows`) and re-pricing's reads all follow from them: a new field needs
its type to be one of the kinds below, and a ledger migration (`proxy.ledger.schema`), nothing
else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, get_args, get_origin, get_type_hints

from proxy.formats import decimal_text, iso_instant

Convert = Callable[[Any], Any]

_REQUIRED = object()
"""`Kind.empty` of a field every record must be given, ``in_flight`` ones included."""


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Kind:
    """How one type of field is written and read. `check` returns the value `to_json` made
    turned back, or raises `ValueError` saying why (spill files can be edited by hand)."""

    check: Convert
    to_json: Convert = _same
    to_column: Convert | None = None
    """None: stored as it is. Never called with None (an optional field's None is NULL)."""
    from_column: Convert = _same
    """Never called with NULL either."""
    empty: Any = _REQUIRED
    """Its value in an ``in_flight`` record (no usage, no price yet)."""
    absent: Any = _REQUIRED
    """Its value when a JSON record lacks it: one written (a spill file) before the field
    existed. `_REQUIRED`: it must be there."""
    stored: bool = True
    """False: kept in a table of its own (money: ``usage_cost``), not a ``usage`` column."""
    pg_type: str = "text"
    """Its column type in the PostgreSQL ledger (`proxy.ledger.pg_schema`), which stores each
    field natively (SQLite's columns hold text for what SQLite has no type for)."""


def _unexpected(value: Any) -> ValueError:
    return ValueError(f"unexpected value {value!r}")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _unexpected(value)


def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _unexpected(value)


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _unexpected(value)


def _instant(value: Any) -> datetime:
    instant = datetime.fromisoformat(_text(value))  # ValueError names the text
    if instant.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset")
    return instant


def _money(value: Any) -> dict[str, Decimal]:
    if not isinstance(value, Mapping) or not all(isinstance(a, str) for a in value.values()):
        raise _unexpected(value)
    try:
        amounts = {str(currency): Decimal(amount) for currency, amount in value.items()}
    except InvalidOperation:
        raise ValueError(f"not decimal amounts: {value!r}") from None
    if not all(amount.is_finite() for amount in amounts.values()):
        raise _unexpected(value)
    return amounts


def _tool_calls(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise _unexpected(value)
    try:
        return {str(tool): _count(count) for tool, count in value.items()}
    except ValueError:
        raise _unexpected(value) from None


def _tags(value: Any) -> dict[str, str]:
    if isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return dict(value)
    raise _unexpected(value)


def _flags(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(flag, str) for flag in value):
        return tuple(value)
    raise _unexpected(value)


def _optional(kind: Kind) -> Kind:
    def check(value: Any) -> Any:
        return None if value is None else kind.check(value)

    return dataclasses.replace(kind, check=check, empty=None, absent=None)


def _choice(choices: tuple[str, ...]) -> Kind:
    def check(value: Any) -> str:
        if value in choices:
            return str(value)
        raise _unexpected(value)

    return Kind(check)


_TEXT = Kind(_text)
_COUNT = Kind(_count, pg_type="bigint")
_INSTANT = Kind(
    _instant,
    to_json=iso_instant,
    to_column=lambda instant: iso_instant(instant, fixed_width=True),
    from_column=datetime.fromisoformat,
    pg_type="timestamptz",
)
_KINDS: Mapping[object, Kind] = {
    str: _TEXT,
    str | None: _optional(_TEXT),
    int | None: _optional(_COUNT),
    bool: Kind(_flag, to_column=int, from_column=bool, pg_type="boolean"),
    datetime: _INSTANT,
    datetime | None: _optional(_INSTANT),
    Mapping[str, int]: Kind(
        _tool_calls,
        to_json=dict,
        to_column=lambda tools: json.dumps(dict(tools), sort_keys=True) if tools else "{}",
        from_column=json.loads,
        empty={},
        pg_type="jsonb",
    ),
    Mapping[str, str]: Kind(
        _tags,
        to_json=dict,
        # Parsed tags carry their JSON text (`proxy.attribution.Tags`); others are dumped.
        to_column=lambda tags: (
            getattr(tags, "json", None)
            or (json.dumps(dict(tags), sort_keys=True) if tags else "{}")
        ),
        from_column=json.loads,
        absent={},  # spill lines written before tags existed
        pg_type="jsonb",
    ),
    tuple[str, ...]: Kind(
        _flags,
        to_json=list,
        to_column=lambda flags: json.dumps(list(flags)) if flags else "[]",
        from_column=lambda text: tuple(json.loads(text)),
        empty=(),
        pg_type="jsonb",
    ),
    Mapping[str, Decimal]: Kind(
        _money,
        to_json=lambda amounts: {c: decimal_text(a) for c, a in amounts.items()},
        empty={},
        stored=False,
    ),
}


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind


def fields_of(cls: type[Any]) -> tuple[Field, ...]:
    """The schema of a record dataclass, in field order: its `Kind` from each type (a
    ``Literal`` is a choice among its values). `KeyError` names a type with no kind."""
    hints = get_type_hints(cls)
    return tuple(
        Field(f.name, _choice(get_args(hint)) if get_origin(hint) is Literal else _KINDS[hint])
        for f in dataclasses.fields(cls)
        for hint in (hints[f.name],)
    )


def empty_values(fields: tuple[Field, ...]) -> dict[str, Any]:
    """Every field an ``in_flight`` record leaves empty, with its empty value."""
    return {f.name: f.kind.empty for f in fields if f.kind.empty is not _REQUIRED}


def absent_column(field: Field) -> Any:
    """What a ledger column of `field` holds in a ledger written before the field existed
    (a copy from an older ledger reads it so): the column form of its `Kind.absent`, or NULL."""
    absent = field.kind.absent
    if absent is _REQUIRED or absent is None:
        return None
    return absent if field.kind.to_column is None else field.kind.to_column(absent)


def to_json(fields: tuple[Field, ...], record: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in fields:
        value = getattr(record, field.name)
        out[field.name] = None if value is None else field.kind.to_json(value)
    return out


def checked_values(fields: tuple[Field, ...], data: object) -> dict[str, Any]:
    """The field values in `to_json`'s form `data`, turned back; `ValueError` names the
    first field at fault."""
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    names = [f.name for f in fields]
    # A field with an `absent` value may be missing: spill lines written before it existed.
    missing = [f.name for f in fields if f.name not in data and f.kind.absent is _REQUIRED]
    unknown = [name for name in data if name not in names]
    if missing or unknown:
        raise ValueError(f"missing fields {missing}, unknown fields {unknown}")
    values = {}
    for field in fields:
        try:
            values[field.name] = (
                field.kind.check(data[field.name]) if field.name in data else field.kind.absent
            )
        except ValueError as exc:
            raise ValueError(f"{field.name}: {exc}") from None
    return values
