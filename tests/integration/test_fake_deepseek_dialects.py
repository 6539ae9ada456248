"""The fake DeepSeek's Anthropic Messages and OpenAI Responses endpoints, read by the real SDKs.

The proxy will meter both dialects against this fake, so its shapes must be ones the real
``anthropic`` and ``openai`` parsers accept, with the usage each SDK reports exactly what the
fake meant to send (tests/support/fake_dialect_shapes.py). Raw events are checked with httpx.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from tests.support.fake_clients import LONG_PROMPT
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY, Reply
from tests.support.fake_dialect_shapes import (
    anthropic_events,
    default_anthropic_usage,
    default_responses_usage,
)

MESSAGES = [{"role": "user", "content": LONG_PROMPT}]
ANTHROPIC_REQUEST: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 100,
    "messages": MESSAGES,
}
RESPONSES_REQUEST: dict[str, Any] = {"model": "deepseek-flash", "input": LONG_PROMPT}
BY_X_API_KEY: dict[str, Any] = {
    "api_key": None,
    "default_headers": {"X-Api-Key": FAKE_UPSTREAM_KEY},
}
"""SDK options that send the key the way Anthropic's own API reads it."""
EXPLICIT_ANTHROPIC = {
    "input_tokens": 5,
    "cache_creation_input_tokens": 3,
    "cache_read_input_tokens": 128,
    "output_tokens": 7,
}


@pytest.fixture
async def claude(fake: FakeDeepSeek) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The anthropic SDK straight to the fake's ``/anthropic`` base, the key in ``x-api-key``
    (anthropic 2.16 sends ``api_key`` as ``Authorization: Bearer``; see `BY_X_API_KEY`)."""
    async with anthropic.AsyncAnthropic(
        base_url=fake.base_url + "/anthropic", max_retries=0, **BY_X_API_KEY
    ) as api:
        yield api


def named_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of a complete SSE body of named events, keep-alive comments skipped."""
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b"", "a stream ends with a blank line"
    events = []
    for block in blocks[:-1]:
        if block.startswith(b":"):
            continue
        name, data = block.split(b"\n")
        assert name.startswith(b"event: "), block
        assert data.startswith(b"data: "), block
        events.append((name.removeprefix(b"event: ").decode(), json.loads(data[6:])))
    return events


# --- pure helpers ------------------------------------------------------------------------------


def test_default_anthropic_usage_excludes_cache_reads_from_input() -> None:
    request = {**ANTHROPIC_REQUEST, "system": "abcd"}
    usage = default_anthropic_usage(request, Reply(content=["a", "b"], reasoning=["r"]))
    # 1004 characters -> 252 prompt tokens, 64 of them read from the cache.
    assert usage == {
        "input_tokens": 188,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 64,
        "output_tokens": 3,
    }
    bare = default_anthropic_usage(request, Reply(cache_fields=False, server_tool_use={"n": 1}))
    assert bare == {"input_tokens": 252, "output_tokens": 2, "server_tool_use": {"n": 1}}


def test_default_responses_usage_includes_cached_and_reasoning() -> None:
    usage = default_responses_usage(
        {**RESPONSES_REQUEST, "instructions": "abcd"}, Reply(reasoning=["r1", "r2"])
    )
    assert usage == {
        "input_tokens": 252,
        "input_tokens_details": {"cached_tokens": 64},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 256,
    }


def test_anthropic_events_pings_and_cumulative_deltas() -> None:
    reply = Reply(content=["a", "b"], message_deltas=3, pings_after=(0, 4, 99))
    usage = {"input_tokens": 5, "output_tokens": 7, "server_tool_use": {"web_search_requests": 1}}
    events = anthropic_events(message_id="msg_1", model="m", reply=reply, usage=usage)
    assert [name for name, _ in events] == [
        "ping",
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "ping",
        "content_block_stop",
        "message_delta",
        "message_delta",
        "message_delta",
        "message_stop",
        "ping",
    ]
    assert events[1][1]["message"]["usage"] == {"input_tokens": 5, "output_tokens": 1}
    deltas = [data for name, data in events if name == "message_delta"]
    assert [delta["usage"]["output_tokens"] for delta in deltas] == [2, 4, 7]
    assert [delta["delta"]["stop_reason"] for delta in deltas] == [None, None, "end_turn"]
    assert [("server_tool_use" in delta["usage"]) for delta in deltas] == [False, False, True]


