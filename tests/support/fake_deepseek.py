"""A fake DeepSeek upstream on loopback, faithful where the proxy can go wrong.

The proxy's hard cases only exist on a real socket: blank keep-alive lines before a JSON body,
``: keep-alive`` SSE comments, usage that moves between chunks depending on the API's vintage,
CRLF framing, streams cut mid-way and clients that hang up. Mocks cannot show those, so the proxy's
tests run against this aiohttp server instead (facts from ``/work/shared/deepseek-api.md``).

Each request goes through the same steps, in DeepSeek's order:

1. it is recorded in `FakeDeepSeek.requests` (every path, even rejected ones);
2. it is routed (unknown path or method: 404);
3. it is authenticated (anything but ``Bearer FAKE_UPSTREAM_KEY``: 401 echoing the key's last 4
   characters, as DeepSeek does; the Anthropic paths also take ``x-api-key: FAKE_UPSTREAM_KEY``,
   which wins over ``Authorization`` when both are sent, and answer in Anthropic's error shape);
4. a completion body is validated (bad JSON: 400, missing field: 422, ``stream_options`` without
   ``stream: true``: 400, model ``nonexistent-model``: 400 "Model Not Exist"; Anthropic Messages
   and Responses bodies as `validate_anthropic` / `validate_responses` say);
5. a completion (chat, FIM, Anthropic Messages, Responses) takes the next queued `Reply` (or
   ``Reply()`` when the queue is empty), which decides everything about the answer, except that,
   as DeepSeek does, generation stops at the request's ``max_tokens`` with ``finish_reason:
   length`` (`within_max_tokens`; Anthropic's ``max_tokens`` too, its stop reason
   ``max_tokens``).

Requests rejected in steps 2-4 never consume a queued `Reply`, so a test can enqueue replies
without counting the requests the proxy should have stopped on its own.

``GET /user/balance`` answers the fixed `BALANCE` unless a test opens an account
(`FakeDeepSeek.account`, `tests.support.fake_account`): then each completion (chat, FIM,
Anthropic Messages, Responses) is charged to it from the usage the fake reports, and the
balance answers its current figures.
`balance_status` and `balance_body` make the balance endpoint fail.

Usage numbers are deterministic (see `default_usage`, `default_anthropic_usage`,
`default_responses_usage`), so a test can compute what the proxy should meter from the request it
sent and the `Reply` it queued.

The Anthropic (``/anthropic/v1/messages``, ``/anthropic/messages``) and Responses (``/responses``,
``/v1/responses``) endpoints send keep-alives like chat does: DeepSeek documents them for requests
waiting in its queue, which sits before any API format, and both SDKs' parsers skip them (blank
lines before JSON, SSE comments).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

from aiohttp import web

from tests.support.fake_account import (
    FakeAccount,
    anthropic_as_chat,
    anthropic_served,
    responses_as_chat,
)
from tests.support.fake_deepseek_shapes import (
    BALANCE,
    FAKE_UPSTREAM_KEY,
    MODELS,
    NONEXISTENT_MODEL,
    RecordedRequest,
    Reply,
    completion_body,
    dumps,
    error_body,
    parse_json,
    reported_usage,
    stream_chunks,
    within_max_tokens,
)
from tests.support.fake_dialect_shapes import (
    Rejection,
    anthropic_error_body,
    anthropic_events,
    anthropic_message,
    anthropic_usage,
    default_anthropic_usage,
    response_object,
    responses_events,
    responses_usage,
    validate_anthropic,
    validate_responses,
)
from tests.support.fake_plans import (
    PlannedAnswer,
    document_plan,
    error_plan,
    json_plan,
    stream_plan,
    trace_headers,
)

# Handlers still running when the fake closes (a test that left a slow stream open) are
# cancelled rather than holding the test up. aiohttp waits this long twice (graceful, then after
# cancelling), so a slow stream delays close() by about half a second.
_SHUTDOWN_TIMEOUT: Final = 0.25
_BEARER: Final = f"Bearer {FAKE_UPSTREAM_KEY}"
# Before cutting a connection on purpose, let the bytes already written leave the transport
# buffer (polled every millisecond, about a second at most): abort() drops whatever is still
# queued, and the test wants the partial body.
_FLUSH_POLLS: Final = 1000


class _Rejected(Exception):
    """A request stopped before it reached the reply queue; carries the error response."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


