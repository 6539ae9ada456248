"""What the proxy learns about a call while relaying it, and the priced record it becomes.

`CallMeter` is filled in by the relay (`proxy.relay`: instants, status, what failed, usage as it
is seen) and turned into exactly one `UsageRecord` by `build_record`, whatever way the call
ended.

`StreamMeter` looks at each SSE event of a streamed completion: it keeps the last non-null
usage (DeepSeek has put usage on the last content chunk, on a separate usage-only chunk, and on
null or zero usage objects along the way), notes ``[DONE]``, and says whether the event goes to
the client: a usage-only chunk exists only because the proxy set ``include_usage``, so a client
that did not ask for usage does not get it.

Estimation, used only when DeepSeek's usage never arrived (stream cut, timeout, client gone past
the grace time): the prompt is estimated from every part of the request that DeepSeek bills as
prompt (`proxy.bounds`: messages, tool calls, tool schemas, response formats, images at their
stated cost) with DeepSeek's rule of thumb (0.3 token per ASCII character, 0.6 per other
character) and counted as cache *miss*, the dearer input price, so an estimate never
undercounts cache savings into spend; the output is the number of content chunks relayed, since
DeepSeek streams about one token per chunk.

Reported usage is trusted only within the bounds the request itself sets (`proxy.bounds`): its
prompt bound and its output bound, each widened by a context window and an output bound per
server-side tool call (a search feeds results back into the model), and at most
`Limits.max_server_tool_calls` tool calls in all. A count past its bound is recorded at the
bound and flagged ``usage_exceeds_bound``, so a broken or hostile upstream cannot make the bill
absurd; ``prompt_tokens`` keeps what DeepSeek reported. Usage that arrives after a stream's
``[DONE]`` is ignored and flagged ``data_after_done``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from proxy.bounds import estimate_prompt
from proxy.config import Limits
from proxy.outcome import Failure, classify
from proxy.pricing import Pricer
from proxy.records import (
    CallRequest,
    Outcome,
    UsageRecord,
    UsageSource,
    billable,
    request_fields,
    storable,
)
from proxy.sse import Event
from proxy.usage import MalformedUsage, ReportedUsage, TokenUsage, UsageReader, parse_usage

FLAG_USAGE_TWICE = "usage_reported_twice"
FLAG_MALFORMED_USAGE = "malformed_usage"
FLAG_ESTIMATED = "usage_estimated"
FLAG_MALFORMED_CHUNK = "malformed_chunk"
FLAG_EXCEEDS_BOUND = "usage_exceeds_bound"
FLAG_AFTER_DONE = "data_after_done"
FLAG_BAD_UPSTREAM_TEXT = "unprintable_upstream_field"


@dataclass(slots=True)
class CallMeter(CallRequest):
    """What is learnt of one call while it is relayed (see the module docstring)."""

    payload: Mapping[str, Any]
    started_at: datetime
    prompt_bound: int
    """The most prompt tokens the request can be billed (`proxy.bounds`)."""
    output_bound: int
    """The most output tokens it can be billed: ``max_tokens`` as sent, else the maximum."""
    first_byte_at: datetime | None = None
    model_served: str | None = None
    upstream_status: int | None = None
    client_status: int | None = None
    """The status the proxy sent the client (`UsageRecord.client_status`)."""
    trace_id: str | None = None
    failure: Failure | None = None
    """What ended the call early, if anything (`proxy.outcome`)."""
    client_left: bool = False
    """The client went away before the answer was whole."""
    reported: ReportedUsage | None = None
    output_chunks: int = 0
    flags: list[str] = field(default_factory=list)
    overhead_seconds: float = 0.0
    """Time spent in the proxy's own code for this call (``llm_proxy_overhead_seconds``)."""
    price_book: str = ""
    """Digest of the price book in use, named by the call's ``in_flight`` row."""
    read_usage: UsageReader = parse_usage
    """How the call's API format reads a usage object (`proxy.dialects`)."""

    @property
    def outcome(self) -> Outcome:
        """How the call ended, from the facts recorded so far."""
        return classify(self.upstream_status, self.failure, self.client_left)

    def flag(self, flag: str) -> None:
        """Add a flag once."""
        if flag not in self.flags:
            self.flags.append(flag)

    def upstream_text(self, value: object) -> str | None:
        """A short printable string from DeepSeek's answer (served model, trace id), or None
        and a flag: a hostile upstream must not fill the ledger or reports with what it
        sends."""
        if value is None:
            return None
        if isinstance(value, str) and storable(value):
            return value
        self.flag(FLAG_BAD_UPSTREAM_TEXT)
        return None

    def in_flight_record(self) -> UsageRecord:
        """The call's ``in_flight`` record (`proxy.records.Dispatched`). The ledger's thread
        calls this while the call goes on, so it reads only the fields set at construction,
        which nothing changes afterwards."""
        return UsageRecord.in_flight(self, self.started_at, self.price_book)

    def take_usage(self, raw: object, tool_fields: Mapping[str, str]) -> None:
        """Record a usage object; the last one wins, and a second differing one is flagged."""
        try:
            usage = self.read_usage(raw, tool_fields)
        except MalformedUsage:
            self.flag(FLAG_MALFORMED_USAGE)
            return
        if self.reported is not None and self.reported != usage:
            self.flag(FLAG_USAGE_TWICE)
        self.reported = usage


