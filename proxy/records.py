"""The usage record: one per upstream dispatch, the unit the ledger stores and reports sum.

Records go to the ledger (`proxy.ledger.writer.LedgerWriter`) and, at DEBUG level, to the
``proxy.usage`` logger as one JSON line each (`LogSink`). The record is complete on its own
(tokens, where they came from, the price and which book version produced it), so a later
re-pricing needs nothing else.

Outcomes: ``complete``; ``client_disconnected`` (the client left; usage read on, bounded by the
grace time); ``upstream_error`` (DeepSeek answered 4xx/5xx); ``upstream_cut`` (the stream or body
ended early); ``timeout``; ``connect_error`` (nothing reached DeepSeek); ``bad_response``
(a 200 whose body could not be read as DeepSeek's JSON); ``aborted`` (the proxy itself was
stopping and cancelled the call); ``in_flight`` (written when the call is dispatched, replaced
by the final record when it ends); ``interrupted`` (an ``in_flight`` row found when the ledger
opens, or left by a worker of ``serve --workers N`` that died: the process died during the
call, whose usage is therefore unknown).

Usage sources: ``reported`` (DeepSeek's usage object), ``estimated`` (it never arrived; see
`proxy.metering`), ``unknown`` (no usage and nothing to estimate from; never a zero cost),
``none`` (DeepSeek refused or never received the call, so there is nothing to bill).

A record the ledger could not take is saved as its `UsageRecord.to_json` line (a spill file,
`proxy.ledger.spill`) and read back with `UsageRecord.from_json`, its exact inverse.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Protocol, get_args

Outcome = Literal[
    "complete",
    "client_disconnected",
    "upstream_error",
    "upstream_cut",
    "timeout",
    "connect_error",
    "bad_response",
    "aborted",
    "in_flight",
    "interrupted",
]
UsageSource = Literal["reported", "estimated", "unknown", "none"]

MAX_TEXT_CHARS = 256
"""Longest name the ledger stores from outside the proxy: the model a client asks for, the
model and trace id DeepSeek answers with. DeepSeek's model names are under 40 characters;
256 leaves room for any future name while no one can fill the disk through them."""


def storable(text: str) -> bool:
    """Whether an outside string may be stored as it is: short and printable (no terminal
    escapes reach a report)."""
    return len(text) <= MAX_TEXT_CHARS and text.isprintable()


@dataclass(slots=True)
class UsageRecord:
    """One call's record. Never changed once built, though not declared frozen: two are built
    per call on the request path, and a frozen dataclass's ``__init__`` (``object.__setattr__``
    per field) costs three times a plain one's (about 3 us against 1 us for these 33 fields)."""

    request_id: str
    team: str
    key_id: str
    endpoint: str
    """``chat`` or ``fim``."""
    stream: bool
    model_requested: str
    model_served: str | None
    started_at: datetime
    first_byte_at: datetime | None
    ended_at: datetime
    cache_hit_tokens: int | None
    cache_miss_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    prompt_tokens: int | None
    """As DeepSeek reported it; may differ from hit + miss (then flagged)."""
    tool_calls: Mapping[str, int]
    upstream_status: int | None
    upstream_trace_id: str | None
    outcome: Outcome
    usage_source: UsageSource
    priced: bool
    unpriced_reason: str | None
    billed_model: str | None
    price_version: str | None
    schedule_version: str | None
    tier: str | None
    priced_at: datetime | None
    costs: Mapping[str, Decimal]
    """Currency -> exact total. Empty when not priced (never zero for unknown usage)."""
    cache_savings: Mapping[str, Decimal]
    """Currency -> what the cache hits saved against the cache-miss price."""
    price_book: str
    """SHA-256 of the price-book files that priced the record."""
    flags: tuple[str, ...]

    def placeholder(self) -> UsageRecord:
        return self

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; instants as ISO 8601 UTC, money as decimal strings."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.isoformat().replace("+00:00", "Z")
            elif name in ("costs", "cache_savings"):
                value = {c: format(v, "f") for c, v in value.items()}
            elif name == "tool_calls":
                value = dict(value)
            elif name == "flags":
                value = list(value)
            out[name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UsageRecord:
        """The record `to_json` made (spill files, ``ledger-replay``): equal field for field,
        money as the exact `Decimal`. Spill files can be edited by hand, so every field is
        checked: `ValueError` names the first one at fault."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        missing = [name for name in cls.__dataclass_fields__ if name not in data]
        unknown = [name for name in data if name not in cls.__dataclass_fields__]
        if missing or unknown:
            raise ValueError(f"missing fields {missing}, unknown fields {unknown}")
        values = {name: _parse_field(name, data[name]) for name in cls.__dataclass_fields__}
        return cls(**values)


_TEXT = frozenset({"request_id", "team", "key_id", "endpoint", "model_requested", "price_book"})
_OPTIONAL_TEXT = frozenset(
    {
        "model_served",
        "upstream_trace_id",
        "unpriced_reason",
        "billed_model",
        "price_version",
        "schedule_version",
        "tier",
    }
)
_OPTIONAL_COUNT = frozenset(
    {
        "cache_hit_tokens",
        "cache_miss_tokens",
        "output_tokens",
        "reasoning_tokens",
        "prompt_tokens",
        "upstream_status",
    }
)
_FLAG = frozenset({"stream", "priced"})
_INSTANT = frozenset({"started_at", "ended_at"})
_OPTIONAL_INSTANT = frozenset({"first_byte_at", "priced_at"})
_MONEY = frozenset({"costs", "cache_savings"})
_CHOICES: Mapping[str, tuple[str, ...]] = {
    "outcome": get_args(Outcome),
    "usage_source": get_args(UsageSource),
}


def _parse_field(name: str, value: Any) -> Any:
    """One field of `UsageRecord.from_json`: `to_json`'s value turned back, or `ValueError`."""
    if value is None and name in _OPTIONAL_TEXT | _OPTIONAL_COUNT | _OPTIONAL_INSTANT:
        return None
    if name in _TEXT | _OPTIONAL_TEXT and isinstance(value, str):
        return value
    if name in _OPTIONAL_COUNT and isinstance(value, int) and not isinstance(value, bool):
        return value
    if name in _FLAG and isinstance(value, bool):
        return value
    if name in _CHOICES and value in _CHOICES[name]:
        return value
    if name in _INSTANT | _OPTIONAL_INSTANT and isinstance(value, str):
        instant = datetime.fromisoformat(value)  # ValueError names the text
        if instant.tzinfo is None:
            raise ValueError(f"{name}: {value!r} has no UTC offset")
        return instant
    if (
        name in _MONEY
        and isinstance(value, Mapping)
        and all(isinstance(amount, str) for amount in value.values())
    ):
        try:
            amounts = {str(currency): Decimal(amount) for currency, amount in value.items()}
        except InvalidOperation:
            raise ValueError(f"{name}: not decimal amounts: {value!r}") from None
        if all(amount.is_finite() for amount in amounts.values()):
            return amounts
    if (
        name == "tool_calls"
        and isinstance(value, Mapping)
        and all(isinstance(count, int) and not isinstance(count, bool) for count in value.values())
    ):
        return {str(tool): count for tool, count in value.items()}
    if name == "flags" and isinstance(value, list) and all(isinstance(f, str) for f in value):
        return tuple(value)
    raise ValueError(f"{name}: unexpected value {value!r}")


class Dispatched(Protocol):
    """A call that has gone upstream: its id, and its ``in_flight`` record when asked for.

    The record is built only if the ledger writes it (a call that ends before the next batch
    needs none), and then by the ledger's thread, off the request path. A `UsageRecord` is
    its own placeholder.
    """

    @property
    def request_id(self) -> str: ...

    def placeholder(self) -> UsageRecord: ...


class RecordSink(Protocol):
    """Where records go. Neither method may block the request path.

    `dispatched` learns of each call as it goes upstream, so a crash during the call still
    leaves an ``in_flight`` row; `submit` receives its final record, which replaces it.
    """

    def dispatched(self, call: Dispatched) -> None: ...

    def submit(self, record: UsageRecord) -> None: ...


class LedgerHealth(Protocol):
    """What the request path asks the ledger before it admits a call (`proxy.forward`).

    Both are asked on every call, so they cost no more than reading an attribute (no lock,
    no I/O): the ledger's writer keeps what they read current
    (`proxy.ledger.writer.LedgerWriter`).
    """

    def committing(self) -> bool:
        """False while the ledger cannot commit (its last write failed, or its file is gone):
        calls of teams with hard budgets are then refused, since their spend would not count."""
        ...

    def has_room(self) -> bool:
        """False while the records waiting for the ledger fill its bounded queue: every call
        is then refused, since its record could not be kept."""
        ...


class AlwaysHealthy:
    """The health of a sink that cannot fail (tests' recording sinks, no ledger at all)."""

    def committing(self) -> bool:
        return True

    def has_room(self) -> bool:
        return True


ALWAYS_HEALTHY = AlwaysHealthy()


class LogSink:
    """One structured log line per final record, at DEBUG level: a stream for log pipelines
    when asked for (``serve --log-level DEBUG``), free when not."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("proxy.usage")

    def dispatched(self, call: Dispatched) -> None:
        """Only final records are logged: a log line cannot be replaced."""

    def enabled(self) -> bool:
        """Whether records are logged at the logger's current level."""
        return self._logger.isEnabledFor(logging.DEBUG)

    def submit(self, record: UsageRecord) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            self._logger.debug("%s", json.dumps(record.to_json(), separators=(",", ":")))


class FanOut:
    """Hands every record to several sinks, in order."""

    def __init__(self, *sinks: RecordSink) -> None:
        self._sinks = sinks

    def dispatched(self, call: Dispatched) -> None:
        for sink in self._sinks:
            sink.dispatched(call)

    def submit(self, record: UsageRecord) -> None:
        for sink in self._sinks:
            sink.submit(record)
