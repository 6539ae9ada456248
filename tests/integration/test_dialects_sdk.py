"""The Anthropic Messages format and the Responses API through the proxy, with the real
``anthropic`` and ``openai`` SDKs: the answer as DeepSeek gave it, the company key (never the
client's) sent upstream, and one record per call priced exactly as a chat call with the same
tokens at the same instant."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from proxy.config import Budget, Limits
from tests.support.fake_deepseek import COUNT_TOKENS_PATH, FakeDeepSeek
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY, Reply
from tests.support.fake_dialect_shapes import default_anthropic_usage
from tests.support.proxy_harness import TEAM_KEYS, RunningProxy, StartProxy

# 600 cache hits, 200 misses, 300 output tokens on deepseek-flash at peak (the harness's
# clock; within the small requests' prompt bound): CNY 600 x 0.04 + 200 x 2 + 300 x 8 per
# million; USD 600 x 0.006 + 200 x 0.30 + 300 x 1.20.
COST = {"CNY": Decimal("0.002824"), "USD": Decimal("0.0004236")}
CHAT_USAGE = {
    "prompt_tokens": 800,
    "completion_tokens": 300,
    "prompt_cache_hit_tokens": 600,
    "prompt_cache_miss_tokens": 200,
    "total_tokens": 1100,
}
ANTHROPIC_USAGE = {
    "input_tokens": 200,
    "cache_read_input_tokens": 600,
    "cache_creation_input_tokens": 0,
    "output_tokens": 300,
}
RESPONSES_USAGE = {
    "input_tokens": 800,
    "input_tokens_details": {"cached_tokens": 600},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 1100,
}
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


def the_record(proxy: RunningProxy, endpoint: str, stream: bool) -> None:
    [record] = proxy.sink.records
    assert (record.endpoint, record.stream, record.outcome, record.usage_source) == (
        endpoint,
        stream,
        "complete",
        "reported",
    )
    assert (record.cache_hit_tokens, record.cache_miss_tokens, record.output_tokens) == (
        600,
        200,
        300,
    )
    assert record.billed_model == "deepseek-flash" and record.tier == "peak"
    assert dict(record.costs) == COST
    assert record.flags == ()


def upstream_saw_the_company_key(fake: FakeDeepSeek) -> None:
    [request] = fake.requests
    assert request.auth_header == "Authorization"
    assert request.headers.get("Authorization") == f"Bearer {FAKE_UPSTREAM_KEY}"
    assert not any(TEAM_KEYS["alpha"] in value for value in request.headers.values())
    assert "x-api-key" not in {name.lower() for name in request.headers}


def anthropic_client(proxy: RunningProxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=proxy.url + "/anthropic", api_key=TEAM_KEYS["alpha"], max_retries=0
    )


async def test_anthropic_messages(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    fake.enqueue(Reply(content=["Hello", " world"], usage=ANTHROPIC_USAGE))
    async with anthropic_client(proxy) as client:
        message = await client.messages.create(
            model="deepseek-flash", max_tokens=400, messages=MESSAGES
        )
    assert message.content[0].text == "Hello world"  # type: ignore[union-attr]
    assert message.usage.cache_read_input_tokens == 600
    await proxy.sink.wait_for(1)
    the_record(proxy, "messages", stream=False)
    upstream_saw_the_company_key(fake)


async def test_anthropic_stream(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    fake.enqueue(Reply(content=["Hel", "lo"], usage=ANTHROPIC_USAGE, message_deltas=2))
    async with (
        anthropic_client(proxy) as client,
        client.messages.stream(model="deepseek-flash", max_tokens=400, messages=MESSAGES) as stream,
    ):
        final = await stream.get_final_message()
    assert final.content[0].text == "Hello"  # type: ignore[union-attr]
    assert final.usage.output_tokens == 300
    await proxy.sink.wait_for(1)
    the_record(proxy, "messages", stream=True)


async def test_the_sync_anthropic_client(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    """The blocking client (in a thread, so the proxy's loop runs): ``create`` and the
    ``messages.stream`` helper, the key in ``x-api-key`` as the SDK sends it; two records,
    priced as the async client's."""
    fake.enqueue(
        Reply(content=["Hi"], usage=ANTHROPIC_USAGE),
        Reply(content=["Hi", "!"], usage=ANTHROPIC_USAGE, message_deltas=3),
    )

    def both() -> tuple[str, int]:
        with anthropic.Anthropic(
            base_url=proxy.url + "/anthropic", api_key=TEAM_KEYS["alpha"], max_retries=0
        ) as client:
            whole = client.messages.create(
                model="deepseek-flash", max_tokens=400, messages=MESSAGES
            )
            with client.messages.stream(
                model="deepseek-flash", max_tokens=400, messages=MESSAGES
            ) as stream:
                final = stream.get_final_message()
        return whole.content[0].text + final.content[0].text, final.usage.output_tokens  # type: ignore[union-attr]

    text, output = await asyncio.to_thread(both)
    assert (text, output) == ("HiHi!", 300)
    records = await proxy.sink.wait_for(2)
    assert [(r.stream, r.endpoint) for r in records] == [(False, "messages"), (True, "messages")]
    assert [dict(r.costs) for r in records] == [COST, COST]
    assert all(r.key_id == records[0].key_id for r in records)
    assert {request.auth_header for request in fake.requests} == {"Authorization"}


async def test_anthropic_errors_are_anthropic_shaped(proxy: RunningProxy) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url + "/anthropic", api_key="sk-proxy-not-a-key", max_retries=0
    ) as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(model="deepseek-flash", max_tokens=10, messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.body["type"] == "error"  # type: ignore[index]
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


async def test_count_tokens_is_relayed_unmetered_when_deepseek_lacks_it(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """DeepSeek's guide does not list token counting: the SDK gets DeepSeek's 404 as is, the
    request went out with the company key only, and nothing is recorded or counted."""
    async with anthropic_client(proxy) as client:
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.count_tokens(model="deepseek-flash", messages=MESSAGES)
    [request] = fake.requests
    assert request.path == COUNT_TOKENS_PATH
    upstream_saw_the_company_key(fake)
    assert proxy.sink.records == []
    assert (
        proxy.registry.get_sample_value(
            "llm_requests_total",
            {"team": "alpha", "endpoint": "messages", "status": "404", "model": "deepseek-flash"},
        )
        is None
    )


async def test_count_tokens_answers_when_deepseek_offers_it(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    fake.offers_count_tokens = True
    async with anthropic_client(proxy) as client:
        counted = await client.messages.count_tokens(
            model="claude-sonnet-4", system="Be brief.", messages=MESSAGES
        )
    [request] = fake.requests
    assert request.json is not None and request.json["system"] == "Be brief."
    usage = default_anthropic_usage({"max_tokens": 1, **request.json}, Reply())
    assert counted.input_tokens == usage["input_tokens"] + usage["cache_read_input_tokens"] > 0
    upstream_saw_the_company_key(fake)
    assert proxy.sink.records == []


async def test_count_tokens_counts_against_the_in_flight_limits(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """Token counting reaches DeepSeek with the company key, so it is admitted like a call:
    at the team's in-flight limit it is refused (503, Anthropic's shape) and DeepSeek is not
    asked."""
    fake.offers_count_tokens = True
    proxy = await start_proxy(limits=Limits(max_request_bytes=1 << 20, max_inflight_per_team=0))
    async with anthropic_client(proxy) as client:
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.count_tokens(model="deepseek-flash", messages=MESSAGES)
    assert refused.value.status_code == 503
    assert refused.value.body["type"] == "error"  # type: ignore[index]
    assert fake.requests == []


async def test_the_proxys_own_errors_under_anthropic_are_anthropic_shaped(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """A path the proxy does not route (the SDK's model list) and a bad key on token counting:
    the Anthropic SDK reads both errors, and DeepSeek is never asked."""
    async with anthropic_client(proxy) as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.models.list()
    assert missing.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "no route GET /anthropic/v1/models",
            "code": "not_found",
        },
    }
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url + "/anthropic", api_key="sk-proxy-not-a-key", max_retries=0
    ) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await stranger.messages.count_tokens(model="deepseek-flash", messages=MESSAGES)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert fake.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_responses(fake: FakeDeepSeek, proxy: RunningProxy, stream: bool) -> None:
    fake.enqueue(Reply(content=["Hello"], usage=RESPONSES_USAGE))
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as client:
        if stream:
            events = await client.responses.create(
                model="deepseek-flash", input="Say hello", stream=True
            )
            kinds = [event.type async for event in events]
            assert kinds[-1] == "response.completed"
        else:
            response = await client.responses.create(model="deepseek-flash", input="Say hello")
            assert response.output_text == "Hello"
    await proxy.sink.wait_for(1)
    the_record(proxy, "responses", stream=stream)
    upstream_saw_the_company_key(fake)


async def test_the_same_tokens_cost_the_same_in_every_format(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    fake.enqueue(
        Reply(usage=CHAT_USAGE), Reply(usage=ANTHROPIC_USAGE), Reply(usage=RESPONSES_USAGE)
    )
    async with openai.AsyncOpenAI(
        base_url=proxy.url, api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as client:
        await client.chat.completions.create(model="deepseek-flash", messages=MESSAGES)
        async with anthropic_client(proxy) as messages:
            await messages.messages.create(
                model="deepseek-flash", max_tokens=400, messages=MESSAGES
            )
        await client.responses.create(model="deepseek-flash", input="Say hello")
    records = await proxy.sink.wait_for(3)
    assert [r.endpoint for r in records] == ["chat", "messages", "responses"]
    assert [dict(r.costs) for r in records] == [COST] * 3


async def test_a_claude_name_is_billed_as_the_model_deepseek_serves_it_with(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """``claude-opus-*`` names are billed as deepseek-v4-pro (the price book's name patterns):
    the same tokens cost what they cost under DeepSeek's own name, and the record keeps both."""
    fake.enqueue(Reply(usage=ANTHROPIC_USAGE), Reply(usage=ANTHROPIC_USAGE))
    async with anthropic_client(proxy) as client:
        for model in ("claude-opus-4-1", "deepseek-v4-pro"):
            await client.messages.create(model=model, max_tokens=400, messages=MESSAGES)
    claude, own = await proxy.sink.wait_for(2)
    assert (claude.model_requested, claude.billed_model) == ("claude-opus-4-1", "deepseek-v4-pro")
    assert (own.model_requested, own.billed_model) == ("deepseek-v4-pro", "deepseek-v4-pro")
    assert claude.priced and dict(claude.costs) == dict(own.costs)
    assert claude.price_version == own.price_version
    # Metrics label the call by the book's pattern: a bounded set, whatever names clients send.
    labels = {"team": "alpha", "endpoint": "messages", "status": "200"}
    assert (
        proxy.registry.get_sample_value("llm_requests_total", {**labels, "model": "claude-opus*"})
        == 1
    )
    assert (
        proxy.registry.get_sample_value(
            "llm_requests_total", {**labels, "model": "deepseek-v4-pro"}
        )
        == 1
    )


async def test_an_unsupported_name_is_billed_as_the_anthropic_endpoints_fallback(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """DeepSeek's Anthropic endpoint serves a name it does not support as deepseek-v4-flash
    (deepseek-flash's alias today) instead of refusing it: such a call is billed as that, flagged
    so, and admitted by a hard budget; the same name on chat is refused by the guard, which
    cannot price it. Its metric label is ``other``, a bounded set whatever names are sent."""
    budget = Budget("alpha", "month", Decimal("5"), "CNY", (), hard=True)
    proxy = await start_proxy(budgets=(budget,))
    fake.enqueue(Reply(usage=ANTHROPIC_USAGE))
    async with anthropic_client(proxy) as client:
        await client.messages.create(model="my-agent-model", max_tokens=400, messages=MESSAGES)
    async with openai.AsyncOpenAI(
        base_url=proxy.url, api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as chat:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await chat.chat.completions.create(model="my-agent-model", messages=MESSAGES)
    assert "has no price" in refused.value.message
    [record] = await proxy.sink.wait_for(1)
    assert (record.model_requested, record.billed_model) == ("my-agent-model", "deepseek-flash")
    assert record.priced and dict(record.costs) == COST
    assert record.flags == ("billed_as_endpoint_fallback",)
    assert len(fake.requests) == 1
    labels = {"team": "alpha", "endpoint": "messages", "status": "200", "model": "other"}
    assert proxy.registry.get_sample_value("llm_requests_total", labels) == 1


async def test_a_cut_anthropic_stream_raises_in_the_sdk_and_is_estimated(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """DeepSeek drops the connection mid-stream: the client gets Anthropic's ``error`` event
    (the SDK raises), and the call is recorded as cut, its usage estimated and flagged."""
    fake.enqueue(Reply(content=["w"] * 20, usage=ANTHROPIC_USAGE, cut_after_events=6))
    async with anthropic_client(proxy) as client:
        with pytest.raises(anthropic.APIError) as info:
            async with client.messages.stream(
                model="deepseek-flash", max_tokens=400, messages=MESSAGES
            ) as stream:
                await stream.get_final_message()
    assert "DeepSeek closed the connection" in str(info.value)
    [record] = await proxy.sink.wait_for(1)
    assert (record.endpoint, record.outcome, record.usage_source) == (
        "messages",
        "upstream_cut",
        "estimated",
    )
    assert "usage_estimated" in record.flags
    assert record.priced and record.costs["CNY"] > 0


async def test_a_cut_responses_stream_ends_with_an_error_event(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    fake.enqueue(Reply(content=["w"] * 20, usage=RESPONSES_USAGE, cut_after_events=6))
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as client:
        events = await client.responses.create(
            model="deepseek-flash", input="Say hello", stream=True
        )
        kinds = [event.type async for event in events]
    assert kinds[-1] == "error" and "response.completed" not in kinds
    [record] = await proxy.sink.wait_for(1)
    assert (record.endpoint, record.outcome, record.usage_source) == (
        "responses",
        "upstream_cut",
        "estimated",
    )


@pytest.mark.parametrize("dialect", ["messages", "responses"])
async def test_a_hard_budget_holds_in_every_format(
    fake: FakeDeepSeek, start_proxy: StartProxy, dialect: str
) -> None:
    """A month budget with room for one call's worst case (about 0.003 CNY: its prompt bound
    at the cache-miss price and the 100 output tokens its ``max_tokens`` or
    ``max_output_tokens`` allows), not for a second one beside the first call's real cost
    (0.002824): the first call is admitted, the second refused with 402 in the format's own
    error shape, before DeepSeek."""
    budget = Budget("alpha", "month", Decimal("0.004"), "CNY", (), hard=True)
    proxy = await start_proxy(budgets=(budget,))
    fake.enqueue(Reply(usage=ANTHROPIC_USAGE if dialect == "messages" else RESPONSES_USAGE))
    if dialect == "messages":
        async with anthropic_client(proxy) as client:
            await client.messages.create(model="deepseek-flash", max_tokens=100, messages=MESSAGES)
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(
                    model="deepseek-flash", max_tokens=100, messages=MESSAGES
                )
        assert refused.value.status_code == 402
        assert refused.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    else:
        async with openai.AsyncOpenAI(
            base_url=proxy.url + "/v1", api_key=TEAM_KEYS["alpha"], max_retries=0
        ) as client:
            await client.responses.create(
                model="deepseek-flash", input="Say hello", max_output_tokens=100
            )
            with pytest.raises(openai.APIStatusError) as failed:
                await client.responses.create(
                    model="deepseek-flash", input="Say hello", max_output_tokens=100
                )
        assert failed.value.status_code == 402
        assert failed.value.code == "budget_exceeded"
    assert len(fake.requests) == 1  # the refused call never reached DeepSeek
    [record] = await proxy.sink.wait_for(1)
    assert record.endpoint == dialect
