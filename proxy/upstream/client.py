"""`Upstream`: the one way to DeepSeek. Every request to it goes through `Upstream.send`.

The destination is fixed at start-up (configured base URL + one of a few known paths); nothing in
a client's request can change it, redirects are never followed nor passed on (a client SDK would
follow one with its own key), and the DeepSeek key is added here and only here (header hygiene:
`proxy.upstream.headers`). Bodies are asked for uncompressed (``Accept-Encoding: identity``) so
the bytes relayed to the client are exactly the bytes DeepSeek sent. A body shown to the client
without being metered (an error, the model list) is read here too, bounded and redacted
(`Upstream.shown`).
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.errors import UpstreamRedirect
from proxy.upstream.answer import UpstreamAnswer, shown_body
from proxy.upstream.headers import request_headers, response_headers
from proxy.upstream.keys import KeyMask, redact
from proxy.upstream.transport import Transport

MAX_SHOWN_BODY = 1 << 20
"""The most of an error body or model list relayed: they are short, and one that is not must
not exhaust memory."""


class Upstream:
    """Requests to the configured DeepSeek origin over one `Transport`, which it owns."""

    def __init__(self, base_url: str, api_key: str, transport: Transport) -> None:
        self._base_url = base_url
        self._api_key = api_key
        self._transport = transport
        self.mask = KeyMask(api_key)
        """For whole bodies and headers (stateless); a body relayed piecewise gets its own."""

    @property
    def api_key(self) -> str:
        return self._api_key

    async def send(
        self, method: str, path: str, client_headers: Mapping[str, str], body: bytes | None = None
    ) -> UpstreamAnswer:
        """Send one request; the caller closes the answer (``async with``).

        `path` is one of the proxy's fixed upstream paths, never text from the client.
        """
        headers = request_headers(client_headers, self._api_key)
        return await self._transport.send(method, self._base_url + path, headers, body)

    def relayed_headers(self, answer: UpstreamAnswer) -> dict[str, str]:
        """DeepSeek's headers that go back to the client, any echo of the key masked."""
        headers = response_headers(answer.headers)
        self.mask.headers(headers)
        return headers

    async def shown(self, answer: UpstreamAnswer) -> tuple[dict[str, str], bytes]:
        """Headers and body of an answer relayed whole but never metered (an error, the model
        list): bounded, inflated if it must be, the key and DeepSeek's echo of its last
        characters redacted."""
        headers = self.relayed_headers(answer)
        body = shown_body(
            await answer.read_limited(MAX_SHOWN_BODY), answer.headers, headers, MAX_SHOWN_BODY
        )
        return headers, redact(body, self._api_key)

    async def close(self) -> None:
        await self._transport.close()


def refuse_redirect(answer: UpstreamAnswer) -> None:
    """`UpstreamRedirect` for a 3xx answer: neither followed nor passed on."""
    if 300 <= answer.status < 400:
        raise UpstreamRedirect(
            f"DeepSeek answered HTTP {answer.status} (a redirect); the proxy does not follow "
            "redirects"
        )
