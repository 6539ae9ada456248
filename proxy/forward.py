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
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import aiohttp
import orjson
from aiohttp import web

from proxy.admission import Admission
from proxy.answer import (
    DECODABLE,
    FLAG_BODY_TOO_LARGE,
    BodyTap,
    Decoder,
    Undecodable,
    encoding,
    shown_body,
)
from proxy.auth import ClientKey
from proxy.bounds import output_bound, prompt_bound
from proxy.budgets import BudgetExceeded, BudgetGuard, CallSize, Reservation
from proxy.config import ProxyConfig
from proxy.errors import (
    InternalError,
    LedgerUnavailable,
    ProxyError,
    UpstreamBadResponse,
    UpstreamCut,
    UpstreamRedirect,
    UpstreamTimeout,
    error_body,
    error_response,
)
from proxy.metering import FLAG_AFTER_DONE, CallMeter, StreamMeter, build_record
from proxy.metrics import ProxyMetrics
from proxy.pricing import Pricer
from proxy.records import ALWAYS_HEALTHY, LedgerHealth, RecordSink, UsageRecord
from proxy.request_body import (
    parse_payload,
    read_body,
    refuse_compressed,
    rewrite,
    usage_option,
    wants_usage,
)
from proxy.sse import EventTooLarge, SSESplitter
from proxy.upstream import KeyMask, Upstream, read_limited, redact, response_headers

log = logging.getLogger("proxy.forward")

MAX_ERROR_BODY = 1 << 20
SMALL_BODY = 1 << 16
AFTER_DONE_BYTES = 1 << 16
"""How much a stream may send after ``[DONE]`` (ignored) before the proxy stops reading it."""
FLAG_UNDECODABLE = "undecodable_body"
FLAG_OVERSIZED_EVENT = "oversized_event"


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    """``chat`` or ``fim``: the label records and metrics use."""
    upstream_path: str


@dataclass(frozen=True, slots=True)
class ProxyState:
    """Everything a request handler needs, built once at start-up (see `proxy.app`)."""

    config: ProxyConfig
    pricer: Pricer
    """The price book in use (`pricer.book`) and its memo of lookups."""
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


async def proxy_completion(
    request: web.Request, state: ProxyState, client: ClientKey, endpoint: Endpoint
) -> web.StreamResponse:
    """Read, admit, exchange, record: one completion call.

    Everything that can refuse a request without cost (encoding, size, JSON, model) comes
    before admission. Every step after it (the in-flight slot, the budget hold, the ledger
    row) is undone in one ``finally``, whatever ends the call, a bug included: a request can
    never leave a slot or a hold behind.
    """
    started_at = state.clock()
    refuse_compressed(request)
    body = await read_body(
        request, state.config.limits.max_request_bytes, state.config.timeouts.client_body
    )
    tick = time.perf_counter()
    payload = parse_payload(body)
    limits = state.config.limits
    client_wants_usage = wants_usage(payload)
    changes = usage_option(payload)
    default_max_tokens = state.config.policy(client.team).default_max_tokens
    if default_max_tokens is not None and payload.get("max_tokens") is None:
        changes["max_tokens"] = default_max_tokens
    size = CallSize(
        prompt_bound(payload, len(body), limits),
        output_bound(changes if "max_tokens" in changes else payload, limits),
    )
    meter = CallMeter(
        request_id=new_request_id(),
        team=client.team,
        key_id=client.key_id,
        endpoint=endpoint.name,
        stream=payload.get("stream") is True,
        model_requested=payload["model"],
        payload=payload,
        started_at=started_at,
        prompt_bound=size.prompt,
        output_bound=size.output,
        price_book=state.pricer.book.digest,
    )
    _refuse_unrecordable(state, client.team)
    state.admission.enter(client.team)
    reservation: Reservation | None = None
    exchange: _Exchange | None = None
    dispatched = False
    try:
        if state.budgets.applies(client.team):
            reservation = await _reserve(state, meter, size)
            if reservation.max_tokens is not None:
                changes["max_tokens"] = meter.output_bound = reservation.max_tokens
        body = rewrite(body, payload, changes, normalise=_ambiguous(body))
        dispatched = True  # from here a sink may hold an in-flight row: a final one follows
        state.sink.dispatched(meter)
        exchange = _Exchange(request, state, meter, client_wants_usage, changes.get("max_tokens"))
        meter.proxy_seconds += time.perf_counter() - tick
        try:
            response = await exchange.run(endpoint, body)
        except asyncio.CancelledError:
            meter.outcome = "aborted"
            raise
        await _send_now(request, response)  # a cancel here finds the call already over
        return response
    except (ProxyError, asyncio.CancelledError):
        raise
    except Exception as exc:
        if exchange is not None and exchange.answer_started:
            raise  # the answer is under way: aiohttp drops the connection, the client sees it
        log.exception("request %s failed inside the proxy", meter.request_id)
        raise InternalError(
            f"the proxy failed while handling this call (request "
            f"{meter.request_id}); the failure is logged"
        ) from exc
    finally:
        state.admission.leave(client.team)
        record = _submit(state, meter) if dispatched else None
        if reservation is not None:
            await state.budgets.settle(reservation, _settlement(exchange, record))