_Route = Callable[[RecordedRequest], "PlannedAnswer"]
_ANTHROPIC_PATHS: Final = frozenset({"/anthropic/v1/messages", "/anthropic/messages"})
COUNT_TOKENS_PATH: Final = "/anthropic/v1/messages/count_tokens"
"""Anthropic's token counting. DeepSeek's guide does not list it, so the fake answers it with
its 404 unless a test sets `FakeDeepSeek.offers_count_tokens` (DeepSeek adding it later)."""
_RESPONSES_PATHS: Final = frozenset({"/responses", "/v1/responses"})


class FakeDeepSeek:
    """The fake upstream: start it, queue `Reply` objects, point the proxy at `base_url`.

    What happened is observable without sleeping: `requests`, `connections_seen`, `finished`,
    `disconnects` and `cut` fill in as the server works, and `wait_for` polls a condition on them
    with a deadline.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.connections_seen = 0
        self.disconnects: list[str] = []
        self.finished: list[str] = []
        self.cut: list[str] = []
        self._queue: deque[Reply] = deque()
        self.offers_count_tokens = False
        self.account: FakeAccount | None = None
        """When set, completions are charged to it and ``/user/balance`` shows it."""
        self.balance_status = 200
        """Another status makes ``/user/balance`` answer DeepSeek's error body with it."""
        self.balance_body: bytes | None = None
        """When set, ``/user/balance`` answers these bytes (a malformed balance)."""
        self.gate: asyncio.Event | None = None
        """While an unset event: requests are recorded (`requests`) but answered only once it
        is set, so a test can look at the proxy while a call is certainly running."""
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._base_url: str | None = None
        self._routes: dict[tuple[str, str], _Route] = {
            ("POST", "/chat/completions"): self._chat,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/beta/chat/completions"): self._chat,
            ("POST", "/beta/completions"): self._fim,
            ("GET", "/models"): self._models,
            ("GET", "/v1/models"): self._models,
            ("GET", "/user/balance"): self._balance,
            ("GET", "/v1/user/balance"): self._balance,
            **{("POST", path): self._anthropic for path in _ANTHROPIC_PATHS},
            ("POST", COUNT_TOKENS_PATH): self._count_tokens,
            **{("POST", path): self._responses for path in _RESPONSES_PATHS},
        }

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` once started."""
        if self._base_url is None:
            raise RuntimeError("FakeDeepSeek is not started")
        return self._base_url

    async def start(self) -> str:
        """Listen on 127.0.0.1 on a free port; returns the base URL."""
        app = web.Application()
        # One catch-all route: the fake routes itself so that unknown paths and wrong methods
        # are recorded and answered with DeepSeek-shaped JSON like everything else.
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        handler_factory = self._runner.server
        assert handler_factory is not None

        def accept() -> asyncio.BaseProtocol:
            # The protocol factory runs once per accepted TCP connection: the only place that
            # sees connections rather than requests (keep-alive reuse is what tests check).
            self.connections_seen += 1
            return handler_factory()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self._base_url = f"http://127.0.0.1:{port}"
        return self._base_url

    async def close(self) -> None:
        """Stop listening, finish or cancel in-flight handlers, release the port."""
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def enqueue(self, *replies: Reply) -> None:
        """Queue replies for the next chat/FIM requests, first in first out."""
        self._queue.extend(replies)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Return as soon as ``predicate()`` holds; TimeoutError after ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.005)

    # --- request handling ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        planned = self.answer(request.method, request.path, request.headers, body)
        if self.gate is not None:
            await self.gate.wait()
        return await self._send(request, planned)

    def answer(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> PlannedAnswer:
        """Record one request and decide the whole answer: status, headers and every write.

        The server sends the plan on a socket (`_send`); `tests.support.memory_transport` hands
        it to the proxy without one, so both transports answer exactly alike."""
        anthropic = path in _ANTHROPIC_PATHS or path == COUNT_TOKENS_PATH
        auth_header, offered = _offered_key(headers, anthropic=anthropic)
        record = RecordedRequest(
            method=method,
            path=path,
            headers={str(name): value for name, value in headers.items()},
            body=body,
            json=parse_json(body),
            id=_answer_id(path),
            auth_header=auth_header,
        )
        self.requests.append(record)
        try:
            route = self._routes.get((method, path))
            if path == COUNT_TOKENS_PATH and not self.offers_count_tokens:
                route = None
            if route is None:
                raise _Rejected(404, error_body(404, message=f"Not Found: {path}"))
            if offered != (FAKE_UPSTREAM_KEY if auth_header == "x-api-key" else _BEARER):
                key = offered.removeprefix("Bearer ").strip()
                refusal = anthropic_error_body if anthropic else error_body
                raise _Rejected(401, refusal(401, key=key))
            return route(record)
        except _Rejected as rejected:
            return error_plan(record, rejected.status, rejected.body, {})

    def _chat(self, record: RecordedRequest) -> PlannedAnswer:
        return self._completion(record, fim=False)

    def _fim(self, record: RecordedRequest) -> PlannedAnswer:
        return self._completion(record, fim=True)

    def _models(self, record: RecordedRequest) -> PlannedAnswer:
        return json_plan(record, MODELS)

    def _balance(self, record: RecordedRequest) -> PlannedAnswer:
        if self.balance_status != 200:
            status = self.balance_status
            return error_plan(record, status, error_body(status), {})
        if self.balance_body is not None:
            return document_plan(record, Reply(), {}, self.balance_body)
        return json_plan(record, BALANCE if self.account is None else self.account.body())

    def _count_tokens(self, record: RecordedRequest) -> PlannedAnswer:
        """Anthropic's answer, ``{"input_tokens": N}``: the prompt a Messages call with the
        same body would report (its input and cache reads together); never a queued `Reply`."""
        body = record.json
        counted = {"max_tokens": 1, **body} if isinstance(body, dict) else body
        usage = default_anthropic_usage(_accepted(validate_anthropic(counted), counted), Reply())
        tokens = usage["input_tokens"] + usage["cache_read_input_tokens"]
        return json_plan(record, {"input_tokens": tokens})

    def _anthropic(self, record: RecordedRequest) -> PlannedAnswer:
        data = _accepted(validate_anthropic(record.json), record.json)
        reply = within_max_tokens(data, self._next_reply())
        if reply.status >= 400:
            key = _offered_key(record.headers, anthropic=True)[1].removeprefix("Bearer ")
            body = reply.error_body
            if body is None:
                body = anthropic_error_body(reply.status, key=key.strip())
            return error_plan(record, reply.status, body, reply.headers)
        model, usage = str(data["model"]), anthropic_usage(data, reply)
        if self.account is not None and usage is not None:
            served = anthropic_served(model, self.account.rates)
            self.account.charge(served, anthropic_as_chat(usage))
        headers = trace_headers(reply.headers)
        if data.get("stream") is True:
            events = anthropic_events(message_id=record.id, model=model, reply=reply, usage=usage)
            return stream_plan(record, reply, headers, events, done=None)
        message = anthropic_message(message_id=record.id, model=model, reply=reply, usage=usage)
        return document_plan(record, reply, headers, dumps(message))

    def _responses(self, record: RecordedRequest) -> PlannedAnswer:
        data = _accepted(validate_responses(record.json), record.json)
        reply = self._next_reply()
        if reply.status >= 400:
            key = _offered_key(record.headers, anthropic=False)[1].removeprefix("Bearer ")
            body = reply.error_body
            if body is None:
                body = error_body(reply.status, key=key.strip())
            return error_plan(record, reply.status, body, reply.headers)
        shape: dict[str, Any] = {
            "response_id": record.id,
            "item_id": "msg_" + uuid.uuid4().hex,
            "created_at": int(time.time()),
            "request_json": data,
            "reply": reply,
            "usage": responses_usage(data, reply),
        }
        if self.account is not None and shape["usage"] is not None:
            self.account.charge(str(data["model"]), responses_as_chat(shape["usage"]))
        headers = trace_headers(reply.headers)
        if data.get("stream") is True:
            return stream_plan(record, reply, headers, responses_events(**shape), done=None)
        return document_plan(record, reply, headers, dumps(response_object(**shape)))

    def _next_reply(self) -> Reply:
        return self._queue.popleft() if self._queue else Reply()

    def _completion(self, record: RecordedRequest, *, fim: bool) -> PlannedAnswer:
        data = _validate(record.json, fim=fim)
        stream = data.get("stream") is True
        options = data.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        reply = within_max_tokens(data, self._next_reply())

        if reply.redirect_to is not None:
            return error_plan(record, 307, b"", {**reply.headers, "Location": reply.redirect_to})
        if reply.status >= 400:
            authorization = record.headers.get("Authorization", "")
            body = (
                reply.error_body
                if reply.error_body is not None
                else error_body(reply.status, key=authorization.removeprefix("Bearer ").strip())
            )
            return error_plan(record, reply.status, body, reply.headers)

        created = int(time.time())
        model = str(data["model"])
        usage = reported_usage(data, reply)
        if self.account is not None and usage is not None:
            self.account.charge(model, usage)
        headers = trace_headers(reply.headers)
        if stream:
            chunks = stream_chunks(
                completion_id=record.id,
                created=created,
                model=model,
                reply=reply,
                usage=usage,
                include_usage=include_usage,
                fim=fim,
            )
            return stream_plan(record, reply, headers, chunks, done=b"data: [DONE]")
        document = completion_body(
            completion_id=record.id, created=created, model=model, reply=reply, usage=usage, fim=fim
        )
        return document_plan(record, reply, headers, dumps(document))

    # --- sending, with disconnect tracking -----------------------------------------------------

    async def _send(self, request: web.Request, planned: PlannedAnswer) -> web.StreamResponse:
        """Send headers, then each write in turn; record how it ended.

        aiohttp (3.9+, ``handler_cancellation=False``) does not cancel a handler when its client
        goes away: the next write raises ConnectionResetError (aiohttp's
        ClientConnectionResetError subclasses it). CancelledError still comes if the handler is
        cancelled, e.g. by `close` during a slow stream; both count as disconnects.
        """
        record, writes, cut_at = planned.record, planned.writes, planned.cut_at
        response: web.StreamResponse
        if planned.whole is not None:
            response = web.Response(
                status=planned.status, headers=planned.headers, body=planned.whole
            )
        else:
            response = web.StreamResponse(status=planned.status, headers=planned.headers)
        try:
            await response.prepare(request)
            for index, write in enumerate(writes):
                if index == cut_at:
                    await self._abort(request)
                    self.cut.append(record.id)
                    return response
                if write.delay:
                    await asyncio.sleep(write.delay)
                await response.write(write.data)
            if cut_at is not None and cut_at >= len(writes):
                await self._abort(request)
                self.cut.append(record.id)
                return response
            await response.write_eof()
        except ConnectionError:
            self.disconnects.append(record.id)
            return response
        except asyncio.CancelledError:
            self.disconnects.append(record.id)
            raise
        self.finished.append(record.id)
        return response

    @staticmethod
    async def _abort(request: web.Request) -> None:
        """Close the TCP connection without ending the chunked body, as a crashed upstream does.

        What was written must reach the client first: abort() discards the transport's buffer."""
        transport = request.transport
        if transport is None:
            return
        for _ in range(_FLUSH_POLLS):
            if not transport.get_write_buffer_size() or transport.is_closing():
                break
            await asyncio.sleep(0.001)
        transport.abort()


def _validate(body: Any, *, fim: bool) -> dict[str, Any]:
    """DeepSeek's checks on a completion body, in its order; raises `_Rejected`."""
    if not isinstance(body, dict):
        raise _Rejected(
            400, error_body(400, message="Invalid Format: the body is not a JSON object")
        )
    for name in ("model", "prompt") if fim else ("model", "messages"):
        if name not in body:
            raise _Rejected(
                422, error_body(422, message=f"Invalid Parameters: missing field `{name}`")
            )
    # DeepSeek 2026 rejects stream_options on a non-streaming request (null counts as absent).
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise _Rejected(
            400,
            error_body(
                400, message="Invalid Format: stream_options should be set along with stream = true"
            ),
        )
    if body["model"] == NONEXISTENT_MODEL:
        raise _Rejected(400, error_body(400, message="Model Not Exist"))
    return body


def _accepted(rejection: Rejection | None, body: Any) -> dict[str, Any]:
    """``body`` once a dialect's validation passed; raises `_Rejected` otherwise."""
    if rejection is not None:
        raise _Rejected(*rejection)
    assert isinstance(body, dict)
    return body


def _offered_key(headers: Mapping[str, str], *, anthropic: bool) -> tuple[str | None, str]:
    """Which header carries the key, and its raw value (``Bearer ...`` for Authorization).

    Anthropic's SDKs send ``x-api-key``, DeepSeek also accepts Bearer there; when both come,
    ``x-api-key`` is the one judged, as on Anthropic's API. Elsewhere only Authorization counts."""
    lowered = {name.lower(): value for name, value in headers.items()}
    if anthropic and "x-api-key" in lowered:
        return "x-api-key", lowered["x-api-key"]
    if "authorization" in lowered:
        return "Authorization", lowered["authorization"]
    return None, ""


def _answer_id(path: str) -> str:
    """The id a request is answered with, in its API's own format."""
    if path in _ANTHROPIC_PATHS:
        return "msg_" + uuid.uuid4().hex[:24]
    if path in _RESPONSES_PATHS:
        return "resp_" + uuid.uuid4().hex
    return str(uuid.uuid4())


@contextlib.asynccontextmanager
async def running_fake() -> AsyncIterator[FakeDeepSeek]:
    """A started `FakeDeepSeek`, closed on exit."""
    fake = FakeDeepSeek()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
