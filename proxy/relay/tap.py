"""A JSON answer as the relay keeps it for metering: whole up to `METER_BODY_BYTES` (DeepSeek's
longest answer, 384K tokens, is about 3 MB of JSON), else only its first and last `EDGE_BYTES`,
from which the served model and the usage object are read (DeepSeek puts ``model`` near the
start and ``usage`` near the end); the call is then flagged ``response_body_too_large``. A
hostile upstream sending gigabytes costs the proxy time, never memory.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

METER_BODY_BYTES = 4 << 20
EDGE_BYTES = 64 << 10
FLAG_BODY_TOO_LARGE = "response_body_too_large"

_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_MODEL = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.){0,256}")')


class BodyTap:
    """A JSON body as relayed, kept whole up to `METER_BODY_BYTES`, else by its two ends."""

    __slots__ = ("_head", "_parts", "_size", "_tail")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._head = b""
        self._tail = b""

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if not self._head:
            self._parts.append(chunk)
            if self._size <= METER_BODY_BYTES:
                return
            whole = b"".join(self._parts)
            self._parts = []
            self._head = whole[:EDGE_BYTES]
            self._tail = whole[-EDGE_BYTES:]
            return
        self._tail = (self._tail + chunk)[-EDGE_BYTES:]

    @property
    def truncated(self) -> bool:
        return bool(self._head)

    def whole(self) -> bytes:
        return b"".join(self._parts)

    def edges(self) -> tuple[str | None, Any]:
        """The served model and the usage object found in the kept ends (None if absent)."""
        model = None
        found = _MODEL.search(self._head)
        if found is not None:
            try:
                model = orjson.loads(found.group(1))
            except ValueError:
                model = None
        usage = None
        for part in (self._tail, self._head):
            usage = _last_object(part, _USAGE_KEY)
            if usage is not None:
                break
        return (model if isinstance(model, str) else None), usage


def _last_object(data: bytes, key: re.Pattern[bytes]) -> Any:
    """The JSON object after the last complete match of `key` in `data`, or None."""
    for match in reversed(list(key.finditer(data))):
        end = _object_end(data, match.end() - 1)
        if end is None:
            continue
        try:
            return orjson.loads(data[match.end() - 1 : end])
        except ValueError:
            continue
    return None


def _object_end(data: bytes, start: int) -> int | None:
    """Index after the object that opens at ``data[start]`` (strings honoured), or None."""
    depth = 0
    in_string = False
    index = start
    size = len(data)
    while index < size:
        byte = data[index]
        if in_string:
            if byte == 0x5C:  # backslash: skip the escaped byte
                index += 1
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte == 0x7B:
            depth += 1
        elif byte == 0x7D:
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return None
