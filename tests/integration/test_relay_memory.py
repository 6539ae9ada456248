"""Every way a call can end, relayed through the real app with DeepSeek in memory.

The fake DeepSeek is never started: `MemoryTransport` hands its planned answers to the proxy's
upstream seam, so each case costs no upstream server, port or connection, and the table can
cover every ending the relay tells apart. What the client sees, what the ledger records and how
`proxy.outcome.classify` names it are checked together. (The client side is the real aiohttp
server on loopback, as a team's SDK would reach it.)
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from proxy.config import Timeouts
from proxy.pricing import PriceBook
from proxy.records import Outcome, UsageSource
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import Reply, dumps
from tests.support.memory_transport import MemoryTransport
from tests.support.proxy_harness import RunningProxy, running_proxy
from tests.support.requests import AUTH, CHAT, STREAM, USAGE

DEFAULTS = Timeouts()
NOWHERE = "http://deepseek.invalid"
"""The upstream URL: never resolved, since nothing opens a connection to it."""

DOCUMENT = {
    "id": "c1",
    "object": "chat.completion",
    "model": "deepseek-flash",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": USAGE,
}


@dataclass(frozen=True)
class Case:
    reply: Reply
    body: dict[str, Any]
    outcome: Outcome
    source: UsageSource
    client_status: int
    """What the record says the client got; for a body cut after it began, still DeepSeek's."""
    ends_whole: bool = True
    """Whether the client's answer ends normally (a cut JSON body drops the connection)."""
    first_byte: float = DEFAULTS.first_byte
    idle: float = DEFAULTS.idle


CASES = {
    "json": Case(Reply(usage=USAGE), CHAT, "complete", "reported", 200),
    "json after keep-alive lines": Case(
        Reply(usage=USAGE, keepalive=3), CHAT, "complete", "reported", 200
    ),
    "stream, usage on the last chunk": Case(
        Reply(usage=USAGE), STREAM, "complete", "reported", 200
    ),
    "stream, usage chunk of its own": Case(
        Reply(usage=USAGE, usage_placement="separate_chunk"), STREAM, "complete", "reported", 200
    ),
    "stream cut": Case(Reply(cut_after_events=2), STREAM, "upstream_cut", "estimated", 200),
    "json cut": Case(
        Reply(cut_after_events=1, keepalive=1), CHAT, "upstream_cut", "estimated", 200, False
    ),
    "rate limited": Case(Reply(status=429), CHAT, "upstream_error", "none", 429),
    "redirect": Case(
        Reply(redirect_to="http://elsewhere.invalid/"), CHAT, "upstream_error", "none", 502
    ),
    "not DeepSeek's JSON": Case(
        Reply(raw_body=b"<html>busy</html>"), CHAT, "bad_response", "estimated", 200
    ),
    "gzip although asked for identity": Case(
        Reply(raw_body=gzip.compress(dumps(DOCUMENT)), headers={"Content-Encoding": "gzip"}),
        CHAT,
        "complete",
        "reported",
        200,
    ),
    "an encoding the proxy cannot undo": Case(
        Reply(raw_body=b"\x1b\x00", headers={"Content-Encoding": "br"}),
        CHAT,
        "bad_response",
        "estimated",
        502,
    ),
    "silent after keep-alives past first_byte": Case(
        Reply(keepalive=2, keepalive_interval=5.0),
        STREAM,
        "timeout",
        "estimated",
        200,
        first_byte=0.2,
    ),
    "silent mid-stream past idle": Case(
        Reply(content=["a", "b", "c"], chunk_interval=5.0),
        STREAM,
        "timeout",
        "estimated",
        200,
        idle=0.2,
    ),
}


@pytest.fixture
def memory_fake() -> FakeDeepSeek:
    return FakeDeepSeek()  # not started: no socket


@asynccontextmanager
async def proxied(
    fake: FakeDeepSeek, book: PriceBook, case: Case
) -> AsyncIterator[tuple[RunningProxy, MemoryTransport]]:
    transport = MemoryTransport(fake, idle=case.idle)
    async with running_proxy(
        NOWHERE, book, transport=transport, first_byte=case.first_byte, idle=case.idle
    ) as proxy:
        yield proxy, transport


@pytest.mark.parametrize("name", CASES)
async def test_every_ending_is_relayed_and_recorded_once(
    name: str, memory_fake: FakeDeepSeek, book: PriceBook
) -> None:
    case = CASES[name]
    memory_fake.enqueue(case.reply)
    async with proxied(memory_fake, book, case) as (proxy, transport):
        async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH, timeout=10) as http:
            try:
                response = await http.post("/chat/completions", json=case.body)
                status, content = response.status_code, response.content
            except httpx.RemoteProtocolError:
                status, content = 0, b""  # the proxy dropped a JSON body cut short
        [record] = await proxy.sink.wait_for(1)
    assert transport.urls == [f"{NOWHERE}/chat/completions"]
    assert transport.closed
    assert (record.outcome, record.usage_source, record.client_status) == (
        case.outcome,
        case.source,
        case.client_status,
    )
    assert record.billable == (case.source != "none")
    assert bool(record.costs) == (case.source != "none")
    if not case.ends_whole:
        assert status == 0
        return
    assert status == case.client_status
    if case.body.get("stream") and status == 200:
        assert content.endswith(b"data: [DONE]\n\n") == (case.outcome == "complete")
    if name == "gzip although asked for identity":
        assert json.loads(content) == DOCUMENT  # relayed inflated, its usage metered


async def test_the_fake_sees_every_ending(memory_fake: FakeDeepSeek, book: PriceBook) -> None:
    """The memory transport tells the fake how each answer ended, as the server would."""
    memory_fake.enqueue(Reply(), Reply(cut_after_events=1))
    async with proxied(memory_fake, book, CASES["json"]) as (proxy, _):
        async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
            await http.post("/chat/completions", json=STREAM)
            await http.post("/chat/completions", json=STREAM)
        await proxy.sink.wait_for(2)
    first, second = (request.id for request in memory_fake.requests)
    assert (memory_fake.finished, memory_fake.cut) == ([first], [second])