def _refuse_unrecordable(state: ProxyState, team: str) -> None:
    """Refuse a call the proxy is about to stop serving or could not record. A draining proxy
    says so first (the client should go elsewhere). A record the ledger cannot keep is spend
    no one will see: with its bounded queue full, no call is admitted; while it cannot commit,
    no call that a hard budget must count."""
    state.admission.refuse_if_draining()
    if not state.ledger.has_room():
        raise LedgerUnavailable(
            "the usage ledger cannot record calls and the records waiting "
            "for it fill its queue: calls are refused until it recovers"
        )
    if not state.ledger.committing() and state.budgets.applies(team):
        raise LedgerUnavailable(
            f"the usage ledger cannot record calls: calls of team "
            f"{team!r}, which has a hard budget, are refused until it "
            "can, since their spend would not count"
        )


def _ambiguous(body: bytes) -> bool:
    """Whether the body may name ``model`` or ``max_tokens`` twice. JSON leaves duplicate keys
    to the parser: the proxy's keeps the last, another may keep the first and be billed for a
    model or a length the proxy never priced or reserved. Such a body (or one where the key
    names also occur deeper, in a tool schema say) is sent re-serialised from what the proxy
    read, so both sides read the same request."""
    return body.count(b'"model"') > 1 or body.count(b'"max_tokens"') > 1


async def _reserve(state: ProxyState, meter: CallMeter, size: CallSize) -> Reservation:
    try:
        return await state.budgets.reserve(
            meter.team, meter.request_id, meter.model_requested, size, meter.started_at
        )
    except BudgetExceeded:
        state.metrics.budget_refusals.labels(meter.team).inc()
        raise