def test_reply_rejects_impossible_anthropic_streams() -> None:
    with pytest.raises(ValueError, match="message_deltas"):
        Reply(message_deltas=0)
    with pytest.raises(ValueError, match="pings_after"):
        Reply(pings_after=(-1,))


# --- Anthropic Messages: non-streaming ---------------------------------------------------------


def _sync_message(base_url: str, **options: Any) -> anthropic.types.Message:
    with anthropic.Anthropic(base_url=base_url, max_retries=0, **options) as api:
        return api.messages.create(model="claude-opus-4-1", max_tokens=100, messages=MESSAGES)  # type: ignore[arg-type]


async def test_anthropic_sync_client_reads_text_and_usage_with_cache_fields(
    fake: FakeDeepSeek,
) -> None:
    fake.enqueue(Reply(content=["Hel", "lo"]))
    message = await asyncio.to_thread(_sync_message, fake.base_url + "/anthropic", **BY_X_API_KEY)
    recorded = fake.requests[-1]
    assert (recorded.path, recorded.auth_header) == ("/anthropic/v1/messages", "x-api-key")
    assert recorded.headers["X-Api-Key"] == FAKE_UPSTREAM_KEY
    assert "Authorization" not in recorded.headers
    assert message.id == recorded.id
    assert message.id.startswith("msg_")
    assert (message.model, message.role, message.type) == (
        "claude-opus-4-1",
        "assistant",
        "message",
    )
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello"  # type: ignore[union-attr]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    expected = default_anthropic_usage(ANTHROPIC_REQUEST, Reply(content=["Hel", "lo"]))
    assert message.usage.model_dump(exclude_none=True) == expected
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (187, 64)
    await fake.wait_for(lambda: recorded.id in fake.finished)


async def test_anthropic_async_client_usage_without_cache_fields_and_with_searches(
    fake: FakeDeepSeek, claude: anthropic.AsyncAnthropic
) -> None:
    reply = Reply(cache_fields=False, server_tool_use={"web_search_requests": 2})
    fake.enqueue(reply)
    raw = await claude.messages.with_raw_response.create(**ANTHROPIC_REQUEST)
    body = json.loads(raw.http_response.content)
    assert set(body["usage"]) == {"input_tokens", "output_tokens", "server_tool_use"}
    message = await raw.parse()
    assert message.usage.cache_read_input_tokens is None
    assert message.usage.cache_creation_input_tokens is None
    assert message.usage.input_tokens == 251
    assert message.usage.server_tool_use is not None
    assert message.usage.server_tool_use.web_search_requests == 2


async def test_anthropic_explicit_usage_is_sent_as_given(
    fake: FakeDeepSeek, claude: anthropic.AsyncAnthropic
) -> None:
    fake.enqueue(Reply(usage=EXPLICIT_ANTHROPIC))
    message = await claude.messages.create(**ANTHROPIC_REQUEST)
    assert message.usage.model_dump(exclude_none=True) == EXPLICIT_ANTHROPIC


async def test_anthropic_max_tokens_stops_generation(
    fake: FakeDeepSeek, claude: anthropic.AsyncAnthropic
) -> None:
    fake.enqueue(Reply(content=["a", "b", "c"]))
    message = await claude.messages.create(**{**ANTHROPIC_REQUEST, "max_tokens": 2})
    assert message.content[0].text == "ab"
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 2)


async def test_anthropic_keepalives_before_body_and_events(
    fake: FakeDeepSeek, claude: anthropic.AsyncAnthropic
) -> None:
    fake.enqueue(Reply(keepalive=2), Reply(keepalive=2))
    message = await claude.messages.create(**ANTHROPIC_REQUEST)
    assert message.content[0].text == "Hello world"
    async with claude.messages.stream(**ANTHROPIC_REQUEST) as stream:
        assert await stream.get_final_text() == "Hello world"


# --- Anthropic Messages: streaming -------------------------------------------------------------