class StreamMeter:
    """Per-event inspection of a streamed completion (see the module docstring)."""

    __slots__ = ("done", "meter", "tool_fields", "wants_usage")

    def __init__(self, meter: CallMeter, wants_usage: bool, tool_fields: Mapping[str, str]) -> None:
        self.meter = meter
        self.wants_usage = wants_usage
        self.tool_fields = tool_fields
        self.done = False

    def inspect(self, event: Event) -> bool:
        """Update the meter from one event; True if the event is forwarded to the client."""
        data = event.data
        if self.done:  # nothing after [DONE] counts, nor reaches the client
            if data is not None:
                self.meter.flag(FLAG_AFTER_DONE)
            return False
        if data is None:
            return True  # comments (": keep-alive") and other non-data events pass as they are
        if data == b"[DONE]":
            self.done = True
            return True
        meter = self.meter
        # Parsing every chunk would cost more than relaying it: only chunks that carry a usage
        # object and the first one (for the served model) are decoded. ``"usage"`` is a key
        # (text inside JSON strings has its quotes escaped, so it cannot match); with
        # include_usage DeepSeek puts ``"usage":null`` on every other chunk.
        if meter.model_served is not None and (
            b'"usage"' not in data or b'"usage":null' in data or b'"usage": null' in data
        ):
            meter.output_chunks += 1
            return True
        try:
            chunk = orjson.loads(data)
        except ValueError:
            meter.flag(FLAG_MALFORMED_CHUNK)
            return True
        if not isinstance(chunk, dict):
            return True
        if meter.model_served is None and "model" in chunk:
            meter.model_served = meter.upstream_text(chunk["model"])
        usage = chunk.get("usage")
        if usage is not None:
            meter.take_usage(usage, self.tool_fields)
        if chunk.get("choices") == [] and usage is not None:
            return self.wants_usage
        meter.output_chunks += 1
        return True


def _usage_of(
    meter: CallMeter, outcome: Outcome, limits: Limits
) -> tuple[TokenUsage | None, int | None, UsageSource, tuple[str, ...]]:
    """The call's billable counts, the ``prompt_tokens`` to record, where they came from, and
    flags about them (`outcome`: how the call ended)."""
    if meter.reported is not None:
        tokens, flags = _within_bounds(meter, meter.reported.tokens, limits)
        return tokens, meter.reported.prompt_tokens, "reported", flags
    if outcome in ("connect_error", "upstream_error"):
        return None, None, "none", ()
    prompt, flags = estimate_prompt(meter.payload, limits)
    if not prompt and not meter.output_chunks:
        return None, None, "unknown", flags
    # One token per chunk relayed, but never past the output bound: a reservation held no
    # more, and DeepSeek stops at max_tokens (role and finish chunks carry none).
    output = min(meter.output_chunks, meter.output_bound)
    return (
        TokenUsage(cache_miss=prompt, output=output),
        prompt,
        "estimated",
        (*flags, FLAG_ESTIMATED),
    )


