"""Header hygiene both ways: what of a client's headers may travel to DeepSeek, and what of
DeepSeek's may travel back.

Hop-by-hop headers (RFC 9110 7.6.1, and what ``Connection`` names) never cross the proxy. Going
up, the client's credentials, its view of the host, forwarding hints and encodings go too: the
proxy's own key and ``Accept-Encoding: identity`` replace them, so nothing a client sends can
change where a call goes or what it is billed to. Coming back, framing and cookies stay behind.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import MultiMapping

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
    "x-proxy-tags",  # the proxy's own attribution header (`proxy.attribution`)
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie", "server", "date"}


def hop_by_hop(headers: Mapping[str, str]) -> frozenset[str]:
    """Hop-by-hop names for one message: the fixed set and any named in ``Connection``."""
    lines = (
        headers.getall("Connection", ())
        if isinstance(headers, MultiMapping)
        else [headers.get("Connection", "")]
    )  # RFC 9110 5.3: the list may be split over several field lines, each counts
    named = {token.strip().lower() for value in lines for token in value.split(",")}
    named.discard("")
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
