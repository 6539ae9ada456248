"""The real OpenAI SDK through the proxy: what users see is DeepSeek's answer, unchanged, and
every call leaves exactly one correct, priced usage record."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import openai
import pytest

from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY, Reply, UsagePlacement
from tests.support.proxy_harness import TEAM_KEYS, RunningProxy
from tests.support.requests import CHAT, USAGE

# 640 cache hits, 360 misses, 50 output tokens of which 20 reasoning, on deepseek-flash at peak:
# CNY 640 x 0.04 + 360 x 2 + 50 x 8 per million; USD 640 x 0.006 + 360 x 0.30 + 50 x 1.20.
SDK_USAGE = {**USAGE, "prompt_tokens_details": {"cached_tokens": 640}}
"""`USAGE` with the OpenAI field the SDK reads cache hits from."""
COST = {"CNY": Decimal("0.0011456"), "USD": Decimal("0.00017184")}
MESSAGES: list[Any] = CHAT["messages"]


def assert_one_priced_record(
    proxy: RunningProxy, *, stream: bool, endpoint: str = "chat", team: str = "alpha"
) -> None:
    [record] = proxy.sink.records
    assert (record.team, record.endpoint, record.stream) == (team, endpoint, stream)
    assert (record.outcome, record.usage_source, record.upstream_status) == (
        "complete",
        "reported",
        200,
    )
    assert (
        record.cache_hit_tokens,
        record.cache_miss_tokens,
        record.output_tokens,
        record.reasoning_tokens,
        record.prompt_tokens,
    ) == (640, 360, 50, 20, 1000)
    assert (record.model_requested, record.billed_model, record.tier) == (
        "deepseek-flash",
        "deepseek-flash",
        "peak",
    )
    assert record.priced and dict(record.costs) == COST
    assert record.flags == ()
    assert record.key_id.startswith("k_") and len(record.key_id) == 10


@pytest.mark.parametrize("suffix", ["", "/v1", "/beta"])
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_non_streaming(
    fake: FakeDeepSeek, proxy: RunningProxy, suffix: str, sync: bool
) -> None:
    fake.enqueue(
        Reply(content=["Hello", " world"], reasoning=["Think"], usage=SDK_USAGE, keepalive=2)
    )
    kwargs: dict[str, Any] = {"model": "deepseek-flash", "messages": MESSAGES}
    if sync:
        client = openai.OpenAI(
            base_url=proxy.url + suffix, api_key=TEAM_KEYS["alpha"], max_retries=0
        )
        with client:
            completion = await asyncio.to_thread(lambda: client.chat.completions.create(**kwargs))
    else:
        async with openai.AsyncOpenAI(
            base_url=proxy.url + suffix, api_key=TEAM_KEYS["alpha"], max_retries=0
        ) as aclient:
            completion = await aclient.chat.completions.create(**kwargs)
    assert completion.choices[0].message.content == "Hello world"
    message = completion.choices[0].message.model_dump()
    assert message["reasoning_content"] == "Think"
    assert completion.usage is not None
    assert completion.usage.model_dump()["prompt_cache_hit_tokens"] == 640
    await proxy.sink.wait_for(1)
    assert_one_priced_record(proxy, stream=False)
    [upstream] = fake.requests
    expected_path = "/beta/chat/completions" if suffix == "/beta" else "/chat/completions"
    assert upstream.path == expected_path
    assert upstream.headers["Authorization"] == f"Bearer {FAKE_UPSTREAM_KEY}"


async def _stream(
    proxy: RunningProxy, suffix: str, sync: bool, options: dict[str, Any] | None
) -> list[Any]:
    kwargs: dict[str, Any] = {"model": "deepseek-flash", "messages": MESSAGES, "stream": True}
    if options is not None:
        kwargs["stream_options"] = options
    if sync:

        def consume() -> list[Any]:
            with openai.OpenAI(
                base_url=proxy.url + suffix, api_key=TEAM_KEYS["alpha"], max_retries=0
            ) as client:
                return list(client.chat.completions.create(**kwargs))

        return await asyncio.to_thread(consume)
    async with openai.AsyncOpenAI(
        base_url=proxy.url + suffix, api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as aclient:
        return [chunk async for chunk in await aclient.chat.completions.create(**kwargs)]


@pytest.mark.parametrize("placement", ["last_chunk", "separate_chunk", "null_chunks_then_separate"])
@pytest.mark.parametrize("include_usage", [True, False, None], ids=["usage", "no-usage", "absent"])
@pytest.mark.parametrize("suffix", ["", "/v1", "/beta"])
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_streaming(
    fake: FakeDeepSeek,
    proxy: RunningProxy,
    placement: UsagePlacement,
    include_usage: bool | None,
    suffix: str,
    sync: bool,
) -> None:
    fake.enqueue(
        Reply(
            content=["Hel", "lo", " world"],
            reasoning=["a", "b"],
            usage=SDK_USAGE,
            usage_placement=placement,
            keepalive=2,
        )
    )
    options = None if include_usage is None else {"include_usage": include_usage}
    chunks = await _stream(proxy, suffix, sync, options)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    thinking = "".join(
        (c.choices[0].delta.model_dump().get("reasoning_content") or "")
        for c in chunks
        if c.choices
    )
    assert (text, thinking) == ("Hello world", "ab")
    usage_only = [c for c in chunks if not c.choices]
    with_usage = [c for c in chunks if c.usage is not None]
    if placement == "last_chunk":
        # DeepSeek 2026 sends usage on the last content chunk whether asked or not.
        assert usage_only == []
        assert len(with_usage) == 1 and with_usage[0].choices[0].finish_reason == "stop"
    elif include_usage:
        assert len(usage_only) == 1 and with_usage == usage_only
    else:
        # The usage-only chunk exists only because the proxy asked: the client never sees it.
        assert usage_only == [] and with_usage == []
    await proxy.sink.wait_for(1)
    assert_one_priced_record(proxy, stream=True)
    upstream_options = fake.requests[0].json["stream_options"]
    assert upstream_options == {"include_usage": True}


async def test_stream_options_other_keys_are_kept(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    fake.enqueue(Reply(usage=SDK_USAGE))
    await _stream(proxy, "", False, {"include_usage": False, "continuous_usage_stats": False})
    body = fake.requests[0].json
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert body["messages"] == MESSAGES and body["stream"] is True


async def test_fim_through_beta(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    fake.enqueue(Reply(content=["return a + b"], usage=SDK_USAGE))
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/beta", api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as client:
        completion = await client.completions.create(
            model="deepseek-flash", prompt="def add(a, b):", suffix="\n"
        )
    assert completion.choices[0].text == "return a + b"
    await proxy.sink.wait_for(1)
    assert_one_priced_record(proxy, stream=False, endpoint="fim")
    assert fake.requests[0].path == "/beta/completions"


async def test_fim_streaming(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    fake.enqueue(Reply(content=["return", " a + b"], usage=SDK_USAGE))
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/beta", api_key=TEAM_KEYS["beta"], max_retries=0
    ) as client:
        stream = await client.completions.create(
            model="deepseek-flash", prompt="def add(a, b):", stream=True
        )
        text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "return a + b"
    await proxy.sink.wait_for(1)
    assert_one_priced_record(proxy, stream=True, endpoint="fim", team="beta")


async def test_models_come_from_upstream(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    for suffix in ("", "/v1"):
        async with openai.AsyncOpenAI(
            base_url=proxy.url + suffix, api_key=TEAM_KEYS["alpha"], max_retries=0
        ) as client:
            models = [m.id async for m in client.models.list()]
        assert "deepseek-flash" in models
    assert [r.path for r in fake.requests] == ["/models", "/models"]
    assert proxy.sink.records == []
