"""Usage from the streams of the Anthropic Messages and Responses formats, event by event.

Each meter has the shape of `proxy.metering.StreamMeter` (chat's): `inspect` takes one SSE
event and says whether it goes on to the client; `done` turns true at the stream's own end
(``message_stop``, a Responses terminal event), after which nothing counts, as after chat's
``[DONE]``; a stream that ends before is cut (`proxy.relay.exchange`), its usage estimated.
Only the events that can carry the model or usage are decoded; content deltas are counted
(one output token each, for an estimate) and passed on unread, so a long stream costs little.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from proxy.dialects import anthropic, responses
from proxy.metering import FLAG_AFTER_DONE, FLAG_MALFORMED_CHUNK, CallMeter
from proxy.sse import Event


class _FormatStreamMeter:
    """What the formats' stream meters share: nothing counts after the stream's own end, and
    events without data (comments, keep-alives) pass as they are."""

    __slots__ = ("done", "meter", "tool_fields")

    def __init__(self, meter: CallMeter, wants_usage: bool, tool_fields: Mapping[str, str]) -> None:
        self.meter = meter
        self.tool_fields = tool_fields
        self.done = False

    def inspect(self, event: Event) -> bool:
        """Update the meter from one event; True if the event goes on to the client."""
        data = event.data
        if self.done:
            if data is not None:
                self.meter.flag(FLAG_AFTER_DONE)
            return False
        if data is None:
            return True
        return self._take(data)

    def _take(self, data: bytes) -> bool:
        raise NotImplementedError

    def _decode(self, data: bytes) -> dict[str, object] | None:
        try:
            chunk = orjson.loads(data)
        except ValueError:
            self.meter.flag(FLAG_MALFORMED_CHUNK)
            return None
        return chunk if isinstance(chunk, dict) else None


class AnthropicStreamMeter(_FormatStreamMeter):
    """Anthropic's ``message_start`` / ``message_delta`` / ``message_stop`` stream."""

    __slots__ = ("usage",)

    def __init__(self, meter: CallMeter, wants_usage: bool, tool_fields: Mapping[str, str]) -> None:
        super().__init__(meter, wants_usage, tool_fields)
        self.usage = anthropic.StreamUsage()

    def _take(self, data: bytes) -> bool:
        if b'"content_block_delta"' in data:
            self.meter.output_chunks += 1
            return True
        if b'"message_' not in data:  # ping, content_block_start/stop, error
            return True
        chunk = self._decode(data)
        if chunk is None:
            return True
        kind = chunk.get("type")
        if kind == "message_start":
            message = chunk.get("message")
            if isinstance(message, dict) and self.meter.model_served is None:
                self.meter.model_served = self.meter.upstream_text(message.get("model"))
        self.usage.take(chunk)
        if kind == "message_stop":
            self.done = True
            if self.usage.seen:
                self.meter.take_usage(self.usage.usage(), self.tool_fields)
        return True


class ResponsesStreamMeter(_FormatStreamMeter):
    """The Responses API's typed events, ending with ``response.completed`` (or incomplete,
    failed)."""

    __slots__ = ()

    def _take(self, data: bytes) -> bool:
        if b'"response.output_text.delta"' in data:
            self.meter.output_chunks += 1
            return True
        if b'"usage"' not in data and (
            self.meter.model_served is not None or b'"response.created"' not in data
        ):
            return True
        chunk = self._decode(data)
        if chunk is None:
            return True
        response = chunk.get("response")
        if isinstance(response, dict) and self.meter.model_served is None:
            self.meter.model_served = self.meter.upstream_text(response.get("model"))
        if chunk.get("type") in responses.TERMINAL_EVENTS:
            self.done = True
            usage = response.get("usage") if isinstance(response, dict) else None
            if usage is not None:
                self.meter.take_usage(usage, self.tool_fields)
        return True
