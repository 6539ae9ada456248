"""How requests reach DeepSeek: the `Transport` protocol, and aiohttp's transport that ``serve``
uses.

A transport sends one request to an absolute URL and returns an `UpstreamAnswer`; nothing else
in the proxy knows which HTTP client sends it. The idea is httpx's transports: the seam is one
method, so tests plug in an in-memory transport (``tests/support/memory_transport.py``) and run
the relay, its metering and its failures without a socket, while the loopback tests keep
proving the real one.

aiohttp's client is used on this path because it forwards an order of magnitude faster than
httpx (measured in issue 3). Its exceptions are translated here, once: a failure before
DeepSeek answered becomes `UpstreamUnavailable` when nothing was sent (the connection could
not be made), `UpstreamTimeout` when DeepSeek was silent too long, and `UpstreamCut` when the
connection broke after the request went out (DeepSeek may have received, and may bill, the
call); a failure while reading the body becomes `UpstreamTimeout` or `UpstreamCut` the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import aiohttp
from yarl import URL

from proxy.config import Timeouts
from proxy.errors import UpstreamCut, UpstreamFailure, UpstreamTimeout, UpstreamUnavailable
from proxy.upstream.answer import UpstreamAnswer


class Transport(Protocol):
    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> UpstreamAnswer:
        """Send one request, redirects not followed and bodies not decompressed; the caller
        closes the answer."""
        ...

    async def close(self) -> None:
        """Close every connection (the transport is not used again)."""
        ...


class AiohttpTransport:
    """Requests on one shared `aiohttp.ClientSession` (made here, inside the running loop)."""

    def __init__(self, timeouts: Timeouts) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            skip_auto_headers=("User-Agent",),
        )
        self._urls: dict[str, URL] = {}
        """Parsed URL per upstream URL: aiohttp parses a string URL on every request."""
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.connect,
            sock_connect=timeouts.connect,
            sock_read=timeouts.idle,
        )

    async def send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> UpstreamAnswer:
        parsed = self._urls.get(url)
        if parsed is None:  # a handful of fixed paths, so the cache stays tiny
            parsed = self._urls[url] = URL(url)
        try:
            response = await self._session.request(
                method,
                parsed,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
                auto_decompress=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamUnavailable(f"cannot reach DeepSeek: {type(exc).__name__}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _lost(exc, "DeepSeek did not answer in time", "before it answered") from exc
        return UpstreamAnswer(response.status, response.headers, _AiohttpBody(response))

    async def close(self) -> None:
        await self._session.close()


class _AiohttpBody:
    """An aiohttp response body as `proxy.upstream.answer.Body`: each read is one ``readany``
    (as aiohttp's own ``iter_any``), its failures translated."""

    __slots__ = ("_content", "_response")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._content = response.content

    def __aiter__(self) -> _AiohttpBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._content.readany()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:  # timeout: sock_read (idle)
            raise _lost(
                exc, "DeepSeek went silent in the middle of its answer", "in the middle of it"
            ) from exc
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def close(self) -> None:
        self._response.release()
        await self._response.wait_for_close()


def _lost(exc: BaseException, silent: str, broke: str) -> UpstreamFailure:
    """What a timeout or a broken connection means for a call DeepSeek may have received: it
    may be billed, so neither is retried (a timeout is checked first: aiohttp's own are
    client errors too)."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"{silent}; the call may still be billed")
    return UpstreamCut(
        f"the connection to DeepSeek broke {broke} ({type(exc).__name__}); the call may still "
        "be billed"
    )
