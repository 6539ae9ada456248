"""Network faults between the proxy and DeepSeek, injected on a real socket
(`tests.support.faulty_tcp`).

    client --> proxy (running_proxy) --> FaultyTcp --> fake DeepSeek

Each test states what the client sees and the exact record the call leaves, and checks the
invariants of /work/shared/reliability.md that a fault could break: exactly one record per
upstream dispatch, no retry by the proxy (one connection, at most one request upstream), no
``[DONE]`` after a cut, and usage that is never priced as zero when it is unknown.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import httpx
import openai
import pytest

from proxy.bounds import TEMPLATE_TOKENS_PER_ITEM
from proxy.pricing import PriceBook, price
from proxy.records import UsageRecord
from proxy.usage import TokenUsage, estimate_tokens
from tests.support.fake_deepseek import FakeDeepSeek, running_fake
from tests.support.fake_deepseek_shapes import Reply
from tests.support.faulty_tcp import CutMode, Fault, FaultyTcp, faulty_tcp
from tests.support.proxy_harness import PEAK, TEAM_KEYS, RunningProxy, running_proxy
from tests.support.requests import AUTH, PROMPT, SMALL_USAGE, STREAM

# Replies are 20 content events of ~330 bytes after ~250 bytes of headers: a cut after 2,000
# bytes falls inside the body, a cut after 20 inside the status line / headers.
MID_BODY = 2000
MID_HEADERS = 20
ESTIMATED_PROMPT = estimate_tokens(PROMPT) + TEMPLATE_TOKENS_PER_ITEM


@dataclass
class Chain:
    fake: FakeDeepSeek
    relay: FaultyTcp
    proxy: RunningProxy
    http: httpx.AsyncClient


@asynccontextmanager
async def chain(
    book: PriceBook, fault: Fault, *, first_byte: float = 660.0, idle: float = 120.0
) -> AsyncIterator[Chain]:
    async with running_fake() as fake:
        port = int(fake.base_url.rsplit(":", 1)[1])
        async with (
            faulty_tcp("127.0.0.1", port, fault) as relay,
            running_proxy(relay.url, book, first_byte=first_byte, idle=idle) as proxy,
            httpx.AsyncClient(base_url=proxy.url, headers=AUTH, timeout=10) as http,
        ):
            yield Chain(fake, relay, proxy, http)


def slow_reply(pieces: int = 20, interval: float = 0.01) -> Reply:
    return Reply(
        content=[f"w{i}" for i in range(pieces)], usage=SMALL_USAGE, chunk_interval=interval
    )


def data_events(body: bytes) -> list[bytes]:
    return [
        event.removeprefix(b"data: ")
        for event in body.split(b"\n\n")
        if event.startswith(b"data: ")
    ]


def estimated_costs(book: PriceBook, output: int) -> dict[str, Decimal]:
    """What the README's estimate prices: the prompt by rule of thumb plus the template's
    tokens for its one message, all cache miss, and one output token per content chunk
    relayed."""
    usage = TokenUsage(cache_miss=ESTIMATED_PROMPT, output=output)
    return {c: cost.total for c, cost in price(book, "deepseek-flash", usage, PEAK).costs.items()}


async def one_record(c: Chain) -> UsageRecord:
    """The call's only record, and the in-flight row it replaced (same id, one dispatch)."""
    [record] = await c.proxy.sink.wait_for(1)
    [dispatched] = c.proxy.sink.in_flight
    assert dispatched.request_id == record.request_id
    return record


def assert_estimated(record: UsageRecord, book: PriceBook, output: int) -> None:
    assert record.usage_source == "estimated" and "usage_estimated" in record.flags
    assert (record.cache_hit_tokens, record.cache_miss_tokens, record.output_tokens) == (
        0,
        ESTIMATED_PROMPT,
        output,
    )
    assert record.priced and dict(record.costs) == estimated_costs(book, output)
    assert all(cost > 0 for cost in record.costs.values())


