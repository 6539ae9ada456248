"""Incremental server-sent-events framing, byte-exact.

The proxy forwards a stream event by event, so it must find event boundaries in arbitrary TCP
chunks without changing a byte: each `Event` keeps its `raw` bytes (terminating blank line
included), and concatenating the `raw` of every event (plus `SSESplitter.rest()` at the end)
gives back exactly the input. Lines may end in LF, CRLF or CR (the SSE specification allows all
three); a CR at the very end of the buffer is held back until the next byte shows whether it is
half of a CRLF, so the result does not depend on how the stream was chunked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# An event ends at a line ending followed by another (a blank line). Atomic groups stop the
# regex from reading the two halves of one CRLF as two line endings.
_BOUNDARY = re.compile(rb"(?>\r\n|\n|\r)(?>\r\n|\n|\r)")
_LINE = re.compile(rb"\r\n|\n|\r")


@dataclass(slots=True)
class Event:
    """One SSE event. `data` joins its ``data:`` lines with LF (None when it has none, as for
    the ``: keep-alive`` comments DeepSeek sends while a request is queued).

    Not declared frozen (it is never changed): one is built per event relayed, and a frozen
    dataclass's ``__init__`` costs several times a plain one's."""

    raw: bytes
    data: bytes | None


class SSESplitter:
    """Feed bytes, get complete events; keeps the incomplete tail between calls."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[Event] = []
        start = 0
        while True:
            match = _BOUNDARY.search(buffer, start)
            if match is None:
                break
            end = match.end()
            if end == len(buffer) and buffer.endswith(b"\r"):
                break  # may be the first half of a CRLF still in flight
            events.append(_event(buffer[start:end]))
            start = end
        self._buffer = buffer[start:]
        return events

    def rest(self) -> bytes:
        """Bytes after the last complete event (a truncated stream leaves them here)."""
        return self._buffer

    def finish(self) -> list[Event]:
        """At end of stream: a held-back final CR completes its event; anything else stays
        in `rest()` as an incomplete event, which a well-formed stream never leaves."""
        if self._buffer and _BOUNDARY.search(self._buffer):
            events = [_event(self._buffer)]
            self._buffer = b""
            return events
        return []


def _event(raw: bytes) -> Event:
    if b"data:" not in raw:
        return Event(raw, None)
    data: list[bytes] = []
    for line in _LINE.split(raw):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    return Event(raw, b"\n".join(data) if data else None)
