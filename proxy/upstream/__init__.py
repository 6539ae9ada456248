"""The upstream seam: everything between the proxy and DeepSeek's HTTP API.

client.py     `Upstream`: fixed destination, the key added, redirects refused, shown bodies
transport.py  the `Transport` protocol and aiohttp's transport (the only aiohttp client use)
answer.py     `UpstreamAnswer` (status, headers, chunks), decoding of compressed bodies
headers.py    header hygiene both ways (hop-by-hop, credentials, forwarding hints)
keys.py       the DeepSeek key never travels back (`KeyMask`, `redact`)
"""

from proxy.upstream.answer import Undecodable, UpstreamAnswer
from proxy.upstream.client import MAX_SHOWN_BODY, Upstream, refuse_redirect
from proxy.upstream.headers import HOP_BY_HOP, hop_by_hop, request_headers, response_headers
from proxy.upstream.keys import KeyMask, redact
from proxy.upstream.transport import AiohttpTransport, Transport

__all__ = [
    "HOP_BY_HOP",
    "MAX_SHOWN_BODY",
    "AiohttpTransport",
    "KeyMask",
    "Transport",
    "Undecodable",
    "Upstream",
    "UpstreamAnswer",
    "hop_by_hop",
    "redact",
    "refuse_redirect",
    "request_headers",
    "response_headers",
]
