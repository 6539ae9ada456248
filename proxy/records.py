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

What others would otherwise derive again is the record's: whether the call is billable
(`billable`) and the HTTP status its client received (`UsageRecord.client_status`).

A record the ledger could not take is saved as its `UsageRecord.to_json` line (a spill file,
`proxy.ledger.spill`) and read back with `UsageRecord.from_json`, its exact inverse.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, cast, get_args

from proxy import record_schema

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


def billable(source: UsageSource) -> bool:
    """Whether a call with usage from `source` is DeepSeek's to bill: all but ``none`` (it
    refused the call or never received it). Unknown usage is billable, though never priced:
    it is counted as unpriced, never as free."""
    return source != "none"


UNBILLABLE_SOURCES = tuple(s for s in get_args(UsageSource) if not billable(s))
"""The usage sources of calls with nothing to bill, for queries over stored rows."""

MAX_TEXT_CHARS = 256
"""Longest name the ledger stores from outside the proxy: the model a client asks for, the
model and trace id DeepSeek answers with. DeepSeek's model names are under 40 characters;
256 leaves room for any future name while no one can fill the disk through them."""


def storable(text: str) -> bool:
    """Whether an outside string may be stored as it is: short and printable (no terminal
    escapes reach a report)."""
    return len(text) <= MAX_TEXT_CHARS and text.isprintable()


@dataclass(slots=True)
class CallRequest:
    """Who made a call and what it asked for: known when it arrives, and the same in the
    meter that follows the call (`proxy.metering.CallMeter`) and in the record it becomes."""

    request_id: str
    team: str
    key_id: str
    endpoint: str
    """``chat``, ``fim``, ``messages`` (Anthropic format) or ``responses``
    (`proxy.relay.call.Endpoint`)."""
    stream: bool
    model_requested: str
    tags: Mapping[str, str]
    """Attribution tags the client sent (``x-proxy-tags``; `proxy.attribution`): allow-listed
    keys, bounded values, sorted by key."""
    end_user: str | None
    """The end user the client named in the body (OpenAI ``user``, DeepSeek ``user_id``,
    Anthropic ``metadata.user_id``), if any."""


_REQUEST_NAMES = tuple(f.name for f in dataclasses.fields(CallRequest))
_REQUEST_FIELDS = operator.attrgetter(*_REQUEST_NAMES)
RequestFields = tuple[str, str, str, str, bool, str, Mapping[str, str], str | None]


def request_fields(call: CallRequest) -> RequestFields:
    """The `CallRequest` fields of a call, in order: the first arguments of its record. Read
    by one `operator.attrgetter` call, so a record is built from its call without naming
    these fields again (and without eight keyword arguments on the request path)."""
    return cast(RequestFields, _REQUEST_FIELDS(call))


@dataclass(slots=True)
class UsageRecord(CallRequest):
    """One call's record. Never changed once built, though not declared frozen: two are built
    per call on the request path, and a frozen dataclass's ``__init__`` (``object.__setattr__``
    per field) costs three times a plain one's (about 3 us against 1 us for these 31 fields).

    Its fields are its schema (`proxy.record_schema`): the JSON form and the ledger's columns
    follow from their types.
    """

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
    client_status: int | None
    """The HTTP status the proxy sent the client: DeepSeek's, or the proxy's own error when it
    answered in DeepSeek's stead (a redirect refused, an answer it could not read or wait for
    before it began). Recorded by the relay, never re-derived: a 200 from DeepSeek may have
    reached the client as a 502. None if nothing was sent (a call cancelled by a stopping
    proxy before its answer began, an ``in_flight`` row, a row of a ledger before v3)."""
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

    @classmethod
    def in_flight(cls, call: CallRequest, started_at: datetime, price_book: str) -> UsageRecord:
        """The row written when a call is dispatched: if the proxy dies before the call ends,
        the ledger still shows that DeepSeek saw it (usage unknown, never priced as zero)."""
        return cls(
            *request_fields(call),
            started_at=started_at,
            ended_at=started_at,
            price_book=price_book,
            **_IN_FLIGHT,
        )

    def in_flight_record(self) -> UsageRecord:
        """A record is its own in-flight record (`Dispatched`)."""
        return self

    @property
    def billable(self) -> bool:
        """Whether DeepSeek may bill the call (`billable`)."""
        return billable(self.usage_source)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; instants as ISO 8601 UTC, money as decimal strings."""
        return record_schema.to_json(FIELDS, self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UsageRecord:
        """The record `to_json` made (spill files, ``ledger-replay``): equal field for field,
        money as the exact `Decimal`. Spill files can be edited by hand, so every field is
        checked: `ValueError` names the first one at fault."""
        return cls(**record_schema.checked_values(FIELDS, data))


FIELDS = record_schema.fields_of(UsageRecord)
"""`UsageRecord`'s schema, field by field."""
_IN_FLIGHT: Mapping[str, Any] = {
    **{
        name: value
        for name, value in record_schema.empty_values(FIELDS).items()
        if name not in _REQUEST_NAMES  # the call's own, given by `request_fields`
    },
    "outcome": "in_flight",
    "usage_source": "unknown",
    "priced": False,
    "unpriced_reason": "in flight: the call had not ended",
}
"""What every ``in_flight`` record holds: no usage, no price, nothing from DeepSeek yet."""


class Dispatched(Protocol):
    """A call that has gone upstream: its id, and its ``in_flight`` record when asked for.

    The record is built only if the ledger writes it (a call that ends before the next batch
    needs none), and then by the ledger's thread, off the request path. A `UsageRecord` is
    its own in-flight record.
    """

    @property
    def request_id(self) -> str: ...

    def in_flight_record(self) -> UsageRecord: ...


class RecordSink(Protocol):
    """Where records go. Neither method may block the request path.

    `dispatched` learns of each call as it goes upstream, so a crash during the call still
    leaves an ``in_flight`` row; `submit` receives its final record, which replaces it.
    """

    def dispatched(self, call: Dispatched) -> None: ...

    def submit(self, record: UsageRecord) -> None: ...


class LedgerHealth(Protocol):
    """What the request path asks the ledger before it admits a call (`proxy.relay.call`).

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
