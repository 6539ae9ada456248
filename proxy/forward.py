"""Forwarding one completion request to DeepSeek and relaying the answer, metering it on the way.

The body goes upstream byte for byte, except that a streaming request gets
``stream_options.include_usage = true`` (DeepSeek then reports usage on every stream shape we
know). The answer comes back as it arrives: blank keep-alive lines before a JSON body and
``: keep-alive`` comments before a stream are relayed at once, since they are what keeps the
client's connection open while DeepSeek queues the request; stream events are relayed one read
at a time, never buffered whole.

How each ending is handled (and recorded, always exactly once):

- DeepSeek answers 4xx/5xx: status and body pass through, any echo of the upstream key redacted.
- The client leaves: DeepSeek bills the call anyway, so the proxy keeps reading (for at most
  `client_disconnect_grace` seconds) to record the real usage.
- DeepSeek cuts the stream: the client gets an error event and no ``[DONE]``; a cut JSON body
  closes the client connection, so the client never mistakes a truncated body for a whole one.
  The usage is then estimated (`proxy.metering`).
- Timeouts: before anything reached the client, 504 with ``x-should-retry: false`` (DeepSeek may
  be working and billing); after, as a cut.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.admission import Admission
from proxy.auth import ClientKey
from proxy.budgets import BudgetExceeded, BudgetGuard
from proxy.config import ProxyConfig
from proxy.errors import (
    BadRequest,
    LedgerUnavailable,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    UpstreamCut,
    UpstreamRedirect,
    UpstreamTimeout,
    error_body,
    error_response,
)
from proxy.metering import CallMeter, StreamMeter, build_record
from proxy.metrics import ProxyMetrics
from proxy.pricing import PriceBook
from proxy.records import ALWAYS_HEALTHY, LedgerHealth, RecordSink, UsageRecord
from proxy.sse import SSESplitter
from proxy.upstream import Upstream, response_headers

log = logging.getLogger("proxy.forward")

MAX_ERROR_BODY = 1 << 20
SMALL_BODY = 1 << 16


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    """``chat`` or ``fim``: the label records and metrics use."""
    upstream_path: str


@dataclass(frozen=True, slots=True)
class ProxyState:
    """Everything a request handler needs, built once at start-up (see `proxy.app`)."""

    config: ProxyConfig
    book: PriceBook
    upstream: Upstream
    sink: RecordSink
    metrics: ProxyMetrics
    budgets: BudgetGuard
    admission: Admission
    clock: Callable[[], datetime]
    ledger: LedgerHealth = ALWAYS_HEALTHY
    """Whether the ledger can take the call's record (see `proxy_completion`)."""


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
    """The request's JSON object; an OpenAI-shaped 400 otherwise."""
    try:
        payload = orjson.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise BadRequest("'model' is required and must be a string")
    return payload


def wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def upstream_body(body: bytes, payload: dict[str, Any]) -> bytes:
    """The body to send: unchanged, unless a stream must be told to include usage."""
    if payload.get("stream") is not True or wants_usage(payload):
        return body
    options = payload.get("stream_options")
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    return orjson.dumps({**payload, "stream_options": merged})


