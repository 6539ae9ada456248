"""A fake DeepSeek upstream on loopback, faithful where the proxy can go wrong.

The proxy's hard cases only exist on a real socket: blank keep-alive lines before a JSON body,
``: keep-alive`` SSE comments, usage that moves between chunks depending on the API's vintage,
CRLF framing, streams cut mid-way and clients that hang up. Mocks cannot show those, so the proxy's
tests run against this aiohttp server instead (facts from ``/work/shared/deepseek-api.md``).

Each request goes through the same steps, in DeepSeek's order:

1. it is recorded in `FakeDeepSeek.requests` (every path, even rejected ones);
2. it is routed (unknown path or method: 404);
3. it is authenticated (anything but ``Bearer FAKE_UPSTREAM_KEY``: 401 echoing the key's last 4
   characters, as DeepSeek does);
4. a completion body is validated (bad JSON: 400, missing field: 422, ``stream_options`` without
   ``stream: true``: 400, model ``nonexistent-model``: 400 "Model Not Exist");
5. a completion takes the next queued `Reply` (or ``Reply()`` when the queue is empty), which
   decides everything about the answer.

Requests rejected in steps 2-4 never consume a queued `Reply`, so a test can enqueue replies
without counting the requests the proxy should have stopped on its own.

Usage numbers are deterministic (see `default_usage`), so a test can compute what the proxy
should meter from the request it sent and the `Reply` it queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, Literal, get_args

from aiohttp import web

FAKE_UPSTREAM_KEY: Final = "sk-fake-upstream-0000CANARY"
SYSTEM_FINGERPRINT: Final = "fp_eaab8d114b_prod0820_fp8_kvcache"
NONEXISTENT_MODEL: Final = "nonexistent-model"
CACHE_UNIT: Final = 64
"""DeepSeek's context cache stores prefixes in 64-token units, so hits are multiples of 64."""

MODELS: Final = {
    "object": "list",
    "data": [
        {"id": "deepseek-flash", "object": "model", "owned_by": "deepseek"},
        {"id": "deepseek-v4-pro", "object": "model", "owned_by": "deepseek"},
    ],
}
BALANCE: Final = {
    "is_available": True,
    "balance_infos": [
        {"currency": "CNY", "total_balance": "110.00", "granted_balance": "10.00",
         "topped_up_balance": "100.00"},
    ],
}

UsagePlacement = Literal["last_chunk", "separate_chunk", "null_chunks_then_separate", "twice"]
USAGE_PLACEMENTS: Final[tuple[str, ...]] = get_args(UsagePlacement)

# Handlers still running when the fake closes (a test that left a slow stream open) are
# cancelled rather than holding the test up. aiohttp waits this long twice (graceful, then after
# cancelling), so a slow stream delays close() by about half a second.
_SHUTDOWN_TIMEOUT: Final = 0.25
# Before cutting a connection on purpose, let the bytes already written leave the transport
# buffer (polled every millisecond, about a second at most): abort() drops whatever is still
# queued, and the test wants the partial body.
_FLUSH_POLLS: Final = 1000

# status -> (message, type, code). DeepSeek's messages from its error-code table; type and code
# vary between DeepSeek's own bodies, and the proxy must not key logic on them anyway.
_ERRORS: Final[dict[int, tuple[str, str, str]]] = {
    400: ("Invalid Format", "invalid_request_error", "invalid_request_error"),
    401: ("Authentication Fails", "authentication_error", "invalid_request_error"),
    402: ("Insufficient Balance", "unknown_error", "invalid_request_error"),
    422: ("Invalid Parameters", "invalid_request_error", "invalid_request_error"),
    429: ("Rate Limit Reached", "rate_limit_error", "rate_limit_exceeded"),
    500: ("Server Error", "server_error", "internal_error"),
    503: ("Server Overloaded", "server_error", "service_unavailable"),
}


class _Computed(enum.Enum):
    TOKEN = enum.auto()


COMPUTED: Final = _Computed.TOKEN
"""Default of `Reply.usage`: report `default_usage` (distinct from None, which sends none)."""


