"""Bytes, errors, cuts, disconnects and timeouts through the proxy, with raw HTTP clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import openai
import pytest

from proxy.pricing import PriceBook
from proxy.records import LogSink
from proxy.relay.deadline import Deadline
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY, Reply
from tests.support.proxy_harness import TEAM_KEYS, RunningProxy, StartProxy, running_proxy
from tests.support.requests import AUTH, CHAT, SMALL_USAGE, STREAM


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk(
    content: str | None,
    finish: str | None = None,
    usage: object = None,
    with_usage_key: bool = False,
) -> dict[str, object]:
    body: dict[str, object] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-flash",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    if usage is not None or with_usage_key:
        body["usage"] = usage
    return body


@pytest.fixture
async def http(proxy: RunningProxy) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH, timeout=10) as client:
        yield client


async def test_stream_bytes_are_relayed_exactly(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    events = [
        b": keep-alive\r\n\r\n",
        b": keep-alive\r\n\r\n",
        sse(chunk("Hi")).replace(b"\n", b"\r\n"),
        sse(chunk("", "stop", SMALL_USAGE)).replace(b"\n", b"\r\n"),
        b"data: [DONE]\r\n\r\n",
    ]
    fake.enqueue(Reply(raw_events=events))
    async with http.stream("POST", "/chat/completions", json=STREAM) as response:
        body = await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "x-ds-trace-id" in response.headers
        assert len(response.headers["x-request-id"]) == 32
    assert body == b"".join(events)
    [record] = await proxy.sink.wait_for(1)
    assert (record.cache_hit_tokens, record.cache_miss_tokens, record.output_tokens) == (64, 36, 7)
    assert record.costs["CNY"] == Decimal("0.00013056")  # 64x0.04 + 36x2 + 7x8 per million


async def test_usage_only_chunk_dropped_only_when_not_asked(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    usage_chunk = sse(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "deepseek-flash",
            "choices": [],
            "usage": SMALL_USAGE,
        }
    )
    events = [
        sse(chunk("Hi", with_usage_key=True)),
        sse(chunk("", "stop", with_usage_key=True)),
        usage_chunk,
        b"data: [DONE]\n\n",
    ]
    fake.enqueue(Reply(raw_events=events), Reply(raw_events=events))
    asked = await http.post(
        "/chat/completions", json={**STREAM, "stream_options": {"include_usage": True}}
    )
    not_asked = await http.post("/chat/completions", json=STREAM)
    assert asked.content == b"".join(events)
    assert not_asked.content == b"".join(e for e in events if e != usage_chunk)
    records = await proxy.sink.wait_for(2)
    assert [r.output_tokens for r in records] == [7, 7]


async def test_blank_keepalive_lines_reach_the_client_before_the_body(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(keepalive=3, keepalive_interval=0.3, usage=SMALL_USAGE))
    async with http.stream("POST", "/chat/completions", json=CHAT) as response:
        raw = response.aiter_raw()
        first = await anext(raw)
        assert first.strip() == b"" and first  # a blank line, while DeepSeek still queues
        assert fake.finished == []
        rest = first + b"".join([part async for part in raw])
    assert rest.startswith(b"\n\n\n{")
    assert json.loads(rest)["usage"] == SMALL_USAGE
    [record] = await proxy.sink.wait_for(1)
    assert record.outcome == "complete"
    assert record.first_byte_at is not None


@pytest.mark.parametrize("status", [400, 402, 422, 429, 500, 503])
async def test_upstream_errors_pass_through(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient, status: int
) -> None:
    fake.enqueue(Reply(status=status))
    direct = await _direct(fake, status)
    response = await http.post("/chat/completions", json=CHAT)
    assert response.status_code == status
    assert response.json() == direct
    assert response.headers.get("x-should-retry") == ("false" if status == 402 else None)
    [record] = await proxy.sink.wait_for(1)
    assert (record.outcome, record.usage_source, record.upstream_status) == (
        "upstream_error",
        "none",
        status,
    )
    assert not record.priced and dict(record.costs) == {}
    assert record.unpriced_reason == "nothing billable: upstream_error"


async def _direct(fake: FakeDeepSeek, status: int) -> object:
    fake.enqueue(Reply(status=status))
    async with httpx.AsyncClient() as client:
        response = await client.post(
            fake.base_url + "/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {FAKE_UPSTREAM_KEY}"},
        )
    fake.requests.clear()
    return response.json()


async def test_upstream_401_never_echoes_the_key(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    wrong_key = "sk-wrong-company-key-9z9z"
    proxy = await start_proxy(api_key=wrong_key)
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        response = await http.post("/chat/completions", json=CHAT)
    assert response.status_code == 401
    assert "9z9z" not in response.text and wrong_key not in response.text
    assert response.json()["error"]["message"].startswith("Authentication Fails")


async def test_sdk_sees_proxy_errors_in_openai_shape(
    proxy: RunningProxy, fake: FakeDeepSeek
) -> None:
    async with openai.AsyncOpenAI(
        base_url=proxy.url, api_key="sk-unknown", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="deepseek-flash", messages=[])
    assert info.value.status_code == 401
    assert info.value.body == {
        "message": "missing or unknown API key; pass your proxy key as "
        "'Authorization: Bearer <key>'",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert fake.requests == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v2/chat/completions", 404),
        ("GET", "/user/balance", 404),
        ("POST", "/completions", 404),
        ("GET", "/chat/completions", 405),
        ("POST", "/chat/completions/../../admin", 404),
        ("GET", "/%2e%2e/models", 404),
    ],
)
async def test_unknown_routes_never_reach_upstream(
    fake: FakeDeepSeek, http: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    response = await http.request(method, path, json=CHAT)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert fake.requests == []


async def test_missing_key_on_every_api_route(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        for method, path in [
            ("POST", "/chat/completions"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/beta/chat/completions"),
            ("POST", "/beta/completions"),
            ("GET", "/models"),
            ("GET", "/v1/models"),
            ("GET", "/spend"),
            ("GET", "/v1/spend"),
        ]:
            response = await http.request(method, path, json=CHAT)
            assert response.status_code == 401, path
        health = await http.get("/healthz")
    assert health.json() == {"status": "ok"}
    assert fake.requests == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b'{"messages": []}', "'model' is required and must be a string"),
    ],
)
async def test_bad_requests_are_refused_locally(
    fake: FakeDeepSeek, http: httpx.AsyncClient, body: bytes, message: str
) -> None:
    response = await http.post("/chat/completions", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == message
    assert fake.requests == []


async def test_oversized_body_is_413_without_upstream(
    fake: FakeDeepSeek, http: httpx.AsyncClient
) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    response = await http.post("/chat/completions", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert fake.requests == []


async def test_client_key_and_hop_by_hop_headers_never_go_upstream(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(usage=SMALL_USAGE))
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic eA==",
        "X-Forwarded-Host": "evil",
        "X-Custom": "kept",
    }
    response = await http.post("/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 200
    sent = {k.lower(): v for k, v in fake.requests[0].headers.items()}
    assert sent["authorization"] == f"Bearer {FAKE_UPSTREAM_KEY}"
    assert TEAM_KEYS["alpha"] not in json.dumps(sent)
    for name in ("x-secret-hop", "te", "upgrade", "proxy-authorization", "x-forwarded-host"):
        assert name not in sent
    assert sent["x-custom"] == "kept"
    assert (
        "transfer-encoding" not in response.headers
        or response.headers["transfer-encoding"] == "chunked"
    )


async def test_cut_stream_gives_an_error_never_done(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    fake.enqueue(Reply(content=["a", "b", "c", "d", "e"], usage=SMALL_USAGE, cut_after_events=4))
    async with openai.AsyncOpenAI(
        base_url=proxy.url, api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as client:
        stream = await client.chat.completions.create(**STREAM)
        received = []
        with pytest.raises(openai.APIError) as info:
            async for part in stream:
                received.append(part)
    assert "closed the connection" in str(info.value.message)
    [record] = await proxy.sink.wait_for(1)
    assert (record.outcome, record.usage_source) == ("upstream_cut", "estimated")
    assert record.output_tokens == 4  # one per relayed content chunk (role chunk included)
    # "Say hello" -> 3 by the rule of thumb, plus 8 for its message in the chat template
    assert record.cache_miss_tokens == 11 and record.cache_hit_tokens == 0
    assert "usage_estimated" in record.flags
    assert record.priced and record.costs["CNY"] == Decimal("0.000054")  # 11x2 + 4x8 per M


async def test_cut_stream_raw_bytes_have_no_done(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(content=["a", "b"], cut_after_events=2))
    response = await http.post("/chat/completions", json=STREAM)
    assert b"[DONE]" not in response.content
    assert response.content.endswith(
        b'data: {"error":{"message":"DeepSeek closed the connection before the response was '
        b'complete","type":"upstream_error","param":null,"code":"upstream_cut"}}\n\n'
    )


async def test_cut_json_body_is_an_error_for_the_client(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(usage=SMALL_USAGE, cut_after_events=1))
    with pytest.raises(httpx.HTTPError):
        await http.post("/chat/completions", json=CHAT)
    [record] = await proxy.sink.wait_for(1)
    assert (record.outcome, record.usage_source) == ("upstream_cut", "estimated")


async def test_client_disconnect_keeps_reading_for_real_usage(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    fake.enqueue(
        Reply(content=[f"w{i}" for i in range(20)], usage=SMALL_USAGE, chunk_interval=0.02)
    )
    async with (
        httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http,
        http.stream("POST", "/chat/completions", json=STREAM) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                break  # the client leaves after the first event
    [record] = await proxy.sink.wait_for(1)
    assert (record.outcome, record.usage_source) == ("client_disconnected", "reported")
    assert (record.cache_hit_tokens, record.cache_miss_tokens, record.output_tokens) == (64, 36, 7)
    assert len(fake.finished) == 1 and fake.disconnects == []


async def test_connect_failure_is_502(book: PriceBook) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with (
        running_proxy(f"http://127.0.0.1:{port}", book) as proxy,
        httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http,
    ):
        response = await http.post("/chat/completions", json=CHAT)
        [record] = await proxy.sink.wait_for(1)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert (record.outcome, record.usage_source, record.upstream_status) == (
        "connect_error",
        "none",
        None,
    )


async def test_silent_upstream_is_504_without_retry(book: PriceBook) -> None:
    accepted, release = asyncio.Event(), asyncio.Event()

    async def blackhole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read(1 << 16)
        await release.wait()  # never answers while the test runs
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(blackhole, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            running_proxy(f"http://127.0.0.1:{port}", book, first_byte=0.3) as proxy,
            httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http,
        ):
            response = await http.post("/chat/completions", json=CHAT)
            [record] = await proxy.sink.wait_for(1)
    finally:
        release.set()
        server.close()
        await server.wait_closed()
    assert accepted.is_set()
    assert response.status_code == 504
    assert response.headers["x-should-retry"] == "false"
    assert (record.outcome, record.usage_source) == ("timeout", "estimated")


async def test_keepalive_comments_cannot_extend_the_wait(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    fake.enqueue(Reply(keepalive=10_000, keepalive_interval=0.01))
    proxy = await start_proxy(first_byte=0.5, idle=5)
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        response = await http.post("/chat/completions", json=STREAM)
        [record] = await proxy.sink.wait_for(1)
    assert response.content.startswith(b": keep-alive\n\n")
    assert b'"code":"upstream_cut"' in response.content and b"[DONE]" not in response.content
    assert record.outcome == "timeout"
    await fake.wait_for(lambda: len(fake.disconnects) == 1)


async def test_malformed_upstream_never_records_a_wrong_cost(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    fake.enqueue(
        Reply(raw_body=b"\n\n{this is not json"),
        Reply(usage={**SMALL_USAGE, "completion_tokens": -5}),
        Reply(usage={**SMALL_USAGE, "prompt_tokens": 10**12}),
        Reply(usage=SMALL_USAGE, usage_placement="twice"),
        Reply(
            raw_events=[
                sse(chunk("Hi")),
                b'data: {"usage": broken\n\n',
                sse(chunk("", "stop", SMALL_USAGE)),
                b"data: [DONE]\n\n",
            ]
        ),
    )
    for body in (CHAT, CHAT, CHAT, STREAM, STREAM):
        response = await http.post("/chat/completions", json=body)
        assert response.status_code == 200
    records = await proxy.sink.wait_for(5)
    bad_json, negative, huge, twice, broken_chunk = records
    assert (bad_json.outcome, bad_json.usage_source) == ("bad_response", "estimated")
    assert "unparseable_body" in bad_json.flags
    for record in (negative, huge):
        assert record.usage_source == "estimated" and "malformed_usage" in record.flags
        assert all(Decimal(0) <= cost < Decimal("0.01") for cost in record.costs.values())
    assert "usage_reported_twice" in twice.flags and twice.usage_source == "reported"
    assert broken_chunk.outcome == "complete" and "malformed_chunk" in broken_chunk.flags
    assert broken_chunk.output_tokens == 7


async def test_unpriced_and_mismatched_usage_are_flagged(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    fake.enqueue(
        Reply(usage=SMALL_USAGE), Reply(usage={**SMALL_USAGE, "prompt_cache_miss_tokens": 40})
    )
    await http.post("/chat/completions", json={**CHAT, "model": "deepseek-chat"})
    await http.post("/chat/completions", json=CHAT)
    retired, mismatch = await proxy.sink.wait_for(2)
    assert not retired.priced and dict(retired.costs) == {}
    assert retired.unpriced_reason == (
        "model 'deepseek-chat' was retired at "
        "2026-07-24T15:59:00Z: requests with this name fail "
        "upstream"
    )
    assert retired.usage_source == "reported"
    assert "prompt_tokens_mismatch" in mismatch.flags
    assert (mismatch.cache_hit_tokens, mismatch.cache_miss_tokens, mismatch.prompt_tokens) == (
        64,
        40,
        100,
    )


async def test_server_tool_calls_are_billed(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(usage=SMALL_USAGE, server_tool_use={"web_search_requests": 2}))
    await http.post("/chat/completions", json=CHAT)
    [record] = await proxy.sink.wait_for(1)
    assert dict(record.tool_calls) == {"search": 2}
    assert record.costs["CNY"] == Decimal("0.00013056") + Decimal("0.010")


async def test_upstream_redirect_is_never_followed(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    trap = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    trap_url = f"http://127.0.0.1:{trap.sockets[0].getsockname()[1]}/steal"
    fake.enqueue(Reply(redirect_to=trap_url))
    try:
        response = await http.post("/chat/completions", json=CHAT)
    finally:
        trap.close()
        await trap.wait_closed()
    assert response.status_code == 502
    assert "location" not in response.headers
    assert response.json()["error"]["code"] == "upstream_redirect"
    [record] = await proxy.sink.wait_for(1)
    assert (record.outcome, record.upstream_status) == ("upstream_error", 307)


async def test_rewritten_body_has_a_correct_content_length(
    fake: FakeDeepSeek, proxy: RunningProxy, http: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(usage=SMALL_USAGE))
    await http.post(
        "/chat/completions", json={**STREAM, "messages": [{"role": "user", "content": "héllo ☃"}]}
    )
    sent = fake.requests[0]
    assert int(sent.headers["Content-Length"]) == len(sent.body)
    assert sent.json["messages"][0]["content"] == "héllo ☃"
    assert sent.json["stream_options"] == {"include_usage": True}


async def test_usage_records_are_one_json_log_line_each(
    fake: FakeDeepSeek,
    proxy: RunningProxy,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.enqueue(Reply(usage=SMALL_USAGE))
    await http.post("/chat/completions", json=CHAT)
    [record] = await proxy.sink.wait_for(1)
    caplog.set_level("DEBUG", logger="proxy.usage")
    LogSink().submit(record)
    [line] = [r.getMessage() for r in caplog.records if r.name == "proxy.usage"]
    assert "\n" not in line
    logged = json.loads(line)
    assert logged["team"] == "alpha"
    assert logged["costs"] == {"CNY": "0.00013056", "USD": "0.000019584"}
    assert logged["started_at"] == "2026-11-02T01:30:00Z"
    assert logged["request_id"] == record.request_id
    assert TEAM_KEYS["alpha"] not in line and FAKE_UPSTREAM_KEY not in line


async def test_hop_by_hop_headers_from_upstream_are_dropped(
    fake: FakeDeepSeek, http: httpx.AsyncClient
) -> None:
    fake.enqueue(
        Reply(
            usage=SMALL_USAGE,
            headers={
                "Connection": "X-Upstream-Hop",
                "X-Upstream-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "Upgrade": "h2c",
                "X-Kept": "yes",
            },
        )
    )
    response = await http.post("/chat/completions", json=CHAT)
    assert response.status_code == 200
    for name in ("x-upstream-hop", "keep-alive", "proxy-authenticate", "upgrade"):
        assert name not in response.headers
    assert response.headers["x-kept"] == "yes"
    assert "x-ds-trace-id" in response.headers


async def test_deadline_tells_its_cancellation_from_others() -> None:
    """`Deadline` (the exchange's first-byte and total deadline) follows asyncio.timeout's
    rules: its own expiry is a timeout, a cancel from elsewhere stays a cancellation, and
    it leaves the task's cancel count as it found it."""
    loop = asyncio.get_running_loop()

    async def expires() -> str:
        deadline = Deadline(loop, loop.time() - 1)  # already due: fires on the next turn
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "timeout" if deadline.took_effect() else "cancelled"
        finally:
            deadline.close()
        return "finished"

    assert await asyncio.create_task(expires()) == "timeout"

    started = asyncio.Event()

    async def cancelled_elsewhere() -> str:
        deadline = Deadline(loop, loop.time() + 3600)
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            assert not deadline.took_effect()
            raise
        finally:
            deadline.close()
        return "finished"

    task = asyncio.create_task(cancelled_elsewhere())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def moved_then_finished() -> int:
        deadline = Deadline(loop, loop.time() - 1)
        deadline.reschedule(loop.time() + 3600)  # lifted before it could fire
        await asyncio.sleep(0)  # one turn of the loop: the old timer would have fired here
        deadline.close()
        current = asyncio.current_task()
        assert current is not None
        return current.cancelling()

    assert await asyncio.create_task(moved_then_finished()) == 0
