"""DeepSeek's answer as the proxy sees it: `UpstreamAnswer`, a status, headers and body chunks.

A transport (`proxy.upstream.transport`) makes one from whatever its client library returns,
so the relay reads no foreign type and catches no foreign exception: a read that fails raises
`UpstreamCut` or `UpstreamTimeout`, and a body that cannot be decoded `Undecodable`.

Decoding: the proxy asks for ``Accept-Encoding: identity``; an upstream that compresses anyway
would otherwise reach the client as compressed bytes without their ``Content-Encoding`` (a
header the proxy drops) and could not be metered. A gzip or deflate body is therefore inflated
as it arrives, in pieces of at most `DECODE_PIECE` bytes (a compression bomb costs time, never
memory), and relayed uncompressed; any other encoding is refused as a bad response. A body the
proxy shows but does not meter (an error, the model list) is inflated whole within a limit
(`shown_body`).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping
from types import TracebackType
from typing import Protocol

DECODE_PIECE = 256 << 10
DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})


class Body(Protocol):
    """A transport's body: chunks as they arrive (raising only the proxy's exceptions), and a
    way to give the connection back."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class UpstreamAnswer:
    """One answer from DeepSeek; ``async with`` it so its connection is always given back."""

    __slots__ = ("_body", "content_length", "content_type", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: Body) -> None:
        self.status = status
        self.headers = headers
        self._body = body
        self.content_type = headers.get("Content-Type", "").partition(";")[0].strip().lower()
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        """The body's length as sent (before any decoding); None if not announced."""

    @property
    def is_stream(self) -> bool:
        return self.content_type == "text/event-stream"

    @property
    def encoded(self) -> bool:
        """Whether DeepSeek compressed the body although asked not to."""
        return encoding(self.headers) not in ("", "identity")

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, decoded; `Undecodable` for an encoding the proxy cannot
        undo (raised before any chunk is read)."""
        kind = encoding(self.headers)
        if kind in ("", "identity"):
            return aiter(self._body)
        if kind in DECODABLE:
            return _decoded(self._body, Decoder())
        raise Undecodable(f"DeepSeek sent it with Content-Encoding {kind[:32]!r}")

    async def read(self) -> bytes:
        """The whole body as sent (not decoded): for a small one of known length."""
        return b"".join([chunk async for chunk in self._body])

    async def read_limited(self, limit: int) -> bytes:
        """The body as sent, cut at `limit` bytes: error bodies are short, and one that is not
        must not exhaust memory."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self._body:
            parts.append(chunk[: limit - size])
            size += len(parts[-1])
            if size >= limit:
                break
        return b"".join(parts)

    async def close(self) -> None:
        await self._body.close()

    async def __aenter__(self) -> UpstreamAnswer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._body.close()


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


async def _decoded(body: Body, decoder: Decoder) -> AsyncIterator[bytes]:
    async for chunk in body:
        for piece in decoder.feed(chunk):
            yield piece
    rest = decoder.finish()
    if rest:
        yield rest
