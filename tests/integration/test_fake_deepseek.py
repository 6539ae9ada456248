"""The fake DeepSeek, exercised directly with httpx and the real openai SDK.

The proxy's integration tests are only as good as this fake: if it drifted from DeepSeek (usage on
the wrong chunk, keep-alives in the wrong place, a cut that still ends the chunked body), the
proxy could pass against it and fail in production. Raw bytes are checked with httpx; the openai
SDK confirms that what the fake sends is something a real client accepts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.fake_clients import LONG_PROMPT, chat, data_events, stream_chunks_of
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import (
    FAKE_UPSTREAM_KEY,
    SYSTEM_FINGERPRINT,
    Reply,
    UsagePlacement,
    conflicting_usage,
    default_usage,
    within_max_tokens,
)

# --- pure helpers ------------------------------------------------------------------------------


def test_default_usage_counts_characters_pieces_and_64_token_cache_units() -> None:
    usage = default_usage(chat(), Reply(content=["a", "b"], reasoning=["r1", "r2", "r3"]))
    assert usage == {
        "prompt_tokens": 251,
        "completion_tokens": 5,
        "total_tokens": 256,
        "prompt_tokens_details": {"cached_tokens": 64},
        "prompt_cache_hit_tokens": 64,
        "prompt_cache_miss_tokens": 187,
        "completion_tokens_details": {"reasoning_tokens": 3},
    }


def test_default_usage_small_prompt_parts_fim_and_tools() -> None:
    parts = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "abcd"},
            {"role": "user", "content": [{"type": "text", "text": "efgh"}, {"type": "image_url"}]},
            {"role": "assistant", "content": None},
        ],
    }
    usage = default_usage(parts, Reply())
    assert (usage["prompt_tokens"], usage["prompt_cache_hit_tokens"]) == (3, 0)
    assert "completion_tokens_details" not in usage

    fim = default_usage(
        {"model": "m", "prompt": "p" * 4000},
        Reply(content=["x"], reasoning=["ignored"], server_tool_use={"n": 1}),
    )
    assert fim["prompt_tokens"] == 1001
    assert fim["prompt_cache_hit_tokens"] == 448  # 500 rounded down to 64s
    assert fim["completion_tokens"] == 1
    assert fim["server_tool_use"] == {"n": 1}


def test_default_usage_bills_tool_schemas_and_tool_calls() -> None:
    """DeepSeek bills what it renders into the prompt, not only message text."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "y" * 40}}}]
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    request = {
        "model": "m",
        "tools": tools,
        "response_format": {"type": "json_object"},
        "messages": [
            {"role": "user", "content": "abcd"},
            {"role": "assistant", "content": None, "tool_calls": calls},
        ],
    }
    chars = 4 + sum(
        len(json.dumps(part, separators=(",", ":")))
        for part in (tools, {"type": "json_object"}, calls)
    )
    assert default_usage(request, Reply())["prompt_tokens"] == chars // 4 + 1


def test_generation_stops_at_max_tokens() -> None:
    reply = Reply(content=["a", "b", "c"], reasoning=["r1", "r2"])
    cut = within_max_tokens({"max_tokens": 3}, reply)
    assert (cut.reasoning, cut.content, cut.finish_reason) == (["r1", "r2"], ["a"], "length")
    assert default_usage({"messages": []}, cut)["completion_tokens"] == 3
    assert within_max_tokens({"max_tokens": 5}, reply) is reply
    assert within_max_tokens({"max_tokens": 1}, Reply(usage={"x": 1})).content == [
        "Hello",
        " world",
    ]


def test_reply_rejects_typos_early() -> None:
    with pytest.raises(ValueError, match="usage_placement"):
        Reply(usage_placement="last")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="line_ending"):
        Reply(line_ending="\r")


# --- non-streaming -----------------------------------------------------------------------------