async def read_limited(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    """A whole (small) upstream body, cut at `limit` bytes: error bodies are short, and one
    that is not must not exhaust memory."""
    parts: list[bytes] = []
    size = 0
    async for chunk in upstream.content.iter_any():
        parts.append(chunk[:limit - size])
        size += len(parts[-1])
        if size >= limit:
            break
    return b"".join(parts)


def redact(body: bytes, api_key: str) -> bytes:
    """Remove the upstream key and DeepSeek's echo of its last characters (``****abcd``)."""
    secret = api_key.encode()
    body = body.replace(secret, b"[redacted]")
    if len(secret) >= 4:
        body = re.sub(rb"\*+" + re.escape(secret[-4:]), b"****", body)
    return body


async def proxy_completion(request: web.Request, state: ProxyState, client: ClientKey,
                           endpoint: Endpoint) -> web.StreamResponse:
    started_at = state.clock()
    body = await read_body(request, state.config.limits.max_request_bytes,
                           state.config.timeouts.client_body)
    tick = time.perf_counter()
    payload = parse_payload(body)
    meter = CallMeter(request_id=new_request_id(), team=client.team, key_id=client.key_id,
                      endpoint=endpoint.name, stream=payload.get("stream") is True,
                      model_requested=payload["model"], payload=payload, started_at=started_at,
                      price_book=state.book.digest)
    # A record the ledger cannot keep is spend no one will see: with its bounded queue full,
    # no call is admitted; while it cannot commit, no call that a hard budget must count.
    if not state.ledger.has_room():
        raise LedgerUnavailable("the usage ledger cannot record calls and the records waiting "
                                "for it fill its queue: calls are refused until it recovers")
    if not state.ledger.committing() and state.budgets.applies(client.team):
        raise LedgerUnavailable(f"the usage ledger cannot record calls: calls of team "
                                f"{client.team!r}, which has a hard budget, are refused until "
                                "it can, since their spend would not count")
    state.admission.enter(client.team)
    reservation = None
    if state.budgets.applies(client.team):
        try:
            reservation = await state.budgets.reserve(client.team, meter.request_id, payload,
                                                      started_at)
        except ProxyError as exc:
            state.admission.leave(client.team)
            if isinstance(exc, BudgetExceeded):
                state.metrics.budget_refusals.labels(client.team).inc()
            raise
    exchange = _Exchange(request, state, meter, wants_usage(payload))
    state.sink.dispatched(meter)
    body = upstream_body(body, payload)
    meter.proxy_seconds += time.perf_counter() - tick
    try:
        try:
            response = await exchange.run(endpoint, body)
        except asyncio.CancelledError:
            meter.outcome = "aborted"
            raise
        await _send_now(request, response)  # a cancel here finds the call already over
        return response
    finally:
        state.admission.leave(client.team)
        record = _submit(state, meter)
        if reservation is not None:
            billable = record is None or record.usage_source != "none"
            await state.budgets.settle(reservation,
                                       (record.costs if record else {}) if billable else None)


async def _send_now(request: web.Request, response: web.StreamResponse) -> None:
    """Finish sending the response before the call is metered: the client need not wait while
    its record is built, priced and counted. aiohttp then finds the response already sent,
    and, as aiohttp does, a client that has gone is no error."""
    try:
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass


def _submit(state: ProxyState, meter: CallMeter) -> UsageRecord | None:
    tick = time.perf_counter()
    try:
        record = build_record(meter, state.clock(), state.book, state.config.price_at)
        state.sink.submit(record)
        state.metrics.observe(record, meter.proxy_seconds + time.perf_counter() - tick)
    except Exception:  # a metering failure is logged loudly but never breaks the response
        log.exception("could not record usage of request %s", meter.request_id)
        return None
    return record


class Deadline:
    """When the exchange must end: at `when`, the task running it is cancelled, and
    `took_effect` then tells that cancellation from any other.

    What ``asyncio.timeout_at`` does for this one use, minus its state machine and its
    lookups of the running loop and task: it was a fifth of the exchange's own instructions
    (measured with callgrind; one timer handle is all it needs). Same rule for telling
    cancellations apart: the deadline's is the one when no other cancel request is pending
    (`asyncio.Task.uncancel`).
    """

    __slots__ = ("_cancelling", "_handle", "_loop", "_task", "_uncancelled", "expired",
                 "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        task = asyncio.current_task(loop)
        assert task is not None, "a deadline runs inside a task"
        self._loop = loop
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        self._uncancelled = False
        self.when = when
        self._handle: asyncio.TimerHandle | None = loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._handle = None
        self._task.cancel()

    def reschedule(self, when: float) -> None:
        """Move the deadline (a no-op once it has expired: the cancellation is on its way)."""
        if self.expired:
            return
        if self._handle is not None:
            self._handle.cancel()
        self.when = when
        self._handle = self._loop.call_at(when, self._expire)

    def took_effect(self) -> bool:
        """Whether the CancelledError being handled is this deadline's."""
        if not self.expired or self._uncancelled:
            return False
        self._uncancelled = True
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        """The exchange is over: drop the timer, and withdraw the deadline's cancel request
        if it fired but its CancelledError never surfaced here."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.expired and not self._uncancelled:
            self._uncancelled = True
            self._task.uncancel()


class _UpstreamCut(Exception):
    """DeepSeek's stream or body ended before it was complete."""


class _Exchange:
    """One upstream exchange and its relay; holds what the error paths need to know."""

    def __init__(self, request: web.Request, state: ProxyState, meter: CallMeter,
                 client_wants_usage: bool) -> None:
        self.request = request
        self.state = state
        self.meter = meter
        self.client_wants_usage = client_wants_usage
        self.response: web.StreamResponse | None = None
        self.client_alive = True
        self._deadline: Deadline | None = None
        self._loop = asyncio.get_running_loop()
        self._total_deadline = 0.0

    async def run(self, endpoint: Endpoint, body: bytes) -> web.StreamResponse:
        timeouts = self.state.config.timeouts
        start = self._loop.time()
        self._total_deadline = start + timeouts.total
        first = min(self._total_deadline, start + timeouts.first_byte)
        try:
            self._deadline = deadline = Deadline(self._loop, first)
            try:
                upstream = await self.state.upstream.request(
                    "POST", endpoint.upstream_path, self.request.headers, body)
                async with upstream:
                    return await self._relay(upstream)
            except asyncio.CancelledError:
                if deadline.took_effect():
                    raise TimeoutError from None
                raise
            finally:
                deadline.close()
        except ProxyError as exc:
            self.meter.outcome = ("timeout" if isinstance(exc, UpstreamTimeout) else
                                  "upstream_cut" if isinstance(exc, UpstreamCut) else
                                  "connect_error")
            return error_response(exc)
        except TimeoutError:
            if not self.client_alive:
                self.meter.outcome = "client_disconnected"
                return self._finished_response()
            self.meter.outcome = "timeout"
            return await self._fail("DeepSeek did not finish in time", UpstreamTimeout(
                "DeepSeek did not answer in time; the call may still be billed"))
        except (_UpstreamCut, aiohttp.ClientError, OSError):
            if not self.client_alive:
                self.meter.outcome = "client_disconnected"
                return self._finished_response()
            self.meter.outcome = "upstream_cut"
            return await self._fail("DeepSeek closed the connection before the response was "
                                    "complete", UpstreamCut(
                                        "DeepSeek closed the connection before answering; "
                                        "the call may still be billed"))

    async def _relay(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        meter = self.meter
        meter.upstream_status = upstream.status
        meter.trace_id = upstream.headers.get("x-ds-trace-id")
        if upstream.status >= 400:
            meter.outcome = "upstream_error"
            return await self._relay_error(upstream)
        if 300 <= upstream.status < 400:
            # Neither followed nor passed on: a client SDK would follow it with its own key.
            meter.outcome = "upstream_error"
            return error_response(UpstreamRedirect(
                f"DeepSeek answered HTTP {upstream.status} (a redirect); the proxy does not "
                "follow redirects"))
        meter.outcome = "upstream_cut"  # until the answer is seen whole
        headers = response_headers(upstream.headers)
        headers["x-request-id"] = meter.request_id
        is_stream = upstream.content_type == "text/event-stream"
        length = upstream.content_length
        if not is_stream and length is not None and length <= SMALL_BODY:
            # A small body of known length comes whole (no keep-alive lines precede it: those
            # come chunked): answer it in one write, which costs the event loop far less.
            body = await upstream.read()
            self.meter.first_byte_at = self.state.clock()  # and the last: no deadline to lift
            self._read_answer(body)
            if meter.outcome == "upstream_cut":
                meter.outcome = "complete"
            return web.Response(status=upstream.status, headers=headers, body=body)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if not is_stream and length is not None:
            response.content_length = length
        self.response = response
        await response.prepare(self.request)
        if is_stream:
            await self._relay_stream(upstream)
        else:
            await self._relay_body(upstream)
        if meter.outcome == "upstream_cut":  # nothing went wrong on the way
            meter.outcome = "complete" if self.client_alive else "client_disconnected"
        return self._finished_response()

    async def _relay_error(self, upstream: aiohttp.ClientResponse) -> web.Response:
        body = await read_limited(upstream, MAX_ERROR_BODY)
        headers = response_headers(upstream.headers)
        headers["x-request-id"] = self.meter.request_id
        if upstream.status == 402:
            headers["x-should-retry"] = "false"  # balance refusals: a retry cannot succeed
        if upstream.status in (401, 402):
            log.error("DeepSeek refused the proxy's key or account: HTTP %s (request %s)",
                      upstream.status, self.meter.request_id)
        return web.Response(status=upstream.status, headers=headers,
                            body=redact(body, self.state.upstream.api_key))

    def _first_data(self) -> None:
        """Real data arrived: stamp it and lift the first-byte deadline to the total one."""
        self.meter.first_byte_at = self.state.clock()
        if self._deadline is not None and self.client_alive:
            self._deadline.reschedule(self._total_deadline)

    async def _write(self, data: bytes) -> None:
        assert self.response is not None
        if not self.client_alive:
            return
        try:
            await self.response.write(data)
        except ConnectionError:
            self._client_left()

    def _client_left(self) -> None:
        """Keep reading upstream for the real usage, but only for the grace time."""
        self.client_alive = False
        grace = self._loop.time() + self.state.config.timeouts.client_disconnect_grace
        if self._deadline is not None:
            self._deadline.reschedule(min(self._deadline.when, grace))

    async def _relay_body(self, upstream: aiohttp.ClientResponse) -> None:
        parts: list[bytes] = []
        async for chunk in upstream.content.iter_any():
            if self.meter.first_byte_at is None and chunk.strip():
                self._first_data()
            parts.append(chunk)
            await self._write(chunk)
        tick = time.perf_counter()
        try:
            self._read_answer(b"".join(parts))
        finally:
            self.meter.proxy_seconds += time.perf_counter() - tick

    def _read_answer(self, body: bytes) -> None:
        """Usage and served model from a whole JSON body."""
        try:
            answer = orjson.loads(body)
        except (ValueError, UnicodeDecodeError):
            answer = None
        if not isinstance(answer, dict):
            if not body.strip():
                raise _UpstreamCut
            self.meter.outcome = "bad_response"
            self.meter.flags.append("unparseable_body")
            return
        if isinstance(answer.get("model"), str):
            self.meter.model_served = answer["model"]
        if "usage" in answer and answer["usage"] is not None:
            self.meter.take_usage(answer["usage"], self.state.config.tool_fields)

    async def _relay_stream(self, upstream: aiohttp.ClientResponse) -> None:
        splitter = SSESplitter()
        inspector = StreamMeter(self.meter, self.client_wants_usage,
                                self.state.config.tool_fields)
        meter = self.meter
        async for chunk in upstream.content.iter_any():
            tick = time.perf_counter()
            out = []
            for event in splitter.feed(chunk):
                if event.data is not None and meter.first_byte_at is None:
                    self._first_data()
                if inspector.inspect(event):
                    out.append(event.raw)
            meter.proxy_seconds += time.perf_counter() - tick
            if out:
                await self._write(b"".join(out))
        out = [event.raw for event in splitter.finish() if inspector.inspect(event)]
        if out:
            await self._write(b"".join(out))
        if not inspector.done:
            raise _UpstreamCut

    async def _fail(self, message: str, before_start: ProxyError) -> web.StreamResponse:
        """Signal a failure: an error response if nothing was sent yet, else in-band."""
        response = self.response
        if response is None or not response.prepared:
            return error_response(before_start)
        if self.meter.stream:
            # The OpenAI SDKs raise on an `error` event; no [DONE] follows.
            event = b"data: " + error_body(message, "upstream_error", "upstream_cut") + b"\n\n"
            await self._write(event)
            return self._finished_response()
        # A JSON body cut short cannot be marked in-band: drop the connection so the client
        # sees an incomplete response rather than a shorter, valid-looking one.
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        return response

    def _finished_response(self) -> web.StreamResponse:
        assert self.response is not None
        return self.response