def _hello() -> list[str]:
    return ["Hello", " world"]


@dataclass
class Reply:
    """How the fake answers one chat or FIM request. Every field is optional.

    ``usage_placement`` (streaming only) reproduces the placements seen in the wild:

    - ``"last_chunk"`` (DeepSeek 2026): usage on the chunk whose ``finish_reason`` is set, whether
      or not ``stream_options.include_usage`` was sent; with ``include_usage: true`` every earlier
      chunk carries ``"usage": null``.
    - ``"separate_chunk"`` (OpenAI style): only with ``include_usage: true``, every choice chunk
      carries ``"usage": null`` and one extra chunk with ``"choices": []`` carries the usage just
      before ``[DONE]``; without it, no usage at all.
    - ``"null_chunks_then_separate"``: every choice chunk has ``"usage": null`` and the separate
      usage chunk is sent even without ``include_usage``.
    - ``"twice"`` (a malformed upstream): usage on the last choice chunk and a separate usage
      chunk carrying `conflicting_usage` of it.

    ``cut_after_events`` counts every ``data:`` event (the role chunk included, ``[DONE]`` never
    sent); for ``raw_events`` it counts list items; for a non-streaming reply any value cuts the
    connection after half the JSON body. A cut request lands in `FakeDeepSeek.cut`.

    Keep-alives (``keepalive``) precede the body in every case, ``raw_body``/``raw_events``
    included; they only replace what the fake would have generated after them.
    """

    status: int = 200
    error_body: bytes | None = None
    content: list[str] = field(default_factory=_hello)
    reasoning: list[str] = field(default_factory=list)
    usage: dict[str, Any] | _Computed | None = COMPUTED
    usage_placement: UsagePlacement = "last_chunk"
    keepalive: int = 0
    keepalive_interval: float = 0.0
    chunk_interval: float = 0.0
    line_ending: str = "\n"
    cut_after_events: int | None = None
    finish_reason: str = "stop"
    headers: dict[str, str] = field(default_factory=dict)
    server_tool_use: dict[str, Any] | None = None
    redirect_to: str | None = None
    raw_body: bytes | None = None
    raw_events: list[bytes] | None = None

    def __post_init__(self) -> None:
        # A typo here would silently test the wrong placement; fail where the Reply is built.
        if self.usage_placement not in USAGE_PLACEMENTS:
            raise ValueError(f"usage_placement must be one of {USAGE_PLACEMENTS}, "
                             f"not {self.usage_placement!r}")
        if self.line_ending not in ("\n", "\r\n"):
            raise ValueError(f"line_ending must be '\\n' or '\\r\\n', not {self.line_ending!r}")


@dataclass
class RecordedRequest:
    """One request as the fake received it; ``id`` is the completion id it answered with (every
    request gets one, so `FakeDeepSeek.finished`/``disconnects`` can name any request)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    id: str


# --- pure helpers: what the fake reports, computable by tests ------------------------------------

def _is_fim(request_json: dict[str, Any]) -> bool:
    return "messages" not in request_json and "prompt" in request_json


def _text_length(content: Any) -> int:
    """Characters of a message ``content``: a string, or OpenAI-style parts with ``text``."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part["text"]) for part in content
                   if isinstance(part, dict) and isinstance(part.get("text"), str))
    return 0


