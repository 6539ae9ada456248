"""The DeepSeek key never travels back to a client.

DeepSeek echoes its last four characters in 401 bodies (`redact`); should it ever echo the
whole key in any answer, headers or body, success or error, `KeyMask` overwrites it with
asterisks of the same length (so a Content-Length stays right).
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping


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
