"""A fast fake DeepSeek for benchmarks: ``python -m bench.upstream --port P [--reuse-port]``.

On a 2-core machine the fake upstream, the load generator and the server under test share the
CPU, so every microsecond the fake spends is taken from the thing being measured. It is therefore
a raw `asyncio.Protocol` speaking just enough HTTP/1.1 (keep-alive, ``Content-Length`` request
bodies, chunked streaming responses) rather than an aiohttp app, and it caches each distinct
answer by request body: a benchmark sends the same few bodies over and over. (The faithful fake,
with every DeepSeek quirk, is ``tests/support/fake_deepseek.py``; this one only needs the shapes the
proxy meters.)

What a request controls, all in its JSON body:

- ``stream``: ``true`` for an SSE stream, else one ``chat.completion`` JSON document.
- ``max_tokens``: how many content chunks a stream has (default 16, at most 100,000); the stream
  is a role chunk, that many content chunks, a finish chunk with ``usage``, and ``data: [DONE]``.
- ``stream_options.include_usage``: as DeepSeek (2026) does, every chunk before the finish chunk
  then carries ``"usage": null`` (the proxy always asks for it, so this is what it really sees).
- ``bench_chunk_delay_ms``: sleep between stream chunks (holds many streams open cheaply), and
  ``bench_burst``: how many chunks go back to back between two sleeps (default 1). The first
  chunk always goes out with the headers. Pacing matters on a shared machine: a stream sent in
  one burst keeps this process busy for its whole length, and the load generator sharing its
  core cannot read the first chunk until the burst is over.
- ``bench_response_bytes``: pad a non-streaming answer's content to about this many bytes (the
  1 MB response case).

A POST to a path ending in ``/messages`` (``/anthropic/v1/messages``) is answered in DeepSeek's
Anthropic format instead, with the same controls: ``max_tokens`` text deltas between
``message_start`` (the input side of the usage), ``content_block_start`` and a ``ping``, and
``content_block_stop``, ``message_delta`` (the cumulative ``output_tokens``) and
``message_stop``; each event is ``event: NAME`` and ``data: {...}``.

Usage always has ``prompt_tokens``, ``completion_tokens``, ``prompt_cache_hit_tokens`` and
``prompt_cache_miss_tokens``. Several processes can share one port with ``--reuse-port``
(SO_REUSEPORT), should one process become the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

MODEL = "deepseek-flash"
SYSTEM_FINGERPRINT = "fp_bench_0000"
MAX_CHUNKS = 100_000
MAX_RESPONSE_BYTES = 64 * 2**20
MAX_DELAY_S = 10.0
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 2**20
_CACHE_LIMIT = 256
_HIGH_WATER = 256 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """Everything sent for one kind of request, pre-rendered once (see `plan`)."""

    head: bytes
    chunks: tuple[bytes, ...]
    """Stream events, each already framed as one HTTP chunk; empty for a JSON answer."""
    delay: float
    burst: int


def _usage(prompt: int, completion: int) -> dict[str, int]:
    hit = prompt // 2 // 64 * 64  # DeepSeek caches prefixes in 64-token units
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_cache_hit_tokens": hit,
        "prompt_cache_miss_tokens": prompt - hit,
    }


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _filler(size: int) -> str:
    """Text that costs a JSON parser what real prose does: escapes and non-ASCII included."""
    unit = 'The "quick" brown fox\njumps over 懒狗 - naïve café. '
    return (unit * (size // len(unit.encode()) + 1))[: max(size, 0)]


def _prompt_tokens(request: dict[str, Any]) -> int:
    messages = request.get("messages")
    chars = (
        sum(
            len(m["content"])
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
        if isinstance(messages, list)
        else 0
    )
    return chars // 4 + 100


def _int(value: Any, default: int, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return default
    return min(int(value), limit)


def plan(request: dict[str, Any]) -> Answer:
    """The answer to one completion request body (a pure function of the body)."""
    prompt = _prompt_tokens(request)
    common = {
        "id": "bench-0001",
        "created": 1_764_000_000,
        "model": MODEL,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if request.get("stream") is not True:
        content = _filler(_int(request.get("bench_response_bytes"), 0, MAX_RESPONSE_BYTES))
        body = _dumps(
            {
                **common,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content or "Hello world"},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(prompt, 2),
            }
        )
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"x-ds-trace-id: bench-trace\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        return Answer(head + body, (), 0.0, 1)
    count = _int(request.get("max_tokens"), 16, MAX_CHUNKS)
    options = request.get("stream_options")
    nulls = isinstance(options, dict) and options.get("include_usage") is True

    def chunk(delta: dict[str, str], finish: str | None, usage: Any = None) -> bytes:
        event: dict[str, Any] = {
            **common,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if nulls or usage is not None:
            event["usage"] = usage
        data = b"data: " + _dumps(event) + b"\n\n"
        return b"%x\r\n%s\r\n" % (len(data), data)

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events.extend(chunk({"content": f" tok{i}"}, None) for i in range(count))
    events.append(chunk({"content": ""}, "stop", _usage(prompt, count)))
    done = b"data: [DONE]\n\n"
    events.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    return _stream(request, events)


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nx-ds-trace-id: bench-trace\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _stream(request: dict[str, Any], events: list[bytes]) -> Answer:
    """A chunked SSE answer of `events`, paced as the request's ``bench_*`` fields say."""
    delay = _int(request.get("bench_chunk_delay_ms"), 0, int(MAX_DELAY_S * 1000)) / 1000
    burst = _int(request.get("bench_burst"), 1, MAX_CHUNKS) or 1
    return Answer(_STREAM_HEAD, tuple(events), delay, burst)