def _settlement(
    exchange: _Exchange | None, record: UsageRecord | None
) -> dict[str, Decimal] | None:
    """What a reservation settles to: None if nothing is billable (the call never went out,
    or DeepSeek refused it); the record's costs otherwise (empty if no record could be built:
    nothing to count, as in the ledger)."""
    if exchange is None or (record is not None and record.usage_source == "none"):
        return None
    return dict(record.costs) if record is not None else {}


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
        record = build_record(
            meter, state.clock(), state.pricer, state.config.price_at, state.config.limits
        )
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

    __slots__ = ("_cancelling", "_handle", "_loop", "_task", "_uncancelled", "expired", "when")

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

    def __init__(
        self,
        request: web.Request,
        state: ProxyState,
        meter: CallMeter,
        client_wants_usage: bool,
        max_tokens_set: int | None,
    ) -> None:
        self.request = request
        self.state = state
        self.meter = meter
        self.client_wants_usage = client_wants_usage
        self.max_tokens_set = max_tokens_set
        """``max_tokens`` the proxy wrote or lowered, told to the client in a header."""
        self.response: web.StreamResponse | None = None
        self.client_alive = True
        self._deadline: Deadline | None = None
        self._loop = asyncio.get_running_loop()
        self._total_deadline = 0.0

    @property
    def answer_started(self) -> bool:
        return self.response is not None and self.response.prepared

    async def run(self, endpoint: Endpoint, body: bytes) -> web.StreamResponse:
        timeouts = self.state.config.timeouts
        start = self._loop.time()
        self._total_deadline = start + timeouts.total
        first = min(self._total_deadline, start + timeouts.first_byte)
        try:
            self._deadline = deadline = Deadline(self._loop, first)
            try:
                upstream = await self.state.upstream.request(
                    "POST", endpoint.upstream_path, self.request.headers, body
                )
                async with upstream:
                    return await self._relay(upstream)
            except asyncio.CancelledError:
                if deadline.took_effect():
                    raise TimeoutError from None
                raise
            finally:
                deadline.close()
        except ProxyError as exc:
            self.meter.outcome = (
                "timeout"
                if isinstance(exc, UpstreamTimeout)
                else "upstream_cut"
                if isinstance(exc, UpstreamCut)
                else "connect_error"
            )
            return error_response(exc)
        except TimeoutError:
            if not self.client_alive:
                self.meter.outcome = "client_disconnected"
                return self._finished_response()
            self.meter.outcome = "timeout"
            return await self._fail(
                "DeepSeek did not finish in time",
                UpstreamTimeout("DeepSeek did not answer in time; the call may still be billed"),
            )
        except (Undecodable, EventTooLarge) as exc:
            self.meter.flag(
                FLAG_UNDECODABLE if isinstance(exc, Undecodable) else FLAG_OVERSIZED_EVENT
            )
            return await self._broken(exc)
        except (_UpstreamCut, aiohttp.ClientError, OSError):
            if not self.client_alive:
                self.meter.outcome = "client_disconnected"
                return self._finished_response()
            self.meter.outcome = "upstream_cut"
            return await self._fail(
                "DeepSeek closed the connection before the response was complete",
                UpstreamCut(
                    "DeepSeek closed the connection before answering; the call may still be billed"
                ),
            )

    async def _broken(self, exc: Exception) -> web.StreamResponse:
        """DeepSeek's answer cannot be read on (an undecodable body, an endless event)."""
        self.meter.outcome = "bad_response"
        if not self.client_alive:
            return self._finished_response()
        return await self._fail(
            f"the proxy cannot read DeepSeek's answer on: {exc}",
            UpstreamBadResponse(
                f"DeepSeek's answer cannot be read: {exc}; the call may still be billed"
            ),
        )

    async def _relay(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        meter = self.meter
        meter.upstream_status = upstream.status
        meter.trace_id = self.meter.upstream_text(upstream.headers.get("x-ds-trace-id"))
        if upstream.status >= 400:
            meter.outcome = "upstream_error"
            return await self._relay_error(upstream)
        if 300 <= upstream.status < 400:
            # Neither followed nor passed on: a client SDK would follow it with its own key.
            meter.outcome = "upstream_error"
            return error_response(
                UpstreamRedirect(
                    f"DeepSeek answered HTTP {upstream.status} (a redirect); the proxy does not "
                    "follow redirects"
                )
            )
        decoder = self._decoder(upstream)
        meter.outcome = "upstream_cut"  # until the answer is seen whole
        headers = self._headers(upstream)
        is_stream = upstream.content_type == "text/event-stream"
        length = upstream.content_length
        if not is_stream and decoder is None and length is not None and length <= SMALL_BODY:
            # A small body of known length comes whole (no keep-alive lines precede it: those
            # come chunked): answer it in one write, which costs the event loop far less.
            body = await upstream.read()
            self.meter.first_byte_at = self.state.clock()  # and the last: no deadline to lift
            self._read_answer(body)
            if meter.outcome == "upstream_cut":
                meter.outcome = "complete"
            return web.Response(
                status=upstream.status, headers=headers, body=self.state.upstream.mask.whole(body)
            )
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if not is_stream and decoder is None and length is not None:
            response.content_length = length
        self.response = response
        await response.prepare(self.request)
        source: AsyncIterable[bytes] = upstream.content.iter_any()
        if decoder is not None:
            source = _decoded(source, decoder)
        if is_stream:
            await self._relay_stream(source)
        else:
            await self._relay_body(source)
        if meter.outcome == "upstream_cut":  # nothing went wrong on the way
            meter.outcome = "complete" if self.client_alive else "client_disconnected"
        return self._finished_response()

    def _decoder(self, upstream: aiohttp.ClientResponse) -> Decoder | None:
        """A decoder for a body DeepSeek compressed although asked not to (`proxy.answer`)."""
        kind = encoding(upstream.headers)
        if kind in ("", "identity"):
            return None
        if kind in DECODABLE:
            return Decoder()
        raise Undecodable(f"DeepSeek sent it with Content-Encoding {kind[:32]!r}")

    def _headers(self, upstream: aiohttp.ClientResponse) -> dict[str, str]:
        headers = response_headers(upstream.headers)
        self.state.upstream.mask.headers(headers)
        headers["x-request-id"] = self.meter.request_id
        if self.max_tokens_set is not None:
            headers["x-proxy-max-tokens"] = str(self.max_tokens_set)
        return headers

    async def _relay_error(self, upstream: aiohttp.ClientResponse) -> web.Response:
        headers = self._headers(upstream)
        body = shown_body(
            await read_limited(upstream, MAX_ERROR_BODY), upstream.headers, headers, MAX_ERROR_BODY
        )
        if upstream.status == 402:
            headers["x-should-retry"] = "false"  # balance refusals: a retry cannot succeed
        if upstream.status in (401, 402):
            log.error(
                "DeepSeek refused the proxy's key or account: HTTP %s (request %s)",
                upstream.status,
                self.meter.request_id,
            )
        return web.Response(
            status=upstream.status, headers=headers, body=redact(body, self.state.upstream.api_key)
        )

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

    async def _relay_body(self, source: AsyncIterable[bytes]) -> None:
        tap = BodyTap()
        mask = KeyMask(self.state.upstream.api_key)
        async for chunk in source:
            if self.meter.first_byte_at is None and chunk.strip():
                self._first_data()
            tap.add(chunk)
            out = mask.part(chunk)
            if out:
                await self._write(out)
        rest = mask.rest()
        if rest:
            await self._write(rest)
        tick = time.perf_counter()
        try:
            if tap.truncated:
                self._read_edges(tap)
            else:
                self._read_answer(tap.whole())
        finally:
            self.meter.proxy_seconds += time.perf_counter() - tick

    def _read_edges(self, tap: BodyTap) -> None:
        """Usage and served model from the two ends of a body too large to keep whole."""
        meter = self.meter
        meter.flag(FLAG_BODY_TOO_LARGE)
        model, usage = tap.edges()
        meter.model_served = self.meter.upstream_text(model)
        if usage is not None:
            meter.take_usage(usage, self.state.config.tool_fields)

    def _read_answer(self, body: bytes) -> None:
        """Usage and served model from a whole JSON body."""
        meter = self.meter
        try:
            answer = orjson.loads(body)
        except (ValueError, UnicodeDecodeError):
            answer = None
        if not isinstance(answer, dict):
            if not body.strip():
                raise _UpstreamCut
            meter.outcome = "bad_response"
            meter.flag("unparseable_body")
            return
        if "model" in answer:
            meter.model_served = self.meter.upstream_text(answer["model"])
        if "usage" in answer and answer["usage"] is not None:
            meter.take_usage(answer["usage"], self.state.config.tool_fields)

    async def _relay_stream(self, source: AsyncIterable[bytes]) -> None:
        splitter = SSESplitter()
        inspector = StreamMeter(self.meter, self.client_wants_usage, self.state.config.tool_fields)
        meter = self.meter
        mask = self.state.upstream.mask
        after_done = 0
        async for chunk in source:
            if inspector.done:  # read on to the end so the connection can be reused, but
                after_done += len(chunk)  # not forever: nothing after [DONE] counts
                if after_done > AFTER_DONE_BYTES:
                    meter.flag(FLAG_AFTER_DONE)
                    break
            tick = time.perf_counter()
            out = []
            for event in splitter.feed(chunk):
                if event.data is not None and meter.first_byte_at is None:
                    self._first_data()
                if inspector.inspect(event):
                    out.append(event.raw)
            meter.proxy_seconds += time.perf_counter() - tick
            if out:
                await self._write(mask.whole(b"".join(out)))
        out = [event.raw for event in splitter.finish() if inspector.inspect(event)]
        if out:
            await self._write(mask.whole(b"".join(out)))
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


async def _decoded(source: AsyncIterable[bytes], decoder: Decoder) -> AsyncIterator[bytes]:
    async for chunk in source:
        for piece in decoder.feed(chunk):
            yield piece
    rest = decoder.finish()
    if rest:
        yield rest
