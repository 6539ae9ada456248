"""Bounds on a real call (`proxy.bounds`): usage lost on the way is estimated from the whole
request the client sent."""

from __future__ import annotations

import httpx
import orjson

from proxy.bounds import estimate_prompt
from proxy.config import Limits
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import Reply
from tests.support.proxy_harness import RunningProxy
from tests.support.requests import AUTH, TOOL


async def test_lost_usage_is_estimated_from_the_whole_request(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """A stream with tool schemas cut before its usage: the estimate counts the schemas."""
    payload = {
        "model": "deepseek-flash",
        "stream": True,
        "tools": [TOOL] * 20,
        "messages": [{"role": "user", "content": "hi"}],
    }
    fake.enqueue(Reply(content=["a", "b", "c"], cut_after_events=3))
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        await http.post("/chat/completions", content=orjson.dumps(payload))
        [record] = await proxy.sink.wait_for(1)
    assert record.usage_source == "estimated"
    assert record.cache_miss_tokens == estimate_prompt(payload, Limits())[0]
    assert record.cache_miss_tokens is not None and record.cache_miss_tokens > 20 * 20