def _within_bounds(
    meter: CallMeter, tokens: TokenUsage, limits: Limits
) -> tuple[TokenUsage, tuple[str, ...]]:
    """Reported counts, each cut to what the request allows (see the module docstring)."""
    tools = tokens.tool_calls
    rounds = sum(tools.values()) if tools else 0  # each server tool call feeds the model again
    if rounds > limits.max_server_tool_calls:
        tools, rounds = _capped(tools, limits.max_server_tool_calls)
    output_limit = meter.output_bound * (1 + rounds)
    prompt_limit = meter.prompt_bound + limits.max_context_tokens * rounds
    if (
        tools is tokens.tool_calls
        and tokens.output <= output_limit
        and tokens.cache_hit + tokens.cache_miss <= prompt_limit
    ):
        return tokens, ()
    hit = min(tokens.cache_hit, prompt_limit)
    output = min(tokens.output, output_limit)
    return TokenUsage(
        cache_hit=hit,
        cache_miss=min(tokens.cache_miss, prompt_limit - hit),
        output=output,
        reasoning=min(tokens.reasoning, output),
        tool_calls=tools,
    ), (FLAG_EXCEEDS_BOUND,)


def _capped(tools: Mapping[str, int], cap: int) -> tuple[dict[str, int], int]:
    """Tool-call counts cut to `cap` calls in all, each tool's share in name order."""
    left = cap
    capped: dict[str, int] = {}
    for tool in sorted(tools):
        if left:
            capped[tool] = min(tools[tool], left)
            left -= capped[tool]
    return capped, cap


def _no_price_reason(source: UsageSource, outcome: Outcome) -> str:
    if not billable(source):
        return f"nothing billable: {outcome}"
    return "usage unknown: DeepSeek sent none and there was nothing to estimate from"


def build_record(
    meter: CallMeter, ended_at: datetime, pricer: Pricer, price_at: str, limits: Limits
) -> UsageRecord:
    """The one usage record of a call, priced at the configured instant."""
    outcome = meter.outcome  # classified once, from the relay's facts
    tokens, prompt, source, usage_flags = _usage_of(meter, outcome, limits)
    flags = list(meter.flags)
    if meter.reported is not None:
        flags.extend(meter.reported.flags)
    flags.extend(usage_flags)
    priced_at = meter.started_at if price_at == "request_start" else ended_at
    pricing = None
    if tokens is not None:
        pricing = pricer.price(meter.model_requested, tokens, priced_at, meter.endpoint)
        flags.extend(pricing.flags)
    costs: dict[str, Decimal] = {}
    savings: dict[str, Decimal] = {}
    if pricing is not None:
        for currency, cost in pricing.costs.items():
            costs[currency] = cost.total
            savings[currency] = cost.cache_savings
        priced, reason = pricing.priced, pricing.reason
    else:
        priced, reason = False, _no_price_reason(source, outcome)
    return UsageRecord(
        *request_fields(meter),
        model_served=meter.model_served,
        started_at=meter.started_at,
        first_byte_at=meter.first_byte_at,
        ended_at=ended_at,
        cache_hit_tokens=tokens.cache_hit if tokens else None,
        cache_miss_tokens=tokens.cache_miss if tokens else None,
        output_tokens=tokens.output if tokens else None,
        reasoning_tokens=tokens.reasoning if tokens else None,
        prompt_tokens=prompt,
        tool_calls=dict(tokens.tool_calls) if tokens and tokens.tool_calls else {},
        upstream_status=meter.upstream_status,
        client_status=meter.client_status,
        upstream_trace_id=meter.trace_id,
        outcome=outcome,
        usage_source=source,
        priced=priced,
        unpriced_reason=None if priced else reason,
        billed_model=pricing.billed_model if pricing else None,
        price_version=pricing.version_id if pricing else None,
        schedule_version=pricing.schedule_version_id if pricing else None,
        tier=pricing.tier if pricing else None,
        priced_at=priced_at if pricing else None,
        costs=costs,
        cache_savings=savings,
        price_book=pricer.book.digest,
        flags=tuple(flags),
    )
