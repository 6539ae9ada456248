"""Incremental server-sent-events framing, byte-exact.

The proxy forwards a stream event by event, so it must find event boundaries in arbitrary TCP
chunks without changing a byte: each `Event` keeps its `raw` bytes (terminating blank line
included), and concatenating the `raw` of every event (plus `SSESplitter.rest()` at the end)
gives back exactly the input. Lines may end in LF, CRLF or CR (the SSE specification allows all
three); a CR at the very end of the buffer is held back until the next byte shows whether it is
half of a CRLF, so the result does not depend on how the stream was chunked.

An event still incomplete after `MAX_EVENT_BYTES` raises `EventTooLarge`: DeepSeek's events are
a token or a usage object each, and an upstream that never ends its line must not grow the
proxy's memory without bound. Bytes already searched are not searched again, so a long event
arriving in many small reads costs time in proportion to its size, not to its size squared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# An event ends at a line ending followed by another (a blank line). Atomic groups stop the
# regex from reading the two halves of one CRLF as two line endings.
_BOUNDARY = re.compile(rb"(?>\r\n|\n|\r)(?>\r\n|\n|\r)")
_LINE = re.compile(rb"\r\n|\n|\r")


MAX_EVENT_BYTES = 1 << 20
"""1 MiB: thousands of times DeepSeek's largest event (a usage chunk is under 1 KiB)."""
_LOOKBEHIND = 4
"""A boundary is at most 4 bytes (CRLF CRLF): a search resumes this far before the old end."""


class EventTooLarge(Exception):
    """An event grew past `MAX_EVENT_BYTES` without ending."""


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

    __slots__ = ("_limit", "_pending", "_scanned")

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._pending: bytearray | None = None
        """An incomplete event carried over from earlier reads (None: none, the usual case)."""
        self._scanned = 0  # bytes of it known to hold no boundary, bar the last few
        self._limit = limit

    def feed(self, chunk: bytes) -> list[Event]:
        pending = self._pending
        if pending is None:
            return self._split(chunk, 0)  # whole events in one read: no copy at all
        pending += chunk
        return self._split(pending, self._scanned)

    def _split(self, buffer: bytes | bytearray, position: int) -> list[Event]:
        """Events found in `buffer` from `position` on (bytes before it hold no boundary)."""
        events: list[Event] = []
        start = 0
        while True:
            match = _BOUNDARY.search(buffer, position)
            if match is None:
                break
            end = match.end()
            if end == len(buffer) and buffer.endswith(b"\r"):
                break  # may be the first half of a CRLF still in flight
            raw = buffer[start:end]
            events.append(_event(raw if type(raw) is bytes else bytes(raw)))
            start = position = end
        self._keep(buffer, start)
        return events

    def _keep(self, buffer: bytes | bytearray, start: int) -> None:
        """Carry what follows the last complete event over to the next read."""
        rest = len(buffer) - start
        if not rest:
            self._pending = None
            self._scanned = 0
            return
        if rest > self._limit:
            raise EventTooLarge(f"an event grew past {self._limit} bytes without ending")
        if isinstance(buffer, bytearray):
            del buffer[:start]
            self._pending = buffer
        else:
            self._pending = bytearray(buffer[start:])
        self._scanned = rest - _LOOKBEHIND if rest > _LOOKBEHIND else 0

    def rest(self) -> bytes:
        """Bytes after the last complete event (a truncated stream leaves them here)."""
        return bytes(self._pending) if self._pending is not None else b""

    def finish(self) -> list[Event]:
        """At end of stream: a held-back final CR completes its event; anything else stays
        in `rest()` as an incomplete event, which a well-formed stream never leaves."""
        pending = self._pending
        if pending is not None and _BOUNDARY.search(pending):
            self._pending = None
            self._scanned = 0
            return [_event(bytes(pending))]
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