def default_usage(request_json: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """The usage the fake reports when `Reply.usage` is not given.

    - ``prompt_tokens``: characters of all message contents (chat) or of ``prompt`` (FIM),
      divided by 4, plus 1 - a stand-in for a tokenizer that is deterministic and grows with input.
    - cache hit: half the prompt rounded down to a multiple of 64 (DeepSeek caches in 64-token
      units), so prompts under 256 tokens never hit; miss is the rest.
    - ``completion_tokens``: one token per content piece plus one per reasoning piece (FIM sends
      no reasoning, so counts only content); ``completion_tokens_details.reasoning_tokens`` is the
      reasoning pieces, included in ``completion_tokens`` as DeepSeek does, and omitted when zero.
    - ``server_tool_use`` is `Reply.server_tool_use`, when given.
    """
    fim = _is_fim(request_json)
    if fim:
        chars = _text_length(request_json.get("prompt"))
    else:
        chars = sum(_text_length(message.get("content"))
                    for message in request_json.get("messages", []) if isinstance(message, dict))
    prompt = chars // 4 + 1
    hit = prompt // 2 // CACHE_UNIT * CACHE_UNIT
    reasoning = 0 if fim else len(reply.reasoning)
    completion = len(reply.content) + reasoning
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": hit},
        "prompt_cache_hit_tokens": hit,
        "prompt_cache_miss_tokens": prompt - hit,
    }
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    if reply.server_tool_use is not None:
        usage["server_tool_use"] = dict(reply.server_tool_use)
    return usage


def reported_usage(request_json: dict[str, Any], reply: Reply) -> dict[str, Any] | None:
    """The usage object the fake sends for this request and reply (None: it sends none).

    An explicit `Reply.usage` is sent as given, with ``server_tool_use`` added when set."""
    if reply.usage is None:
        return None
    if reply.usage is COMPUTED:
        return default_usage(request_json, reply)
    usage = json.loads(json.dumps(reply.usage))  # deep copy: the Reply stays untouched
    if reply.server_tool_use is not None:
        usage["server_tool_use"] = dict(reply.server_tool_use)
    return usage  # type: ignore[no-any-return]


def conflicting_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The second usage of a ``"twice"`` stream: one more completion (and total) token, so a
    test can tell which of the two the proxy kept."""
    second = json.loads(json.dumps(usage))
    second["completion_tokens"] = second.get("completion_tokens", 0) + 1
    second["total_tokens"] = second.get("total_tokens", 0) + 1
    return second  # type: ignore[no-any-return]


def error_body(status: int, *, message: str | None = None, key: str = "") -> bytes:
    """A DeepSeek-shaped error body; for 401 the message echoes the last 4 characters of
    ``key``, as DeepSeek does."""
    default_message, kind, code = _ERRORS.get(status, ("", "unknown_error",
                                                       "invalid_request_error"))
    if message is None:
        if status == 401:
            message = f"Authentication Fails, Your api key: ****{key[-4:]} is invalid"
        elif default_message:
            message = default_message
        else:
            try:
                message = HTTPStatus(status).phrase
            except ValueError:
                message = "Error"
    return _dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def stream_chunks(*, completion_id: str, created: int, model: str, reply: Reply,
                  usage: dict[str, Any] | None, include_usage: bool,
                  fim: bool) -> list[dict[str, Any]]:
    """Every chunk of a generated stream, in order (``[DONE]`` not included).

    Chat: a role chunk, one chunk per reasoning piece, one per content piece, then the finish
    chunk (``delta: {"content": ""}`` and the finish reason). FIM: one ``text`` chunk per content
    piece, then a finish chunk with empty text. Usage placement as documented on `Reply`."""
    kind = "text_completion" if fim else "chat.completion.chunk"

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": completion_id, "object": kind, "created": created, "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}

    def choice(piece: str | dict[str, Any], finish: str | None) -> dict[str, Any]:
        if fim:
            return {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}

    chunks: list[dict[str, Any]] = []
    if fim:
        chunks.extend(chunk([choice(piece, None)]) for piece in reply.content)
        final = chunk([choice("", reply.finish_reason)])
    else:
        chunks.append(chunk([choice({"role": "assistant", "content": ""}, None)]))
        chunks.extend(chunk([choice({"reasoning_content": piece, "content": None}, None)])
                      for piece in reply.reasoning)
        chunks.extend(chunk([choice({"content": piece}, None)]) for piece in reply.content)
        final = chunk([choice({"content": ""}, reply.finish_reason)])

    placement = reply.usage_placement
    nulls = include_usage or placement == "null_chunks_then_separate"
    if nulls:
        for earlier in chunks:
            earlier["usage"] = None
    if placement in ("last_chunk", "twice"):
        if usage is not None or nulls:
            final["usage"] = usage
    elif nulls:
        final["usage"] = None
    chunks.append(final)

    if usage is not None:
        if placement == "twice":
            chunks.append({**chunk([]), "usage": conflicting_usage(usage)})
        elif placement == "null_chunks_then_separate" or (
                placement == "separate_chunk" and include_usage):
            chunks.append({**chunk([]), "usage": usage})
    return chunks


def completion_body(*, completion_id: str, created: int, model: str, reply: Reply,
                    usage: dict[str, Any] | None, fim: bool) -> dict[str, Any]:
    """The JSON document of a non-streaming completion (no ``usage`` key when usage is None)."""
    content = "".join(reply.content)
    choice: dict[str, Any]
    if fim:
        choice = {"text": content, "index": 0, "logprobs": None,
                  "finish_reason": reply.finish_reason}
    else:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reply.reasoning:
            message["reasoning_content"] = "".join(reply.reasoning)
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": reply.finish_reason}
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion" if fim else "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _parse_json(body: bytes) -> Any | None:
    try:
        return json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


# --- the server ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Write:
    """One write of a response body, after a pause (the fake's pacing, never a test's wait)."""

    delay: float
    data: bytes


class _Rejected(Exception):
    """A request stopped before it reached the reply queue; carries the error response."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


