"""Usage of DeepSeek's Anthropic Messages format (``/anthropic/v1/messages``), as billed tokens.

Anthropic's usage object counts the prompt in three parts that do not overlap
(``../shared/deepseek-api.md``, Anthropic's API reference): ``input_tokens`` is the input that
was neither read from nor written to the cache, ``cache_read_input_tokens`` the part read from
it, ``cache_creation_input_tokens`` the part written to it. DeepSeek bills a prompt as cache hits
and cache misses; its cache is automatic (nothing is "created" on request, and creation has been
observed as 0), so:

- cache hit  = ``cache_read_input_tokens``;
- cache miss = ``input_tokens`` + ``cache_creation_input_tokens`` (tokens DeepSeek processed
  that no cache served are billed as misses, as in its chat format where miss = prompt - hit;
  `CACHE_CREATION` names the reading, so a test and the docs can point at it);
- output = ``output_tokens`` (thinking included: Anthropic's format has no separate count);
- server-side tool calls from ``server_tool_use`` as in chat (`proxy.usage.read_server_tools`).

A usage object without the two cache fields is read with hit 0 and flagged
``cache_fields_missing``, never guessed otherwise.

Streams: ``message_start`` carries ``message.usage`` (the input side, and a first output count);
each ``message_delta`` carries ``usage`` with CUMULATIVE counts (the output so far, and in newer
versions the input side again). `StreamUsage` keeps, field by field, the LAST value seen: a delta
never adds to what came before, which is how peers double-count cache tokens on Anthropic
streams.
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

CACHE_CREATION = "miss"
"""How ``cache_creation_input_tokens`` is billed by default: as cache-miss input (see the
module's docstring for the reading; ``usage.cache_creation: hit`` in the config says
otherwise, should DeepSeek's bill show it)."""


def parse_usage(
    obj: object,
    tool_fields: Mapping[str, str] = DEFAULT_TOOL_FIELDS,
    cache_creation: str = CACHE_CREATION,
) -> ReportedUsage:
    """Read an Anthropic-format usage object (a response's ``usage``, or a stream's merged
    usage from `StreamUsage`); `cache_creation` says how its cache-creation tokens bill
    (``miss`` or ``hit``)."""
    if not isinstance(obj, Mapping):
        raise MalformedUsage(f"usage is not an object: {type(obj).__name__}")
    flags: list[str] = []
    fresh = read_count(obj, "input_tokens", required=True)
    output = read_count(obj, "output_tokens", required=True)
    read = read_count(obj, "cache_read_input_tokens")
    created = read_count(obj, "cache_creation_input_tokens")
    assert fresh is not None and output is not None
    if read is None and created is None:
        flags.append(FLAG_CACHE_FIELDS_MISSING)
    if cache_creation == "hit":
        hit, miss = (read or 0) + (created or 0), fresh
    else:
        hit, miss = read or 0, fresh + (created or 0)
    tools = read_server_tools(obj, tool_fields, flags)
    return ReportedUsage(TokenUsage(hit, miss, output, 0, tools), hit + miss, tuple(flags))


class StreamUsage:
    """The usage of one Anthropic-format stream, from its events' JSON, last value per field."""

    __slots__ = ("_usage",)

    def __init__(self) -> None:
        self._usage: dict[str, Any] = {}

    def take(self, event: Mapping[str, Any]) -> None:
        """One decoded event (``message_start``, ``message_delta``; others carry no usage)."""
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, Mapping) else None
        elif kind == "message_delta":
            usage = event.get("usage")
        else:
            return
        if isinstance(usage, Mapping):
            # Cumulative: each field's latest value replaces the earlier one, never adds to it.
            self._usage.update((k, v) for k, v in usage.items() if v is not None)

    @property
    def seen(self) -> bool:
        """Whether any usage arrived."""
        return bool(self._usage)

    def usage(self) -> dict[str, Any]:
        """The merged usage object (`parse_usage` reads it)."""
        return dict(self._usage)
