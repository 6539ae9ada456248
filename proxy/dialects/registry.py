"""The three API formats as data: what the relay needs to know of each (`Dialect`).

The relay (`proxy.relay`) is the same for every format; a route names its `Dialect`, which
says how the client's key arrives, how usage is read from a body and from a stream, which
request field bounds the output (for hard budgets), whether the proxy asks a stream for its
usage, and how the proxy's own errors look, in the body and in a stream cut short.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from proxy.config import ProxyConfig
from proxy.dialects import anthropic, responses
from proxy.dialects.streams import AnthropicStreamMeter, ResponsesStreamMeter
from proxy.errors import ErrorShape, anthropic_error_body, error_body, openai_error_body
from proxy.metering import CallMeter, StreamMeter
from proxy.sse import Event
from proxy.usage import UsageReader, parse_usage


class Inspector(Protocol):
    """A stream's meter (`proxy.metering.StreamMeter` and those of `proxy.dialects.streams`)."""

    done: bool

    def inspect(self, event: Event) -> bool: ...


InspectorFactory = Callable[[CallMeter, bool, Mapping[str, str]], Inspector]


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    read_usage: UsageReader
    stream_meter: InspectorFactory
    output_field: str
    """The request field that bounds the output tokens."""
    asks_stream_usage: bool
    """Whether the proxy writes ``stream_options.include_usage`` into streaming requests."""
    error_shape: ErrorShape
    cut_event: Callable[[str], bytes]
    """The event a stream cut short ends with (the client's SDK raises on it)."""
    key_headers: tuple[str, ...]
    """Where the client's key may come, in order (``authorization`` is a Bearer token)."""
    configured_reader: Callable[[ProxyConfig], UsageReader] | None = None
    """The usage reader a config asks for, where the format's reading is a setting (None:
    `read_usage` always)."""

    def reader(self, config: ProxyConfig) -> UsageReader:
        """How this call's usage is read, under `config`."""
        if self.configured_reader is None:
            return self.read_usage
        return self.configured_reader(config)


_CREATION_AS_HITS: UsageReader = functools.partial(anthropic.parse_usage, cache_creation="hit")


def _anthropic_reader(config: ProxyConfig) -> UsageReader:
    """``usage.cache_creation``: cache-creation tokens billed as misses (the default) or hits."""
    return _CREATION_AS_HITS if config.cache_creation == "hit" else anthropic.parse_usage


def _openai_cut(message: str) -> bytes:
    return b"data: " + error_body(message, "upstream_error", "upstream_cut") + b"\n\n"


def _error_event(body: Mapping[str, object]) -> bytes:
    """A named ``error`` event, as the Anthropic and Responses streams send one."""
    return b"event: error\ndata: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _anthropic_cut(message: str) -> bytes:
    return _error_event({"type": "error", "error": {"type": "api_error", "message": message}})


def _responses_cut(message: str) -> bytes:
    return _error_event(
        {"type": "error", "code": "upstream_cut", "message": message, "param": None}
    )


OPENAI_CHAT = Dialect(
    name="openai",
    read_usage=parse_usage,
    stream_meter=StreamMeter,
    output_field="max_tokens",
    asks_stream_usage=True,
    error_shape=openai_error_body,
    cut_event=_openai_cut,
    key_headers=("authorization",),
)
ANTHROPIC = Dialect(
    name="anthropic",
    read_usage=anthropic.parse_usage,
    stream_meter=AnthropicStreamMeter,
    output_field="max_tokens",
    asks_stream_usage=False,
    error_shape=anthropic_error_body,
    cut_event=_anthropic_cut,
    key_headers=("x-api-key", "authorization"),
    configured_reader=_anthropic_reader,
)
RESPONSES = Dialect(
    name="responses",
    read_usage=responses.parse_usage,
    stream_meter=ResponsesStreamMeter,
    output_field="max_output_tokens",
    asks_stream_usage=False,
    error_shape=openai_error_body,
    cut_event=_responses_cut,
    key_headers=("authorization",),
)