_Handler = Callable[[web.Request, RecordedRequest], Awaitable[web.StreamResponse]]


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
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._base_url: str | None = None
        self._routes: dict[tuple[str, str], _Handler] = {
            ("POST", "/chat/completions"): self._chat,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/beta/chat/completions"): self._chat,
            ("POST", "/beta/completions"): self._fim,
            ("GET", "/models"): self._models,
            ("GET", "/v1/models"): self._models,
            ("GET", "/user/balance"): self._balance,
            ("GET", "/v1/user/balance"): self._balance,
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
        record = RecordedRequest(method=request.method, path=request.path,
                                 headers={str(name): value for name, value in
                                          request.headers.items()},
                                 body=body, json=_parse_json(body), id=str(uuid.uuid4()))
        self.requests.append(record)
        try:
            route = self._routes.get((request.method, request.path))
            if route is None:
                raise _Rejected(404, error_body(404, message=f"Not Found: {request.path}"))
            authorization = request.headers.get("Authorization", "")
            if authorization != f"Bearer {FAKE_UPSTREAM_KEY}":
                key = authorization.removeprefix("Bearer ").strip()
                raise _Rejected(401, error_body(401, key=key))
            return await route(request, record)
        except _Rejected as rejected:
            return await self._send_error(request, record, rejected.status, rejected.body, {})

    async def _chat(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        return await self._completion(request, record, fim=False)

    async def _fim(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        return await self._completion(request, record, fim=True)

    async def _models(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        return await self._send_json(request, record, MODELS)

    async def _balance(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        return await self._send_json(request, record, BALANCE)

    async def _completion(self, request: web.Request, record: RecordedRequest, *,
                          fim: bool) -> web.StreamResponse:
        data = _validate(record.json, fim=fim)
        stream = data.get("stream") is True
        options = data.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        reply = self._queue.popleft() if self._queue else Reply()

        if reply.redirect_to is not None:
            headers = {**reply.headers, "Location": reply.redirect_to}
            return await self._send_error(request, record, 307, b"", headers)
        if reply.status >= 400:
            authorization = request.headers.get("Authorization", "")
            body = reply.error_body if reply.error_body is not None else error_body(
                reply.status, key=authorization.removeprefix("Bearer ").strip())
            return await self._send_error(request, record, reply.status, body, reply.headers)

        created = int(time.time())
        model = str(data["model"])
        usage = reported_usage(data, reply)
        response = web.StreamResponse(status=reply.status, headers=_trace_headers(reply.headers))
        ending = reply.line_ending.encode()
        writes: list[_Write] = []
        if stream:
            response.headers["Content-Type"] = "text/event-stream; charset=utf-8"
            response.headers["Cache-Control"] = "no-cache"
            writes += _keepalives(reply, b": keep-alive" + ending * 2)
            if reply.raw_events is not None:
                events = list(reply.raw_events)
            else:
                chunks = stream_chunks(completion_id=record.id, created=created, model=model,
                                       reply=reply, usage=usage, include_usage=include_usage,
                                       fim=fim)
                events = [b"data: " + _dumps(chunk) + ending * 2 for chunk in chunks]
            cut_at = None
            if reply.cut_after_events is not None:
                cut_at = len(writes) + min(reply.cut_after_events, len(events))
            elif reply.raw_events is None:
                events.append(b"data: [DONE]" + ending * 2)
            first_delay = reply.keepalive_interval if reply.keepalive else 0.0
            writes += [_Write(first_delay if index == 0 else reply.chunk_interval, event)
                       for index, event in enumerate(events)]
        else:
            response.headers["Content-Type"] = "application/json"
            writes += _keepalives(reply, b"\n")
            document = reply.raw_body if reply.raw_body is not None else _dumps(
                completion_body(completion_id=record.id, created=created, model=model,
                                reply=reply, usage=usage, fim=fim))
            first_delay = reply.keepalive_interval if reply.keepalive else 0.0
            cut_at = None
            if reply.cut_after_events is not None:
                document = document[:len(document) // 2]
                cut_at = len(writes) + 1
            writes.append(_Write(first_delay, document))
        return await self._send(request, record, response, writes, cut_at)

    # --- sending, with disconnect tracking -----------------------------------------------------

    async def _send_json(self, request: web.Request, record: RecordedRequest,
                         value: Any) -> web.StreamResponse:
        response = web.Response(body=_dumps(value), content_type="application/json",
                                headers=_trace_headers({}))
        return await self._send(request, record, response, [], None)

    async def _send_error(self, request: web.Request, record: RecordedRequest, status: int,
                          body: bytes, headers: dict[str, str]) -> web.StreamResponse:
        response = web.Response(status=status, body=body, headers=_trace_headers(headers))
        if body:
            response.content_type = "application/json"
        return await self._send(request, record, response, [], None)

    async def _send(self, request: web.Request, record: RecordedRequest,
                    response: web.StreamResponse, writes: list[_Write],
                    cut_at: int | None) -> web.StreamResponse:
        """Send headers, then each write in turn; record how it ended.

        aiohttp (3.9+, ``handler_cancellation=False``) does not cancel a handler when its client
        goes away: the next write raises ConnectionResetError (aiohttp's
        ClientConnectionResetError subclasses it). CancelledError still comes if the handler is
        cancelled, e.g. by `close` during a slow stream; both count as disconnects.
        """
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
        raise _Rejected(400, error_body(400, message="Invalid Format: the body is not a JSON "
                                                     "object"))
    for name in ("model", "prompt") if fim else ("model", "messages"):
        if name not in body:
            raise _Rejected(422, error_body(422, message=f"Invalid Parameters: missing field "
                                                         f"`{name}`"))
    # DeepSeek 2026 rejects stream_options on a non-streaming request (null counts as absent).
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise _Rejected(400, error_body(400, message="Invalid Format: stream_options should be "
                                                     "set along with stream = true"))
    if body["model"] == NONEXISTENT_MODEL:
        raise _Rejected(400, error_body(400, message="Model Not Exist"))
    return body


def _keepalives(reply: Reply, line: bytes) -> list[_Write]:
    return [_Write(reply.keepalive_interval if index else 0.0, line)
            for index in range(reply.keepalive)]


def _trace_headers(extra: dict[str, str]) -> dict[str, str]:
    """DeepSeek's trace id header (it sends no x-request-id), then the Reply's extra headers."""
    return {"x-ds-trace-id": uuid.uuid4().hex, **extra}


@contextlib.asynccontextmanager
async def running_fake() -> AsyncIterator[FakeDeepSeek]:
    """A started `FakeDeepSeek`, closed on exit."""
    fake = FakeDeepSeek()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
