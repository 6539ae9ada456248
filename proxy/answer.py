"""DeepSeek's answer body as the relay reads it: decoded if it must be, kept within bounded
memory for metering, and searched for usage when it is too large to keep.

- **Decoding.** The proxy asks for ``Accept-Encoding: identity``; an upstream that compresses
  anyway would otherwise reach the client as compressed bytes without their
  ``Content-Encoding`` (a header the proxy drops) and could not be metered. A gzip or deflate
  body is therefore inflated as it arrives, in pieces of at most `DECODE_PIECE` bytes (a
  compression bomb costs time, never memory), and relayed uncompressed; any other encoding is
  refused as a bad response.
- **Metering a JSON body.** A 200 body is relayed as it arrives and kept for metering only up to
  `METER_BODY_BYTES` (DeepSeek's longest answer, 384K tokens, is about 3 MB of JSON). Past that
  only its first and last `EDGE_BYTES` are kept, and the served model and the usage object are
  read from them (DeepSeek puts ``model`` near the start and ``usage`` near the end); the call is
  flagged ``response_body_too_large``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import orjson

METER_BODY_BYTES = 4 << 20
EDGE_BYTES = 64 << 10
DECODE_PIECE = 256 << 10
DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})
FLAG_BODY_TOO_LARGE = "response_body_too_large"

_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_MODEL = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.){0,256}")')


class Undecodable(Exception):
    """The body claims an encoding it does not have (or the proxy cannot inflate)."""


class Decoder:
    """Inflates a gzip or zlib-wrapped deflate body piece by piece. A gzip body may hold
    several members one after the other (RFC 1952); each is inflated in turn."""

    def __init__(self) -> None:
        self._inflate = _inflater()

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            piece = self._inflate.decompress(data, DECODE_PIECE)
            while True:
                if piece:
                    yield piece
                tail = self._inflate.unconsumed_tail
                if not tail and self._inflate.eof and self._inflate.unused_data:
                    tail = self._inflate.unused_data  # the next member begins here
                    self._inflate = _inflater()
                if not tail:
                    return
                piece = self._inflate.decompress(tail, DECODE_PIECE)
        except zlib.error as exc:
            raise Undecodable(str(exc)) from None

    def finish(self) -> bytes:
        """What is left at the end; `Undecodable` if the compressed stream did not end."""
        try:
            rest = self._inflate.flush()
        except zlib.error as exc:
            raise Undecodable(str(exc)) from None
        if not self._inflate.eof:
            raise Undecodable("the compressed body ended early")
        return rest


def _inflater() -> zlib._Decompress:
    return zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # a gzip or a zlib header


def encoding(headers: Mapping[str, str]) -> str:
    """The body's ``Content-Encoding``, lower case; empty or ``identity`` for none."""
    return headers.get("Content-Encoding", "").strip().lower()


def shown_body(
    body: bytes, upstream: Mapping[str, str], headers: MutableMapping[str, str], limit: int
) -> bytes:
    """A whole body the proxy relays but does not meter (an error, the model list): inflated
    if DeepSeek compressed it in a way the proxy can undo (the proxy never relays
    ``Content-Encoding`` itself), else passed on as it came with its encoding named in
    `headers`."""
    kind = encoding(upstream)
    if kind in DECODABLE:
        return inflate_limited(body, limit)
    if kind not in ("", "identity"):
        headers["Content-Encoding"] = upstream["Content-Encoding"]
    return body


def inflate_limited(body: bytes, limit: int) -> bytes:
    """A whole compressed body, inflated to at most `limit` bytes; one that cannot be
    inflated is returned as it came (it is shown, never metered)."""
    decoder = Decoder()
    parts: list[bytes] = []
    size = 0
    try:
        for piece in decoder.feed(body):
            parts.append(piece)
            size += len(piece)
            if size >= limit:
                break
    except Undecodable:
        return body
    return b"".join(parts)[:limit]


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
