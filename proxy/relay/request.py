"""The client's request: its id, and its body read within limits, checked, parsed, and
rewritten for DeepSeek.

Everything here happens before a call is admitted, so a request that fails here costs nothing
and holds nothing: no in-flight slot, no ledger row, no budget reservation.

- Compressed bodies are refused before a byte of them is read (415). aiohttp's server would
  inflate them on the event loop, before authentication and without a size bound, so the
  proxy's server runs with decompression off (`proxy.listener`) and refuses them here; the
  OpenAI and DeepSeek SDKs never compress request bodies. This is what Envoy and nginx do by
  default too: neither inflates a request body unless a filter is configured to.
- ``model`` is the one client-chosen string the ledger stores: it must be a short printable
  string (`proxy.records.storable`), so no client can fill the disk or smuggle terminal escapes into
  reports through it.
- The body goes upstream byte for byte unless the proxy must change a top-level field (ask a
  stream for usage, write or lower ``max_tokens``): new fields are inserted at the front of the
  object without re-serialising the rest, which costs nothing and works for any nesting depth;
  only a field the client already set is rewritten by re-serialising (`rewrite`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedEncoding
from proxy.records import MAX_TEXT_CHARS, storable


def new_request_id() -> str:
    """32 hex digits: Unix time in milliseconds (12 digits), then 80 random bits.

    Time-ordered on purpose (the layout idea of UUIDv7): the request id is the ledger's
    primary key, and random keys scatter each batch of inserts over the whole index, every row
    dirtying its own page and every page rewritten into the WAL. Measured in bench/, random ids
    cost the ledger thread about 65 us of CPU per call, ordered ones 34 us. The random part
    keeps ids unique across workers and within a millisecond. It need not be unguessable (the
    id is no secret: the client gets it as ``x-request-id``), so it comes from `random`, which
    the interpreter seeds from the OS per process (and again in a forked child), without a
    system call per id.
    """
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"


def refuse_compressed(request: web.Request) -> None:
    """415 for a body with a ``Content-Encoding`` other than identity, before reading it."""
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedEncoding(
            "compressed request bodies are not accepted (Content-Encoding must be identity); "
            "send the body uncompressed"
        )


async def read_body(request: web.Request, limit: int, within: float) -> bytes:
    """The request body, within `within` seconds (408) and `limit` bytes (413)."""
    try:
        if request.content.is_eof():  # it came with the headers: nothing to wait for
            return await request.read()
        async with asyncio.timeout(within):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {within:g} s") from None


def parse_payload(body: bytes) -> dict[str, Any]:
    """The request's JSON object, with a usable ``model``; an OpenAI-shaped 400 otherwise."""
    try:
        payload = orjson.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string")
    if not storable(model):
        if len(model) > MAX_TEXT_CHARS:
            raise BadRequest(f"'model' is longer than {MAX_TEXT_CHARS} characters")
        raise BadRequest("'model' must not contain control or other non-printable characters")
    return payload


def wants_usage(payload: Mapping[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def usage_option(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The change that makes a stream report usage (none if it is not a stream or already
    asks): DeepSeek then reports usage on every stream shape we know."""
    if payload.get("stream") is not True or wants_usage(payload):
        return {}
    options = payload.get("stream_options")
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    return {"stream_options": merged}


def rewrite(
    body: bytes, payload: dict[str, Any], changes: Mapping[str, Any], *, normalise: bool = False
) -> bytes:
    """`body` with the top-level fields in `changes` set; `payload` is updated to match.

    Fields the request lacks are inserted after the opening brace, leaving the client's bytes
    untouched; if any is already there, or `normalise` asks for it, the object is serialised
    again from `payload`, which fails (400) only for a request nested deeper than orjson
    writes (254 levels).
    """
    if not changes and not normalise:
        return body
    if not normalise and all(name not in payload for name in changes):
        start = body.index(b"{") + 1  # parse_payload saw an object: the first brace opens it
        inserted = orjson.dumps(dict(changes))[1:-1]
        rest = body[start:].lstrip()
        separator = b"" if rest.startswith(b"}") else b","
        payload.update(changes)
        return b"{" + inserted + separator + rest
    updated = {**payload, **changes}
    try:
        new_body = orjson.dumps(updated)
    except orjson.JSONEncodeError:
        raise BadRequest(
            "the request is nested too deeply for the proxy to rewrite it "
            "(more than 254 levels); flatten it"
        ) from None
    payload.update(changes)
    return new_body
