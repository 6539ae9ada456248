"""One exchange with DeepSeek and its relay to the client, as it happens.

The answer comes back as it arrives: blank keep-alive lines before a JSON body and
``: keep-alive`` comments before a stream are relayed at once, since they are what keeps the
client's connection open while DeepSeek queues the request; stream events are relayed one read
at a time, never buffered whole.

The exchange records facts on the call's meter (DeepSeek's status, what failed, whether the
client left, the usage it saw) and never names the outcome: `proxy.outcome.classify` does, once,
when the call is over. How each ending is handled:

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
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from proxy.dialects.registry import OPENAI_CHAT, Dialect
from proxy.errors import (
    UpstreamBadResponse,
    UpstreamCut,
    UpstreamFailure,
    UpstreamTimeout,
    error_response,
)
from proxy.metering import FLAG_AFTER_DONE, CallMeter
from proxy.relay.deadline import Deadline
from proxy.relay.tap import FLAG_BODY_TOO_LARGE, BodyTap
from proxy.sse import EventTooLarge, SSESplitter
from proxy.upstream import KeyMask, Undecodable, UpstreamAnswer, refuse_redirect

if TYPE_CHECKING:
    from proxy.state import ProxyState

log = logging.getLogger("proxy.relay")

SMALL_BODY = 1 << 16
AFTER_DONE_BYTES = 1 << 16
"""How much a stream may send after ``[DONE]`` (ignored) before the proxy stops reading it."""
FLAG_UNDECODABLE = "undecodable_body"
FLAG_OVERSIZED_EVENT = "oversized_event"
FLAG_UNPARSEABLE = "unparseable_body"
IN_BAND = {
    "timeout": "DeepSeek did not finish in time",
    "cut": "DeepSeek closed the connection before the response was complete",
}
"""The error event a stream ends with, by failure (code ``upstream_cut`` for all: what the
client needs to know is that the answer it has is not whole)."""


class Exchange:
    """One upstream exchange and its relay; holds what the error paths need to know."""

    def __init__(
        self,
        request: web.Request,
        state: ProxyState,
        meter: CallMeter,
        client_wants_usage: bool,
        max_tokens_set: int | None,
        dialect: Dialect = OPENAI_CHAT,
    ) -> None:
        self.request = request
        self.state = state
        self.meter = meter
        self.client_wants_usage = client_wants_usage
        self.max_tokens_set = max_tokens_set
        self.dialect = dialect
        """``max_tokens`` the proxy wrote or lowered, told to the client in a header."""
        self.budget_remaining: str | None = None
        """``x-proxy-budget-remaining`` (`proxy.budgets.decide.remaining_text`), set by the
        call when its reservation carries it."""
        self.response: web.StreamResponse | None = None
        self._deadline: Deadline | None = None
        self._loop = asyncio.get_running_loop()
        self._total_deadline = 0.0

    @property
    def answer_started(self) -> bool:
        return self.response is not None and self.response.prepared

    async def run(self, upstream_path: str, body: bytes) -> web.StreamResponse:
        timeouts = self.state.config.timeouts
        start = self._loop.time()
        self._total_deadline = start + timeouts.total
        first = min(self._total_deadline, start + timeouts.first_byte)
        try:
            self._deadline = deadline = Deadline(self._loop, first)
            try:
                answer = await self.state.upstream.send(
                    "POST", upstream_path, self.request.headers, body
                )
                async with answer:
                    return await self._relay(answer)
            except asyncio.CancelledError:
                if deadline.took_effect():
                    raise UpstreamTimeout(
                        "DeepSeek did not answer in time; the call may still be billed"
                    ) from None
                raise
            finally:
                deadline.close()
        except (Undecodable, EventTooLarge) as exc:
            self.meter.flag(
                FLAG_UNDECODABLE if isinstance(exc, Undecodable) else FLAG_OVERSIZED_EVENT
            )
            failure = UpstreamBadResponse(
                f"DeepSeek's answer cannot be read: {exc}; the call may still be billed"
            )
            return await self._failed(failure, f"the proxy cannot read DeepSeek's answer on: {exc}")
        except UpstreamFailure as exc:
            return await self._failed(exc, IN_BAND.get(exc.failure or "", exc.message))

    async def _failed(self, failure: UpstreamFailure, in_band: str) -> web.StreamResponse:
        """Record what failed and tell the client: an error response if nothing was sent yet,
        else in-band (or, a JSON body being cut short, by closing the connection)."""
        meter = self.meter
        if failure.failure is not None:
            meter.failure = failure.failure
        response = self.response
        if response is None or not response.prepared:
            return error_response(failure, self.dialect.error_shape)
        if meter.client_left:
            return response
        if meter.stream:
            # The SDKs raise on an error event; nothing follows it.
            await self._write(self.dialect.cut_event(in_band))
            return response
        # A JSON body cut short cannot be marked in-band: drop the connection so the client
        # sees an incomplete response rather than a shorter, valid-looking one.
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        return response

    async def _relay(self, answer: UpstreamAnswer) -> web.StreamResponse:
        meter = self.meter
        meter.upstream_status = answer.status
        meter.trace_id = meter.upstream_text(answer.headers.get("x-ds-trace-id"))
        refuse_redirect(answer)
        if answer.status >= 400:
            return await self._relay_error(answer)
        length = answer.content_length if not answer.encoded else None  # None: decoded
        if not answer.is_stream and length is not None and length <= SMALL_BODY:
            # A small body of known length comes whole (no keep-alive lines precede it: those
            # come chunked): answer it in one write, which costs the event loop far less. Its
            # first byte is its last, so there is no deadline to lift.
            body = await answer.read()
            meter.first_byte_at = self.state.clock()
            self._read_answer(body)
            return web.Response(
                status=answer.status,
                headers=self._own_headers(self.state.upstream.relayed_headers(answer)),
                body=self.state.upstream.mask.whole(body),
            )
        source = answer.chunks()  # raises Undecodable before anything is sent
        headers = self._own_headers(self.state.upstream.relayed_headers(answer))
        response = self.response = web.StreamResponse(status=answer.status, headers=headers)
        if not answer.is_stream and length is not None:
            response.content_length = length
        meter.client_status = answer.status  # from here the client has it (or has gone)
        try:
            await response.prepare(self.request)
        except ConnectionError:  # the client left before the answer began: meter it anyway
            self._client_left()
        if answer.is_stream:
            await self._relay_stream(source)
        else:
            await self._relay_body(source)
        return response

    def _own_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """DeepSeek's headers plus the proxy's: the call's id, ``max_tokens`` if set, and
        what the team's hard budgets had left if ``headers.budget_remaining`` is on."""
        headers["x-request-id"] = self.meter.request_id
        if self.max_tokens_set is not None:
            headers["x-proxy-max-tokens"] = str(self.max_tokens_set)
        if self.budget_remaining is not None:
            headers["x-proxy-budget-remaining"] = self.budget_remaining
        return headers

    async def _relay_error(self, answer: UpstreamAnswer) -> web.Response:
        headers, body = await self.state.upstream.shown(answer)
        self._own_headers(headers)
        if answer.status == 402:
            headers["x-should-retry"] = "false"  # balance refusals: a retry cannot succeed
        if answer.status in (401, 402):
            log.error(
                "DeepSeek refused the proxy's key or account: HTTP %s (request %s)",
                answer.status,
                self.meter.request_id,
            )
        return web.Response(status=answer.status, headers=headers, body=body)

    def _first_data(self) -> None:
        """Real data arrived: stamp it and lift the first-byte deadline to the total one."""
        self.meter.first_byte_at = self.state.clock()
        if self._deadline is not None and not self.meter.client_left:
            self._deadline.reschedule(self._total_deadline)

    async def _write(self, data: bytes) -> None:
        assert self.response is not None
        if self.meter.client_left:
            return
        try:
            await self.response.write(data)
        except ConnectionError:
            self._client_left()

    def _client_left(self) -> None:
        """Keep reading upstream for the real usage, but only for the grace time."""
        self.meter.client_left = True
        grace = self._loop.time() + self.state.config.timeouts.client_disconnect_grace
        if self._deadline is not None:
            self._deadline.reschedule(min(self._deadline.when, grace))

    async def _relay_body(self, source: AsyncIterator[bytes]) -> None:
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
            self.meter.overhead_seconds += time.perf_counter() - tick

    def _read_edges(self, tap: BodyTap) -> None:
        """Usage and served model from the two ends of a body too large to keep whole."""
        meter = self.meter
        meter.flag(FLAG_BODY_TOO_LARGE)
        model, usage = tap.edges()
        meter.model_served = meter.upstream_text(model)
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
                raise UpstreamCut(
                    "DeepSeek closed the connection before answering; the call may still be billed"
                )
            meter.failure = "unreadable"  # relayed as it came, but not DeepSeek's JSON
            meter.flag(FLAG_UNPARSEABLE)
            return
        if "model" in answer:
            meter.model_served = meter.upstream_text(answer["model"])
        if "usage" in answer and answer["usage"] is not None:
            meter.take_usage(answer["usage"], self.state.config.tool_fields)

    async def _relay_stream(self, source: AsyncIterator[bytes]) -> None:
        splitter = SSESplitter()
        stream_meter = self.dialect.stream_meter(
            self.meter, self.client_wants_usage, self.state.config.tool_fields
        )
        meter = self.meter
        mask = self.state.upstream.mask
        after_done = 0
        async for chunk in source:
            if stream_meter.done:  # read on to the end so the connection can be reused, but
                after_done += len(chunk)  # not forever: nothing after [DONE] counts
                if after_done > AFTER_DONE_BYTES:
                    meter.flag(FLAG_AFTER_DONE)
                    break
            tick = time.perf_counter()
            out = []
            for event in splitter.feed(chunk):
                if event.data is not None and meter.first_byte_at is None:
                    self._first_data()
                if stream_meter.inspect(event):
                    out.append(event.raw)
            meter.overhead_seconds += time.perf_counter() - tick
            if out:
                await self._write(mask.whole(b"".join(out)))
        out = [event.raw for event in splitter.finish() if stream_meter.inspect(event)]
        if out:
            await self._write(mask.whole(b"".join(out)))
        if not stream_meter.done:
            raise UpstreamCut(
                "DeepSeek closed the connection before the response was complete; the call "
                "may still be billed"
            )
