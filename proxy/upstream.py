"""The one seam to DeepSeek: every upstream request goes through `Upstream`.

The destination is fixed at start-up (configured base URL + one of a few known paths); nothing in
a client's request can change it, redirects are never followed, and the DeepSeek key is added
here and only here. Bodies are asked for uncompressed (``Accept-Encoding: identity``) so the
bytes relayed to the client are exactly the bytes DeepSeek sent. aiohttp's client is used on this
path because it forwards an order of magnitude faster than httpx (measured in issue 3).

The key must never travel back either. DeepSeek echoes its last four characters in 401 bodies
(`redact`); should it ever echo the whole key in any answer, headers or body, success or error,
`KeyMask` overwrites it with asterisks of the same length (so a Content-Length stays right).

Foreign exceptions are translated once, here: a failure before DeepSeek answered becomes
`UpstreamUnavailable` when nothing was sent (the connection could not be made),
`UpstreamTimeout` when DeepSeek was silent too long, and `UpstreamCut` when the connection broke
after the request went out (DeepSeek may have received, and may bill, the call).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping

import aiohttp
from yarl import URL

from proxy.config import Timeouts
from proxy.errors import UpstreamCut, UpstreamTimeout, UpstreamUnavailable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
"""RFC 9110 7.6.1, plus the non-standard Proxy-Connection; `hop_by_hop` adds what Connection
names."""

_REQUEST_DROP = HOP_BY_HOP | {
    # set by the proxy, or must not travel on: the client's credentials, its view of the host,
    # forwarding hints (never used to route), and encodings we want raw.
    "host",
    "authorization",
    "x-api-key",
    "cookie",
    "content-length",
    "accept-encoding",
    "content-encoding",  # bodies are only ever sent as read (compressed ones are refused)
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "expect",
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie", "server", "date"}


def hop_by_hop(headers: Mapping[str, str]) -> frozenset[str]:
    """Hop-by-hop names for one message: the fixed set and any named in ``Connection``."""
    named = {
        token.strip().lower()
        for value in [headers.get("Connection", "")]
        for token in value.split(",")
        if token.strip()
    }
    return HOP_BY_HOP | named


def _drop_set(headers: Mapping[str, str], fixed: frozenset[str]) -> frozenset[str]:
    """`fixed` plus what ``Connection`` names; most messages have no ``Connection`` header (it
    is implied by HTTP/1.1), so the common case builds no set."""
    if "Connection" not in headers:
        return fixed
    return fixed | hop_by_hop(headers)


def request_headers(client: Mapping[str, str], api_key: str) -> dict[str, str]:
    """Client headers that may go upstream, with the proxy's own key and no compression."""
    drop = _drop_set(client, _REQUEST_DROP)
    headers = {name: value for name, value in client.items() if name.lower() not in drop}
    headers["Authorization"] = f"Bearer {api_key}"
    headers["Accept-Encoding"] = "identity"
    return headers


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """DeepSeek's headers that go back to the client (``x-ds-trace-id``, content type, ...)."""
    drop = _drop_set(upstream, _RESPONSE_DROP)
    return {name: value for name, value in upstream.items() if name.lower() not in drop}


async def read_limited(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    """A whole (small) upstream body, cut at `limit` bytes: error bodies are short, and one
    that is not must not exhaust memory."""
    parts: list[bytes] = []
    size = 0
    async for chunk in upstream.content.iter_any():
        parts.append(chunk[: limit - size])
        size += len(parts[-1])
        if size >= limit:
            break
    return b"".join(parts)


def redact(body: bytes, api_key: str) -> bytes:
    """An error body without the upstream key nor DeepSeek's echo of its last characters
    (``****abcd``)."""
    secret = api_key.encode()
    body = body.replace(secret, b"[redacted]")
    if len(secret) >= 4:
        body = re.sub(rb"\*+" + re.escape(secret[-4:]), b"****", body)
    return body


class KeyMask:
    """Overwrites the upstream key in what goes back to the client, keeping every length."""

    __slots__ = ("_carry", "_key", "_mask", "_text")

    def __init__(self, api_key: str) -> None:
        self._text = api_key
        self._key = api_key.encode()
        self._mask = b"*" * len(self._key)
        self._carry = b""

    def headers(self, headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
        """`headers` with the key overwritten in every value (in place)."""
        key = self._text
        for name, value in headers.items():
            if key in value:
                headers[name] = value.replace(key, "*" * len(key))
        return headers

    def whole(self, data: bytes) -> bytes:
        """A complete piece of an answer (a whole body, or whole SSE events)."""
        return data.replace(self._key, self._mask) if self._key in data else data

    def part(self, data: bytes) -> bytes:
        """The next piece of a body relayed as it arrives: a key split between two reads is
        caught by holding back only a tail that could be its start (so a keep-alive line,
        which cannot, is never delayed). `rest` returns what is held back at the end."""
        data = self._carry + data if self._carry else data
        data = self.whole(data)
        keep = _key_prefix_at_end(data, self._key)
        self._carry = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def rest(self) -> bytes:
        carry, self._carry = self._carry, b""
        return carry


def _key_prefix_at_end(data: bytes, key: bytes) -> int:
    """Length of the longest end of `data` that is a proper start of `key` (0 if none)."""
    window = len(key) - 1
    start = max(len(data) - window, 0)
    index = data.find(key[:1], start)
    while index != -1:
        if key.startswith(data[index:]):
            return len(data) - index
        index = data.find(key[:1], index + 1)
    return 0


class Upstream:
    """Requests to the configured DeepSeek origin on one shared `aiohttp.ClientSession`."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, api_key: str, timeouts: Timeouts
    ) -> None:
        self._session = session
        self._base_url = base_url
        self._urls: dict[str, URL] = {}
        """Parsed URL per upstream path: aiohttp parses a string URL on every request."""
        self._api_key = api_key
        self.mask = KeyMask(api_key)
        """For whole bodies and headers (stateless); a body relayed piecewise gets its own."""
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.connect,
            sock_connect=timeouts.connect,
            sock_read=timeouts.idle,
        )

    @property
    def api_key(self) -> str:
        return self._api_key

    async def request(
        self, method: str, path: str, client_headers: Mapping[str, str], body: bytes | None = None
    ) -> aiohttp.ClientResponse:
        """Send one request; the caller reads and releases the response.

        `path` is one of the proxy's fixed upstream paths, never text from the client.
        """
        headers = request_headers(client_headers, self._api_key)
        url = self._urls.get(path)
        if url is None:  # a handful of fixed paths, so the cache stays tiny
            url = self._urls[path] = URL(self._base_url + path)
        try:
            return await self._session.request(
                method,
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
                auto_decompress=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamUnavailable(f"cannot reach DeepSeek: {type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                "DeepSeek did not answer in time; the call may still be billed"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamCut(
                f"the connection to DeepSeek broke before it answered "
                f"({type(exc).__name__}); the call may still be billed"
            ) from exc