ANTHROPIC_FRAME_EVENTS = 6
"""Events of an Anthropic stream besides its text deltas (start, block start, ping, block stop,
message delta, stop)."""


def plan_anthropic(request: dict[str, Any]) -> Answer:
    """The Anthropic-format answer to one request body (a pure function of the body)."""
    prompt = _prompt_tokens(request)
    hit = prompt // 2 // 64 * 64
    usage = {"input_tokens": prompt - hit, "cache_read_input_tokens": hit, "output_tokens": 1}
    usage["cache_creation_input_tokens"] = 0
    message: dict[str, Any] = {
        "id": "msg_bench0001",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    count = _int(request.get("max_tokens"), 16, MAX_CHUNKS)
    if request.get("stream") is not True:
        whole = {**message, "content": [{"type": "text", "text": "Hello world"}]}
        body = _dumps({**whole, "stop_reason": "end_turn", "usage": {**usage, "output_tokens": 2}})
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"x-ds-trace-id: bench-trace\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        return Answer(head + body, (), 0.0, 1)

    def event(name: str, data: dict[str, Any]) -> bytes:
        framed = b"event: %s\ndata: %s\n\n" % (name.encode(), _dumps({"type": name, **data}))
        return b"%x\r\n%s\r\n" % (len(framed), framed)

    events = [
        event("message_start", {"message": message}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        event("ping", {}),
    ]
    events.extend(
        event(
            "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": f" tok{i}"}}
        )
        for i in range(count)
    )
    events.append(event("content_block_stop", {"index": 0}))
    events.append(
        event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": count},
            },
        )
    )
    events.append(event("message_stop", {}) + b"0\r\n\r\n")
    return _stream(request, events)


def _simple(status: str, body: bytes, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status.encode(),
        len(body),
        extra,
        body,
    )


class Server:
    """Shared state of one process: the answer cache and the running stream tasks."""

    def __init__(self) -> None:
        self.cache: dict[tuple[bool, bytes], Answer] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def answer(self, body: bytes, anthropic: bool = False) -> Answer | None:
        found = self.cache.get((anthropic, body))
        if found is None:
            try:
                request = json.loads(body)
            except ValueError:
                return None
            if not isinstance(request, dict):
                return None
            found = plan_anthropic(request) if anthropic else plan(request)
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache.clear()
            self.cache[(anthropic, body)] = found
        return found

    def spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self.tasks.add(task)  # referenced until done, so it cannot be collected mid-stream
        task.add_done_callback(self.tasks.discard)


class Connection(asyncio.Protocol):
    """One client connection: parse requests in order, answer each before reading the next."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()  # release a stream waiting on flow control; it sees `closed`

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        """Answer every complete request in the buffer; stop at a stream until it ends."""
        transport = self.transport
        assert transport is not None
        while not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEADER_BYTES:
                    self.fail("431 Request Header Fields Too Large")
                return
            lines = bytes(self.buffer[:end]).split(b"\r\n")
            method, _, rest = lines[0].partition(b" ")
            path = rest.partition(b" ")[0]
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    if not value.strip().isdigit():
                        self.fail("400 Bad Request")
                        return
                    length = int(value)
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
                elif name == b"transfer-encoding":
                    self.fail("501 Not Implemented")  # clients here always send a length
                    return
            if length > MAX_BODY_BYTES:
                self.fail("413 Payload Too Large")
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            if not self.respond(method, path, body, close):
                return

    def respond(self, method: bytes, path: bytes, body: bytes, close: bool) -> bool:
        """Send one answer; False when the connection is busy streaming or closing."""
        transport = self.transport
        assert transport is not None
        if method == b"GET" and path == b"/healthz":
            transport.write(_simple("200 OK", b'{"status":"ok"}'))
        elif method == b"POST" and path.endswith((b"/completions", b"/messages")):
            answer = self.server.answer(body, anthropic=path.endswith(b"/messages"))
            if answer is None:
                transport.write(_simple("400 Bad Request", b'{"error":"bad json"}'))
            elif answer.chunks:
                self.busy = True
                self.server.spawn(self.stream(answer, close))
                return False
            else:
                transport.write(answer.head)
        else:
            transport.write(_simple("404 Not Found", b'{"error":"no route"}'))
        if close:
            transport.close()
            return False
        return True

    async def stream(self, answer: Answer, close: bool) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(answer.head + answer.chunks[0])
        for index, event in enumerate(answer.chunks[1:]):
            if answer.delay and index % answer.burst == 0:
                await asyncio.sleep(answer.delay)
            else:
                await asyncio.sleep(0)  # one event per write, interleaved with other streams
            if not self.writable.is_set():
                await self.writable.wait()
            if self.closed:
                return
            transport.write(event)
        self.busy = False
        if close:
            transport.close()
        elif self.buffer:
            self.process()

    def fail(self, status: str) -> None:
        assert self.transport is not None
        self.transport.write(_simple(status, b'{"error":"unsupported"}', close=True))
        self.transport.close()
        self.closed = True


async def serve(host: str, port: int, reuse_port: bool) -> None:
    """Serve until SIGTERM or SIGINT; streams still running are cancelled."""
    loop = asyncio.get_running_loop()
    server = Server()
    listener = await loop.create_server(
        lambda: Connection(server), host, port, reuse_port=reuse_port, backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()
        for task in list(server.tasks):
            task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT, so several processes can share the port",
    )
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.reuse_port))


if __name__ == "__main__":
    main()