async def test_anthropic_stream_raw_events(fake: FakeDeepSeek) -> None:
    async with httpx.AsyncClient(base_url=fake.base_url) as http:
        response = await http.post(
            "/anthropic/messages",
            json={**ANTHROPIC_REQUEST, "stream": True},
            headers={"Authorization": f"Bearer {FAKE_UPSTREAM_KEY}"},
        )
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert fake.requests[-1].auth_header == "Authorization"
    events = named_events(response.content)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    usage = default_anthropic_usage(ANTHROPIC_REQUEST, Reply())
    assert events[0][1]["message"]["usage"] == {**usage, "output_tokens": 1}
    assert events[0][1]["message"]["id"] == fake.requests[-1].id
    assert [data["delta"] for _, data in events[3:5]] == [
        {"type": "text_delta", "text": "Hello"},
        {"type": "text_delta", "text": " world"},
    ]
    assert events[6][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 2},
    }


async def test_anthropic_stream_final_message_takes_the_last_cumulative_output(
    fake: FakeDeepSeek, claude: anthropic.AsyncAnthropic
) -> None:
    fake.enqueue(
        Reply(
            content=["a", "b", "c"],
            usage={**EXPLICIT_ANTHROPIC, "server_tool_use": {"web_search_requests": 1}},
            message_deltas=3,
            pings_after=(0, 3, 6),
            chunk_interval=0.001,
        )
    )
    texts = []
    async with claude.messages.stream(**ANTHROPIC_REQUEST) as stream:
        async for event in stream:
            if event.type == "text":
                texts.append(event.text)
        message = await stream.get_final_message()
    assert texts == ["a", "b", "c"]
    assert message.content[0].text == "abc"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.model_dump(exclude_none=True) == {
        **EXPLICIT_ANTHROPIC,
        "server_tool_use": {"web_search_requests": 1},
    }


def _sync_stream_final(base_url: str) -> anthropic.types.Message:
    with (
        anthropic.Anthropic(base_url=base_url, api_key=FAKE_UPSTREAM_KEY, max_retries=0) as api,
        api.messages.stream(**ANTHROPIC_REQUEST) as stream,
    ):
        return stream.get_final_message()


async def test_anthropic_sync_stream_without_cache_fields(fake: FakeDeepSeek) -> None:
    reply = Reply(cache_fields=False, message_deltas=2, content=["x", "y", "z"])
    fake.enqueue(reply)
    message = await asyncio.to_thread(_sync_stream_final, fake.base_url + "/anthropic")
    assert message.usage.model_dump(exclude_none=True) == {"input_tokens": 251, "output_tokens": 3}


async def test_anthropic_cut_stream_raises_in_the_sdk(
    fake: FakeDeepSeek, claude: anthropic.AsyncAnthropic
) -> None:
    fake.enqueue(Reply(cut_after_events=4))
    texts = []
    # anthropic 2.16 lets a read error mid-stream through unwrapped (a connection error only
    # becomes APIConnectionError while the request is sent), unlike the openai SDK.
    with pytest.raises(httpx2.RemoteProtocolError):
        async with claude.messages.stream(**ANTHROPIC_REQUEST) as stream:
            async for text in stream.text_stream:
                texts.append(text)
    assert texts == ["Hello"]  # message_start, content_block_start, ping, one delta
    assert fake.cut == [fake.requests[-1].id]


ANTHROPIC_ERRORS = [
    (400, "invalid_request_error", "Invalid Format", anthropic.BadRequestError),
    (402, "billing_error", "Insufficient Balance", anthropic.APIStatusError),
    (429, "rate_limit_error", "Rate Limit Reached", anthropic.RateLimitError),
    (500, "api_error", "Server Error", anthropic.InternalServerError),
    (503, "overloaded_error", "Server Overloaded", anthropic.APIStatusError),
]