async def test_non_stream_body_headers_and_usage(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    response = await client.post("/chat/completions", json=chat(model="deepseek-chat"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert len(response.headers["x-ds-trace-id"]) == 32
    body = response.json()
    recorded = fake.requests[-1]
    assert body["id"] == recorded.id
    assert body["object"] == "chat.completion"
    assert body["model"] == "deepseek-chat"  # echoed, legacy names included
    assert body["system_fingerprint"] == SYSTEM_FINGERPRINT
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == default_usage(chat(), Reply())
    assert body["usage"]["prompt_cache_hit_tokens"] == 64


async def test_non_stream_with_openai_sdk_reasoning_and_deepseek_fields(
    fake: FakeDeepSeek, sdk: openai.AsyncOpenAI
) -> None:
    reply = Reply(
        content=["4"],
        reasoning=["2+2", " is 4"],
        finish_reason="length",
        server_tool_use={"web_search_requests": 2},
    )
    fake.enqueue(reply)
    completion = await sdk.chat.completions.create(
        model="deepseek-v4-pro", messages=[{"role": "user", "content": LONG_PROMPT}]
    )
    message = completion.choices[0].message
    assert message.content == "4"
    assert getattr(message, "reasoning_content", None) == "2+2 is 4"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    expected = default_usage(chat(), reply)
    assert completion.usage.model_dump(exclude_none=True) == expected
    assert expected["server_tool_use"] == {"web_search_requests": 2}
    assert expected["completion_tokens_details"] == {"reasoning_tokens": 2}


async def test_explicit_and_absent_usage(fake: FakeDeepSeek, client: httpx.AsyncClient) -> None:
    explicit = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    fake.enqueue(
        Reply(usage=explicit, server_tool_use={"web_search_requests": 1}), Reply(usage=None)
    )
    first = (await client.post("/chat/completions", json=chat())).json()
    assert first["usage"] == {**explicit, "server_tool_use": {"web_search_requests": 1}}
    assert "server_tool_use" not in explicit  # the Reply is left untouched
    second = (await client.post("/chat/completions", json=chat())).json()
    assert "usage" not in second


async def test_blank_keepalive_lines_precede_the_json(
    fake: FakeDeepSeek, client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    fake.enqueue(Reply(keepalive=3, keepalive_interval=0.001), Reply(keepalive=2))
    response = await client.post("/chat/completions", json=chat())
    assert response.content.startswith(b"\n\n\n{")
    assert json.loads(response.content)["choices"][0]["message"]["content"] == "Hello world"
    completion = await sdk.chat.completions.create(model="deepseek-flash", messages=[])
    assert completion.choices[0].message.content == "Hello world"


async def test_keepalives_are_flushed_while_the_body_waits(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    # The body would come only after 100 keep-alives 20 ms apart: the first bytes the client
    # sees must be blank lines, proving they are sent as they go, not buffered with the body.
    fake.enqueue(Reply(keepalive=100, keepalive_interval=0.02))
    async with client.stream("POST", "/chat/completions", json=chat()) as response:
        first = await anext(response.aiter_raw())
    assert first
    assert first.strip(b"\n") == b""
    request_id = fake.requests[-1].id
    await fake.wait_for(lambda: request_id in fake.disconnects)
    assert request_id not in fake.finished


async def test_raw_body_is_sent_verbatim(fake: FakeDeepSeek, client: httpx.AsyncClient) -> None:
    fake.enqueue(Reply(raw_body=b'{"id": "x", "choices": [tru'))
    response = await client.post("/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.content == b'{"id": "x", "choices": [tru'


async def test_non_stream_cut_sends_half_a_body(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(keepalive=1, cut_after_events=0))
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/chat/completions", json=chat()) as response:
            async for piece in response.aiter_raw():
                received += piece
    assert received.startswith(b'\n{"id":')
    with pytest.raises(json.JSONDecodeError):
        json.loads(received)
    assert fake.cut == [fake.requests[-1].id]
    assert not fake.finished
    assert not fake.disconnects


# --- streaming ---------------------------------------------------------------------------------


async def test_stream_shape_headers_and_reasoning(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    reply = Reply(reasoning=["Think", "ing"], content=["An", "swer"])
    fake.enqueue(reply)
    response = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert "x-ds-trace-id" in response.headers
    chunks = stream_chunks_of(response.content)
    recorded = fake.requests[-1]
    for chunk in chunks:
        assert (chunk["id"], chunk["object"], chunk["model"], chunk["system_fingerprint"]) == (
            recorded.id,
            "chat.completion.chunk",
            "deepseek-flash",
            SYSTEM_FINGERPRINT,
        )
        assert chunk["created"] == chunks[0]["created"]
    assert [chunk["choices"][0]["delta"] for chunk in chunks] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Think", "content": None},
        {"reasoning_content": "ing", "content": None},
        {"content": "An"},
        {"content": "swer"},
        {"content": ""},
    ]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * 5 + ["stop"]
    assert chunks[-1]["usage"] == default_usage(chat(), reply)
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    await fake.wait_for(lambda: recorded.id in fake.finished)


# Which chunks carry usage, by placement and include_usage (True / False / stream_options
# absent). "-" no usage key, "null" "usage": null, "U" the usage, "U2" conflicting_usage(U);
# "sep:" marks the extra chunk with "choices": [].
PLACEMENTS: list[tuple[UsagePlacement, bool | None, list[str]]] = [
    ("last_chunk", True, ["null", "null", "null", "U"]),
    ("last_chunk", False, ["-", "-", "-", "U"]),
    ("last_chunk", None, ["-", "-", "-", "U"]),
    ("separate_chunk", True, ["null", "null", "null", "null", "sep:U"]),
    ("separate_chunk", False, ["-", "-", "-", "-"]),
    ("separate_chunk", None, ["-", "-", "-", "-"]),
    ("null_chunks_then_separate", True, ["null", "null", "null", "null", "sep:U"]),
    ("null_chunks_then_separate", False, ["null", "null", "null", "null", "sep:U"]),
    ("null_chunks_then_separate", None, ["null", "null", "null", "null", "sep:U"]),
    ("twice", True, ["null", "null", "null", "U", "sep:U2"]),
    ("twice", False, ["-", "-", "-", "U", "sep:U2"]),
    ("twice", None, ["-", "-", "-", "U", "sep:U2"]),
]


@pytest.mark.parametrize(
    ("placement", "include_usage", "expected"),
    PLACEMENTS,
    ids=[f"{p}-include_{i}" for p, i, _ in PLACEMENTS],
)
async def test_usage_placement(
    fake: FakeDeepSeek,
    client: httpx.AsyncClient,
    placement: UsagePlacement,
    include_usage: bool | None,
    expected: list[str],
) -> None:
    reply = Reply(usage_placement=placement)
    fake.enqueue(reply)
    extra: dict[str, Any] = {"stream": True}
    if include_usage is not None:
        extra["stream_options"] = {"include_usage": include_usage}
    chunks = stream_chunks_of((await client.post("/chat/completions", json=chat(**extra))).content)

    usage = default_usage(chat(), reply)
    names = {json.dumps(usage): "U", json.dumps(conflicting_usage(usage)): "U2"}

    def mark(chunk: dict[str, Any]) -> str:
        prefix = "sep:" if chunk["choices"] == [] else ""
        if "usage" not in chunk:
            return prefix + "-"
        if chunk["usage"] is None:
            return prefix + "null"
        return prefix + names[json.dumps(chunk["usage"])]

    assert [mark(chunk) for chunk in chunks] == expected


async def test_usage_none_never_sends_usage(fake: FakeDeepSeek, client: httpx.AsyncClient) -> None:
    fake.enqueue(Reply(usage=None), Reply(usage=None, usage_placement="twice"))
    body = chat(stream=True, stream_options={"include_usage": True})
    for _ in range(2):
        chunks = stream_chunks_of((await client.post("/chat/completions", json=body)).content)
        assert len(chunks) == 4
        assert all(chunk["usage"] is None for chunk in chunks)


async def test_openai_sdk_reads_each_usage_placement(
    fake: FakeDeepSeek, sdk: openai.AsyncOpenAI
) -> None:
    placements: tuple[UsagePlacement, ...] = ("last_chunk", "separate_chunk")
    for placement in placements:
        reply = Reply(usage_placement=placement)
        fake.enqueue(reply)
        stream = await sdk.chat.completions.create(
            model="deepseek-flash",
            messages=[{"role": "user", "content": LONG_PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
        )
        usages = [
            chunk.usage.model_dump(exclude_none=True)
            async for chunk in stream
            if chunk.usage is not None
        ]
        assert usages == [default_usage(chat(), reply)]


def _sync_sdk_stream(base_url: str) -> tuple[str, dict[str, Any] | None]:
    """The blocking client as most users run it; returns the text and the last usage seen."""
    text, usage = "", None
    with openai.OpenAI(base_url=base_url, api_key=FAKE_UPSTREAM_KEY, max_retries=0) as api:
        stream = api.chat.completions.create(
            model="deepseek-flash", messages=[{"role": "user", "content": LONG_PROMPT}], stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage.model_dump(exclude_none=True)
    return text, usage


async def test_sync_sdk_through_v1_with_keepalives_and_crlf(fake: FakeDeepSeek) -> None:
    reply = Reply(keepalive=2, line_ending="\r\n")
    fake.enqueue(reply)
    text, usage = await asyncio.to_thread(_sync_sdk_stream, fake.base_url + "/v1")
    assert text == "Hello world"
    assert usage == default_usage(chat(), reply)
    assert fake.requests[-1].path == "/v1/chat/completions"


async def test_keepalive_comments_precede_the_first_event(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(keepalive=3))
    raw = (await client.post("/chat/completions", json=chat(stream=True))).content
    assert raw.startswith(b": keep-alive\n\n" * 3 + b"data: {")
    assert raw.count(b"keep-alive") == 3
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_crlf_framing(fake: FakeDeepSeek, client: httpx.AsyncClient) -> None:
    fake.enqueue(Reply(keepalive=1, line_ending="\r\n"))
    raw = (await client.post("/chat/completions", json=chat(stream=True))).content
    assert raw.count(b"\n") == raw.count(b"\r\n") > 0
    assert raw.startswith(b": keep-alive\r\n\r\ndata: {")
    chunks = stream_chunks_of(raw, b"\r\n")
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Hello world"


async def test_raw_events_are_the_whole_stream(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    events = [b'data: {"choices":[]}\r\n\r\n', b"data: {broken", b"\n\ndata: [DONE]\n\n"]
    fake.enqueue(Reply(raw_events=events))
    response = await client.post("/chat/completions", json=chat(stream=True))
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.content == b"".join(events)


async def test_cut_stream_ends_without_done(fake: FakeDeepSeek, client: httpx.AsyncClient) -> None:
    fake.enqueue(Reply(cut_after_events=2, content=["a", "b", "c"]))
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as response:
            async for piece in response.aiter_raw():
                received += piece
    events = data_events(received)
    assert len(events) == 2
    assert b"[DONE]" not in received
    assert fake.cut == [fake.requests[-1].id]
    assert not fake.finished


async def test_cut_stream_seen_by_openai_sdk(fake: FakeDeepSeek, sdk: openai.AsyncOpenAI) -> None:
    fake.enqueue(Reply(cut_after_events=3))
    contents: list[str | None] = []
    with pytest.raises(openai.APIConnectionError):
        stream = await sdk.chat.completions.create(model="deepseek-flash", messages=[], stream=True)
        async for chunk in stream:
            contents.append(chunk.choices[0].delta.content)
    assert contents == ["", "Hello", " world"]


async def test_client_disconnect_mid_stream_is_recorded(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(content=["x"] * 200, chunk_interval=0.01))
    async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as response:
        first = await anext(response.aiter_lines())
    assert first.startswith("data: {")
    request_id = fake.requests[-1].id
    await fake.wait_for(lambda: request_id in fake.disconnects)
    assert request_id not in fake.finished
    assert not fake.cut


async def test_fim_non_stream_and_stream(
    fake: FakeDeepSeek, client: httpx.AsyncClient, fake_sdk_beta: openai.AsyncOpenAI
) -> None:
    body = {"model": "deepseek-flash", "prompt": "def add(a, b):", "suffix": "    return c"}
    completion = await fake_sdk_beta.completions.create(
        model="deepseek-flash", prompt="def add(a, b):", suffix="    return c"
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "Hello world"
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == default_usage(body, Reply())

    reply = Reply(content=["    c = a", " + b\n"], finish_reason="length")
    fake.enqueue(reply)
    raw = (await client.post("/beta/completions", json={**body, "stream": True})).content
    chunks = stream_chunks_of(raw)
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert [chunk["choices"][0] for chunk in chunks] == [
        {"text": "    c = a", "index": 0, "logprobs": None, "finish_reason": None},
        {"text": " + b\n", "index": 0, "logprobs": None, "finish_reason": None},
        {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"},
    ]
    assert chunks[-1]["usage"] == default_usage(body, reply)


@pytest.fixture
async def fake_sdk_beta(fake: FakeDeepSeek) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=fake.base_url + "/beta", api_key=FAKE_UPSTREAM_KEY, max_retries=0
    ) as api:
        yield api