class _Response(Protocol):
    """An HTTP response, from httpx or from the openai SDK's own copy of it."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def json(self) -> Any: ...


def assert_openai_error(response: _Response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("upstream_error", code, None)
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("mode", ["fin", "rst"])
async def test_cut_mid_stream_is_an_error_event_and_an_estimated_record(
    book: PriceBook, mode: CutMode
) -> None:
    async with chain(book, Fault(cut_after=MID_BODY, cut_mode=mode)) as c:
        c.fake.enqueue(slow_reply())
        response = await c.http.post("/chat/completions", json=STREAM)
        record = await one_record(c)
        assert (c.relay.connections, len(c.fake.requests), c.relay.cuts) == (1, 1, 1)
        assert c.relay.bytes_to_client == MID_BODY
    assert response.status_code == 200
    assert response.headers["x-request-id"] == record.request_id
    events = data_events(response.content)
    assert b"[DONE]" not in response.content
    assert json.loads(events[-1]) == {
        "error": {
            "message": "DeepSeek closed the connection before the response was complete",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_cut",
        }
    }
    relayed = events[:-1]
    assert 2 <= len(relayed) < 20  # the cut fell inside the body, not at either end
    assert (record.outcome, record.upstream_status, record.stream) == ("upstream_cut", 200, True)
    assert record.first_byte_at is not None
    assert_estimated(record, book, output=len(relayed))


@pytest.mark.parametrize("mode", ["fin", "rst"])
async def test_cut_inside_response_headers_is_502_billable_and_not_retried(
    book: PriceBook, mode: CutMode
) -> None:
    """DeepSeek received the call (and started answering), so it is metered as possibly billed
    (estimated) and the 502 tells an SDK not to send it again."""
    async with chain(book, Fault(cut_after=MID_HEADERS, cut_mode=mode)) as c:
        c.fake.enqueue(slow_reply())
        response = await c.http.post("/chat/completions", json=STREAM)
        record = await one_record(c)
        assert (c.relay.connections, len(c.fake.requests)) == (1, 1)
    assert_openai_error(response, 502, "upstream_cut")
    assert response.headers["x-should-retry"] == "false"
    assert (record.outcome, record.upstream_status) == ("upstream_cut", None)
    assert_estimated(record, book, output=0)


async def test_cut_inside_response_headers_is_not_retried_by_the_sdk(book: PriceBook) -> None:
    async with (
        chain(book, Fault(cut_after=MID_HEADERS)) as c,
        openai.AsyncOpenAI(base_url=c.proxy.url, api_key=TEAM_KEYS["alpha"], max_retries=2) as sdk,
    ):
        c.fake.enqueue(*[slow_reply() for _ in range(3)])
        with pytest.raises(openai.APIStatusError):
            await sdk.chat.completions.create(**STREAM)
        records = await c.proxy.sink.wait_for(1)
        assert len(c.fake.requests) == 1, f"DeepSeek received the call {len(c.fake.requests)}x"
    [record] = records
    assert record.outcome == "upstream_cut"
    assert_estimated(record, book, output=0)


async def test_latency_below_idle_passes(book: PriceBook) -> None:
    async with chain(book, Fault(latency=0.05), idle=1.0) as c:
        c.fake.enqueue(slow_reply(pieces=5, interval=0.02))
        response = await c.http.post("/chat/completions", json=STREAM)
        record = await one_record(c)
        assert (c.relay.connections, len(c.fake.requests)) == (1, 1)
    assert response.status_code == 200
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert (record.outcome, record.usage_source) == ("complete", "reported")
    assert (record.cache_hit_tokens, record.cache_miss_tokens, record.output_tokens) == (64, 36, 7)


async def test_latency_above_idle_before_the_answer_is_504(book: PriceBook) -> None:
    async with chain(book, Fault(latency=0.6), idle=0.2) as c:
        c.fake.enqueue(slow_reply(pieces=5))
        started = time.monotonic()
        response = await c.http.post("/chat/completions", json=STREAM)
        elapsed = time.monotonic() - started
        record = await one_record(c)
        # The delayed request still reaches DeepSeek after the proxy gave up, once: a late
        # arrival that DeepSeek bills, which is why the 504 says not to retry.
        await c.fake.wait_for(lambda: len(c.fake.requests) == 1)
        assert c.relay.connections == 1
    assert elapsed < 0.6  # the idle timeout, not the latency, ended the wait
    assert_openai_error(response, 504, "upstream_timeout")
    assert response.headers["x-should-retry"] == "false"
    assert (record.outcome, record.upstream_status, record.first_byte_at) == ("timeout", None, None)
    assert_estimated(record, book, output=0)


async def test_latency_above_idle_mid_stream_is_a_timeout_error_event(book: PriceBook) -> None:
    async with chain(book, Fault(), idle=0.3) as c:
        c.fake.enqueue(slow_reply(pieces=40, interval=0.02))
        async with c.http.stream("POST", "/chat/completions", json=STREAM) as response:
            body = b""
            async for part in response.aiter_raw():
                body += part
                if len(data_events(body)) == 3 and not c.relay.fault.latency:
                    await c.relay.set_fault(Fault(latency=1.0), live=True)
        record = await one_record(c)
        assert (c.relay.connections, len(c.fake.requests)) == (1, 1)
    events = data_events(body)
    assert b"[DONE]" not in body
    assert json.loads(events[-1])["error"] == {
        "message": "DeepSeek did not finish in time",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_cut",
    }
    assert (record.outcome, record.upstream_status) == ("timeout", 200)
    assert_estimated(record, book, output=len(events) - 1)


async def test_blackhole_is_504_within_first_byte_and_not_retried(book: PriceBook) -> None:
    async with (
        chain(book, Fault(blackhole=True), first_byte=0.5) as c,
        openai.AsyncOpenAI(base_url=c.proxy.url, api_key=TEAM_KEYS["alpha"], max_retries=2) as sdk,
    ):
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            await sdk.chat.completions.create(**STREAM)
        elapsed = time.monotonic() - started
        record = await one_record(c)
        # The SDK would retry a 5xx twice; x-should-retry: false stops it. One connection,
        # and nothing ever reached DeepSeek.
        assert (c.relay.connections, c.fake.requests) == (1, [])
        assert c.relay.bytes_to_target == 0
    assert 0.5 <= elapsed < 0.5 + 0.5
    response = info.value.response
    assert_openai_error(response, 504, "upstream_timeout")
    assert response.headers["x-should-retry"] == "false"
    assert (record.outcome, record.upstream_status, record.first_byte_at) == ("timeout", None, None)
    # The proxy cannot tell a blackhole from a DeepSeek still working: priced as an estimate.
    assert_estimated(record, book, output=0)


async def test_refused_connection_is_502_and_nothing_billable(book: PriceBook) -> None:
    async with chain(book, Fault(refuse=True)) as c:
        response = await c.http.post("/chat/completions", json=STREAM)
        record = await one_record(c)
        assert (c.relay.connections, c.fake.requests) == (0, [])
    assert_openai_error(response, 502, "upstream_unavailable")
    assert (record.outcome, record.usage_source, record.upstream_status) == (
        "connect_error",
        "none",
        None,
    )
    assert not record.priced and dict(record.costs) == {}
    assert record.unpriced_reason == "nothing billable: connect_error"


async def test_relay_recovers_after_a_refusal(book: PriceBook) -> None:
    """The harness itself: lifting a fault restores the same address, so one proxy can see a
    fault come and go."""
    async with chain(book, Fault(refuse=True)) as c:
        refused = await c.http.post("/chat/completions", json=STREAM)
        await c.relay.set_fault(Fault())
        c.fake.enqueue(slow_reply(pieces=3))
        served = await c.http.post("/chat/completions", json=STREAM)
        records = await c.proxy.sink.wait_for(2)
        assert (c.relay.connections, len(c.fake.requests)) == (1, 1)
    assert (refused.status_code, served.status_code) == (502, 200)
    assert [r.outcome for r in records] == ["connect_error", "complete"]