@pytest.mark.parametrize(
    ("status", "kind", "message", "exception"),
    ANTHROPIC_ERRORS,
    ids=[str(case[0]) for case in ANTHROPIC_ERRORS],
)
async def test_anthropic_error_replies_raise_typed_errors(
    fake: FakeDeepSeek,
    claude: anthropic.AsyncAnthropic,
    status: int,
    kind: str,
    message: str,
    exception: type[anthropic.APIStatusError],
) -> None:
    fake.enqueue(Reply(status=status))
    with pytest.raises(exception) as raised:
        await claude.messages.create(**ANTHROPIC_REQUEST)
    assert raised.value.status_code == status
    assert raised.value.body == {"type": "error", "error": {"type": kind, "message": message}}
    assert message in raised.value.message


async def test_anthropic_auth_by_x_api_key_or_bearer_and_a_wrong_key_is_refused(
    fake: FakeDeepSeek,
) -> None:
    base = fake.base_url + "/anthropic"
    bearers: list[dict[str, Any]] = [
        {"api_key": FAKE_UPSTREAM_KEY},
        {"auth_token": FAKE_UPSTREAM_KEY},
    ]
    for options in bearers:
        async with anthropic.AsyncAnthropic(base_url=base, max_retries=0, **options) as bearer:
            message = await bearer.messages.create(**ANTHROPIC_REQUEST)
        assert message.content[0].text == "Hello world"
        assert fake.requests[-1].auth_header == "Authorization"
        assert fake.requests[-1].headers["Authorization"] == f"Bearer {FAKE_UPSTREAM_KEY}"

    fake.enqueue(Reply(content=["kept"]))
    wrong: list[dict[str, Any]] = [
        {"api_key": None, "default_headers": {"X-Api-Key": "sk-client-WXYZ"}},
        {"auth_token": "sk-client-WXYZ"},
    ]
    for options in wrong:
        async with anthropic.AsyncAnthropic(base_url=base, max_retries=0, **options) as refused:
            with pytest.raises(anthropic.AuthenticationError) as raised:
                await refused.messages.create(**ANTHROPIC_REQUEST)
        assert raised.value.status_code == 401
        assert raised.value.body == {
            "type": "error",
            "error": {
                "type": "authentication_error",
                "message": "Authentication Fails, Your api key: ****WXYZ is invalid",
            },
        }
    assert [request.auth_header for request in fake.requests[-2:]] == [
        "x-api-key",
        "Authorization",
    ]
    async with httpx.AsyncClient(base_url=fake.base_url) as anonymous:
        response = await anonymous.post("/anthropic/v1/messages", json=ANTHROPIC_REQUEST)
        assert response.status_code == 401
        assert fake.requests[-1].auth_header is None
        # x-api-key is the one judged when both come, as on Anthropic's API.
        response = await anonymous.post(
            "/anthropic/v1/messages",
            json=ANTHROPIC_REQUEST,
            headers={"x-api-key": "sk-wrong", "Authorization": f"Bearer {FAKE_UPSTREAM_KEY}"},
        )
        assert response.status_code == 401
        response = await anonymous.post(
            "/anthropic/v1/messages",
            json=ANTHROPIC_REQUEST,
            headers={"x-api-key": FAKE_UPSTREAM_KEY},
        )
    assert response.json()["content"][0]["text"] == "kept"  # no refusal used the queue


@pytest.mark.parametrize("missing", ["model", "messages", "max_tokens"])
async def test_anthropic_mandatory_fields(
    fake: FakeDeepSeek, claude: anthropic.AsyncAnthropic, missing: str
) -> None:
    fake.enqueue(Reply(content=["queued"]))
    body = {name: value for name, value in ANTHROPIC_REQUEST.items() if name != missing}
    async with httpx.AsyncClient(base_url=fake.base_url) as http:
        response = await http.post(
            "/anthropic/v1/messages", json=body, headers={"x-api-key": FAKE_UPSTREAM_KEY}
        )
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": f"{missing}: Field required"},
    }
    message = await claude.messages.create(**ANTHROPIC_REQUEST)
    assert message.content[0].text == "queued"


# --- OpenAI Responses ----------------------------------------------------------------------------


