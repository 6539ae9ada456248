"""Attribution below the team, through the real proxy and the real SDKs: tags from
``x-proxy-tags`` and the end user from the body are recorded; what the config does not allow
is a 400 in the route's own shape, before DeepSeek; tags become metric labels only where the
config says, and never past their cap."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from multidict import CIMultiDict

from proxy.attribution import AttributionConfig
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import Reply
from tests.support.proxy_harness import TEAM_KEYS, RunningProxy, StartProxy

ALLOWED = AttributionConfig(frozenset({"project", "env"}), tag_value_max_chars=16)
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


def chat(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url, api_key=TEAM_KEYS["alpha"], max_retries=0)


async def test_tags_and_users_are_recorded_in_every_format(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """Chat's ``user``, DeepSeek's ``user_id``, the Responses API's ``user`` and Anthropic's
    ``metadata.user_id``; the tags header in any order, with spaces; the header stays with the
    proxy, the body goes upstream as sent."""
    proxy = await start_proxy(attribution=ALLOWED)
    tags = {"x-proxy-tags": "env=prod , project=ranker"}
    async with chat(proxy) as client:
        await client.chat.completions.create(
            model="deepseek-flash", messages=MESSAGES, user="u-42", extra_headers=tags
        )
        await client.chat.completions.create(
            model="deepseek-flash", messages=MESSAGES, extra_body={"user_id": "tenant-9"}
        )
        await client.responses.create(
            model="deepseek-flash",
            input="Say hello",
            user="u-43",
            extra_headers={"x-proxy-tags": "project=search"},
        )
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url + "/anthropic", api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as claude:
        await claude.messages.create(
            model="deepseek-flash",
            max_tokens=50,
            messages=MESSAGES,
            metadata={"user_id": "u-44"},
            extra_headers={"x-proxy-tags": "env=dev"},
        )
    records = await proxy.sink.wait_for(4)
    assert [(r.endpoint, dict(r.tags), r.end_user) for r in records] == [
        ("chat", {"env": "prod", "project": "ranker"}, "u-42"),
        ("chat", {}, "tenant-9"),
        ("responses", {"project": "search"}, "u-43"),
        ("messages", {"env": "dev"}, "u-44"),
    ]
    assert list(records[0].tags) == ["env", "project"]  # stored sorted by key
    for request in fake.requests:
        assert not any(name.lower() == "x-proxy-tags" for name in request.headers)
    assert fake.requests[0].json is not None and fake.requests[0].json["user"] == "u-42"
    assert fake.requests[3].json is not None
    assert fake.requests[3].json["metadata"] == {"user_id": "u-44"}


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("team=alpha", "tag key 'team' is not allowed; allowed: env, project"),
        ("project=ranker,project=search", "tag key 'project' is given twice"),
        ("project", "expected key=value pairs, got 'project'"),
        ("project=", "the value of 'project' must be 1 to 16 characters"),
        ("project=a b", "the value of 'project' must be 1 to 16 characters"),
        ("project=<script>", "the value of 'project' must be 1 to 16 characters"),
        ("project=" + "x" * 17, "the value of 'project' must be 1 to 16 characters"),
        ("env=prod;rm", "the value of 'env' must be 1 to 16 characters"),
    ],
)
async def test_tags_the_config_does_not_allow_are_refused_before_deepseek(
    fake: FakeDeepSeek, start_proxy: StartProxy, header: str, reason: str
) -> None:
    proxy = await start_proxy(attribution=ALLOWED)
    async with chat(proxy) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="deepseek-flash", messages=MESSAGES, extra_headers={"x-proxy-tags": header}
            )
    assert refused.value.status_code == 400
    assert reason in refused.value.message
    assert fake.requests == [] and proxy.sink.records == [] and proxy.sink.in_flight == []


async def test_tags_on_several_header_lines_count_together(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """HTTP lets a header come in several lines: they are one list, so a key given on two
    lines is given twice (400), and tags on separate lines are all recorded."""
    proxy = await start_proxy(attribution=ALLOWED)
    body = b'{"model": "deepseek-flash", "messages": [{"role": "user", "content": "hi"}]}'
    async with aiohttp.ClientSession() as http:
        for lines, status in (
            (("project=ranker", "env=prod"), 200),
            (("project=ranker", "project=other"), 400),
        ):
            headers = CIMultiDict(
                [
                    ("Authorization", f"Bearer {TEAM_KEYS['alpha']}"),
                    ("Content-Type", "application/json"),
                    *(("x-proxy-tags", line) for line in lines),
                ]
            )
            async with http.post(
                proxy.url + "/v1/chat/completions", data=body, headers=headers
            ) as answer:
                assert answer.status == status, await answer.text()
    [record] = await proxy.sink.wait_for(1)
    assert dict(record.tags) == {"env": "prod", "project": "ranker"}


async def test_tags_are_refused_where_the_config_allows_none(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url + "/anthropic", api_key=TEAM_KEYS["alpha"], max_retries=0
    ) as claude:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await claude.messages.create(
                model="deepseek-flash",
                max_tokens=50,
                messages=MESSAGES,
                extra_headers={"x-proxy-tags": "project=ranker"},
            )
    assert refused.value.body["type"] == "error"  # type: ignore[index]
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "allowed: none (tags are not enabled)" in refused.value.message
    assert fake.requests == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"user": 42}, "'user' must be a string of at most 256 printable characters"),
        ({"user": "u" * 257}, "'user' must be a string of at most 256 printable characters"),
        ({"user_id": "a\nb"}, "'user_id' must be a string"),
        ({"metadata": {"user_id": ["x"]}}, "'metadata.user_id' must be a string"),
    ],
)
async def test_an_end_user_that_cannot_be_stored_is_refused(
    fake: FakeDeepSeek, proxy: RunningProxy, body: dict[str, Any], reason: str
) -> None:
    async with chat(proxy) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="deepseek-flash", messages=MESSAGES, extra_body=body
            )
    assert reason in refused.value.message
    assert fake.requests == []


async def test_an_empty_user_is_no_user(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    async with chat(proxy) as client:
        await client.chat.completions.create(model="deepseek-flash", messages=MESSAGES, user="")
    [record] = await proxy.sink.wait_for(1)
    assert record.end_user is None


async def test_tag_labels_are_capped_and_the_overflow_counted(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """``project`` is a label with a cap of 2: five projects give two series of their own and
    ``other`` for the rest, counted; ``env`` is recorded but never a label; spend follows the
    same labels, to the last decimal."""
    proxy = await start_proxy(attribution=ALLOWED, tag_labels={"project": 2})
    usage = {
        "prompt_tokens": 800,
        "completion_tokens": 300,
        "prompt_cache_hit_tokens": 600,
        "prompt_cache_miss_tokens": 200,
        "total_tokens": 1100,
    }
    fake.enqueue(*[Reply(usage=usage) for _ in range(5)])
    async with chat(proxy) as client:
        for name in ("a", "b", "c", "a", "d"):
            await client.chat.completions.create(
                model="deepseek-flash",
                messages=MESSAGES,
                extra_headers={"x-proxy-tags": f"project={name},env=prod"},
            )
    await proxy.sink.wait_for(5)
    sample = proxy.registry.get_sample_value
    series = {
        s.labels["value"]: s.value
        for family in proxy.registry.collect()
        if family.name == "llm_tag_requests"
        for s in family.samples
        if s.name == "llm_tag_requests_total"
    }
    assert series == {"a": 2.0, "b": 1.0, "other": 2.0}
    assert sample("llm_tag_values_overflow_total", {"tag": "project"}) == 2
    # 0.002824 CNY a call (deepseek-flash at peak: 600 x 0.04 + 200 x 2 + 300 x 8 per million)
    cost = {"team": "alpha", "tag": "project", "currency": "CNY"}
    assert sample("llm_tag_cost_total", {**cost, "value": "a"}) == pytest.approx(0.005648)
    assert sample("llm_tag_cost_total", {**cost, "value": "other"}) == pytest.approx(0.005648)
    assert not any(
        s.labels.get("tag") == "env" for family in proxy.registry.collect() for s in family.samples
    )
