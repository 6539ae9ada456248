"""Usage of the OpenAI Responses API as DeepSeek serves it (``/responses``), as billed tokens.

OpenAI's Responses usage nests its details (``../shared/deepseek-api.md``): ``input_tokens``
INCLUDES the cached part ``input_tokens_details.cached_tokens``, and ``output_tokens`` INCLUDES
``output_tokens_details.reasoning_tokens``. So:

- cache hit  = ``cached_tokens``; cache miss = ``input_tokens`` - ``cached_tokens``;
- output = ``output_tokens``; reasoning = ``reasoning_tokens`` (informational, inside output);
- server-side tool calls from ``server_tool_use`` as in chat.

Without ``input_tokens_details`` the hit is 0 and the call is flagged ``cache_fields_missing``;
a cached count above the input is not believable and makes the usage malformed.

Streams: the usage is in the terminal event's ``response.usage``: ``response.completed``, or
``response.incomplete`` / ``response.failed`` for a response that ended early (their usage is
billed all the same). `StreamUsage` keeps the last one seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.usage import (
    DEFAULT_TOOL_FIELDS,
    FLAG_CACHE_FIELDS_MISSING,
    MalformedUsage,
    ReportedUsage,
    TokenUsage,
    read_count,
    read_server_tools,
)

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
"""Stream events whose ``response`` carries the call's final usage."""


def parse_usage(obj: object, tool_fields: Mapping[str, str] = DEFAULT_TOOL_FIELDS) -> ReportedUsage:
    """Read a Responses usage object (a response's ``usage``)."""
    if not isinstance(obj, Mapping):
        raise MalformedUsage(f"usage is not an object: {type(obj).__name__}")
    flags: list[str] = []
    prompt = read_count(obj, "input_tokens", required=True)
    output = read_count(obj, "output_tokens", required=True)
    assert prompt is not None and output is not None
    details = obj.get("input_tokens_details")
    cached = read_count(details, "cached_tokens") if isinstance(details, Mapping) else None
    if cached is None:
        flags.append(FLAG_CACHE_FIELDS_MISSING)
    hit = cached or 0
    if hit > prompt:
        raise MalformedUsage(f"usage cached_tokens ({hit}) exceed input_tokens ({prompt})")
    out_details = obj.get("output_tokens_details")
    reasoning = (
        read_count(out_details, "reasoning_tokens") or 0 if isinstance(out_details, Mapping) else 0
    )
    tools = read_server_tools(obj, tool_fields, flags)
    return ReportedUsage(
        TokenUsage(hit, prompt - hit, output, reasoning, tools), prompt, tuple(flags)
    )


class StreamUsage:
    """The usage of one Responses stream: the last terminal event's."""

    __slots__ = ("_usage",)

    def __init__(self) -> None:
        self._usage: Mapping[str, Any] | None = None

    def take(self, event: Mapping[str, Any]) -> None:
        if event.get("type") not in TERMINAL_EVENTS:
            return
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, Mapping) else None
        if isinstance(usage, Mapping):
            self._usage = usage

    @property
    def seen(self) -> bool:
        return self._usage is not None

    def usage(self) -> Mapping[str, Any] | None:
        return self._usage