async def test_responses_non_stream_with_the_openai_sdk(
    fake: FakeDeepSeek, sdk: openai.AsyncOpenAI
) -> None:
    reply = Reply(content=["Hi", " there"], reasoning=["r"])
    fake.enqueue(reply)
    response = await sdk.responses.create(
        model="deepseek-flash", input=LONG_PROMPT, max_output_tokens=50
    )
    recorded = fake.requests[-1]
    assert (recorded.path, recorded.auth_header) == ("/responses", "Authorization")
    assert response.id == recorded.id
    assert response.id.startswith("resp_")
    assert (response.object, response.status, response.model) == (
        "response",
        "completed",
        "deepseek-flash",
    )
    assert response.max_output_tokens == 50
    assert response.output_text == "Hi there"
    item = response.output[0]
    assert item.type == "message"
    assert [part.type for part in item.content] == ["output_text"]
    assert response.usage is not None
    assert response.usage.model_dump(exclude_none=True) == default_responses_usage(
        RESPONSES_REQUEST, reply
    )
    assert response.usage.input_tokens_details.cached_tokens == 64
    assert response.usage.output_tokens_details.reasoning_tokens == 1


async def test_responses_stream_events_and_final_usage(
    fake: FakeDeepSeek, sdk: openai.AsyncOpenAI
) -> None:
    usage = {
        "input_tokens": 300,
        "input_tokens_details": {"cached_tokens": 256},
        "output_tokens": 40,
        "output_tokens_details": {"reasoning_tokens": 30},
        "total_tokens": 340,
    }
    fake.enqueue(Reply(content=["a", "b"], usage=usage, keepalive=1))
    stream = await sdk.responses.create(model="deepseek-flash", input="hi", stream=True)
    events = [event async for event in stream]
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(10))
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["a", "b"]
    created, completed = events[0], events[-1]
    assert created.type == "response.created"
    assert (created.response.status, created.response.usage) == ("in_progress", None)
    assert completed.type == "response.completed"
    assert completed.response.output_text == "ab"
    assert completed.response.usage is not None
    assert completed.response.usage.model_dump(exclude_none=True) == usage
    assert completed.response.id == fake.requests[-1].id


async def test_responses_stream_helper_and_v1_path(fake: FakeDeepSeek) -> None:
    async with (
        openai.AsyncOpenAI(
            base_url=fake.base_url + "/v1", api_key=FAKE_UPSTREAM_KEY, max_retries=0
        ) as api,
        api.responses.stream(model="deepseek-flash", input="hi") as stream,
    ):
        final = await stream.get_final_response()
    assert final.output_text == "Hello world"
    assert final.usage is not None
    assert final.usage.output_tokens == 2
    assert fake.requests[-1].path == "/v1/responses"


async def test_responses_cut_stream_raises_in_the_sdk(
    fake: FakeDeepSeek, sdk: openai.AsyncOpenAI
) -> None:
    fake.enqueue(Reply(cut_after_events=5))
    seen = []
    with pytest.raises(openai.APIConnectionError):
        stream = await sdk.responses.create(model="deepseek-flash", input="hi", stream=True)
        async for event in stream:
            seen.append(event.type)
    assert seen[-1] == "response.output_text.delta"
    assert len(seen) == 5
    assert fake.cut == [fake.requests[-1].id]


async def test_responses_error_and_wrong_key(fake: FakeDeepSeek, sdk: openai.AsyncOpenAI) -> None:
    fake.enqueue(Reply(status=402))
    with pytest.raises(openai.APIStatusError) as raised:
        await sdk.responses.create(model="deepseek-flash", input="hi")
    assert raised.value.status_code == 402
    assert raised.value.body == {
        "message": "Insufficient Balance",
        "type": "unknown_error",
        "param": None,
        "code": "invalid_request_error",
    }
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key="sk-client-ABCD", max_retries=0
    ) as wrong:
        with pytest.raises(openai.AuthenticationError) as refused:
            await wrong.responses.create(model="deepseek-flash", input="hi")
    assert "****ABCD" in refused.value.message
    async with httpx.AsyncClient(base_url=fake.base_url) as http:
        response = await http.post(
            "/responses", json={"input": "hi"}, headers={"x-api-key": FAKE_UPSTREAM_KEY}
        )
        assert response.status_code == 401  # x-api-key is for the Anthropic paths only
        response = await http.post(
            "/responses",
            json={"input": "hi"},
            headers={"Authorization": f"Bearer {FAKE_UPSTREAM_KEY}"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Invalid Format: model: Field required"
