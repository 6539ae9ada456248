"""The money gate holds: the holes found by attacking the proxy, tried again.

Each test repeats an attack that broke a promise of README.md or SECURITY.md (an unhappy user,
a buggy agent, a hostile or broken upstream) and asserts that the promise now holds. Tests of
the same holes that belong to one module live beside that module's tests (`test_bounds.py`,
`test_sse.py`, `test_report.py`, `test_config.py`); SECURITY.md lists them all.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.bounds import BASE_TEMPLATE_TOKENS, TEMPLATE_TOKENS_PER_ITEM
from proxy.config import Budget, Limits
from proxy.pricing import PriceBook, price
from proxy.records import Dispatched, UsageRecord
from proxy.usage import TokenUsage
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY, Reply
from tests.support.proxy_harness import PEAK, TEAM_KEYS, RunningProxy, StartProxy, raw_request
from tests.support.requests import CHAT, JSON_AUTH, SMALL_USAGE, STREAM

KEY = TEAM_KEYS["alpha"]


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def inflight(registry: Any) -> float:
    return float(registry.get_sample_value("llm_inflight_requests", {"team": "alpha"}))


# --- 1. no request can leak an in-flight slot or a budget hold ------------------------------


class FailingSink:
    """A record sink that fails its first `failures` dispatches: a bug after admission."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def dispatched(self, call: Dispatched) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("injected failure after admission")

    def submit(self, record: UsageRecord) -> None:
        """Final records are not this sink's concern."""


async def test_no_request_leaks_a_slot_or_a_hold(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """More than `max_inflight_per_team` (250) requests of three kinds that broke the gate: a
    stream nested deeper than orjson writes (once crashed in the include_usage rewrite), the
    same with ``stream_options`` set (its rewrite must fail cleanly: 400), and calls hit by a
    bug after admission (500). Afterwards nothing is in flight and nothing is held: one more
    call whose worst case needs nearly all of the hard budget is admitted."""
    deep = {
        **STREAM,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi", "metadata": nested(300)}],
    }
    deep_body = json.dumps(deep, separators=(",", ":")).encode()  # orjson cannot write it
    # The budget fits one deep call's worst case and the real cost of all the calls, no more.
    worst = (
        Decimal(len(deep_body) + BASE_TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_ITEM) * 2 + 10 * 8
    ) / 1_000_000
    budget = Budget("alpha", "month", worst * Decimal("1.5") + Decimal("0.01"), "CNY", (), True)
    failing = FailingSink(0)
    proxy = await start_proxy(budgets=(budget,), sink=failing)
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH, timeout=30) as http:
        streams = [await http.post("/chat/completions", content=deep_body) for _ in range(260)]
        assert {r.status_code for r in streams} == {200}
        assert all(r.text.endswith("data: [DONE]\n\n") for r in streams)
        failing.failures = 260
        failed = [await http.post("/chat/completions", content=deep_body) for _ in range(260)]
        assert {r.status_code for r in failed} == {500}
        assert failed[0].json()["error"]["code"] == "internal_error"
        assert inflight(proxy.registry) == 0
        no_usage = json.dumps({**deep, "stream_options": {"include_usage": False}}).encode()
        refused = [await http.post("/chat/completions", content=no_usage) for _ in range(260)]
        assert {r.status_code for r in refused} == {400}
        assert "nested too deeply" in refused[0].json()["error"]["message"]
        last = await http.post("/chat/completions", content=deep_body)
        assert inflight(proxy.registry) == 0
    assert last.status_code == 200
    # the failed calls never went out; the streams were asked for usage without re-encoding
    assert len(fake.requests) == 261
    sent = fake.requests[0].body
    assert sent == b'{"stream_options":{"include_usage":true},' + deep_body[1:]
    # every in-flight row a sink was given was replaced by a final record, the failed
    # dispatches' too (nothing billable: DeepSeek never saw them)
    records = await proxy.sink.wait_for(521)
    assert sorted(r.request_id for r in records) == sorted(
        r.request_id for r in proxy.sink.in_flight
    )
    assert len(records) == 521
    assert sum(r.usage_source == "none" for r in records) == 260


async def test_duplicate_keys_reach_deepseek_as_the_proxy_read_them(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """JSON leaves duplicate keys to the parser: the proxy keeps the last, DeepSeek might keep
    the first, and would then bill a model the proxy did not price or a length its budget did
    not hold. A body naming ``model`` or ``max_tokens`` twice is sent as the proxy read it."""
    sneaky = (
        b'{"model":"deepseek-v4-pro","max_tokens":393216,"messages":[{"role":"user",'
        b'"content":"hi"}],"model":"deepseek-flash","max_tokens":10}'
    )
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        answer = await http.post("/chat/completions", content=sneaky)
        [record] = await proxy.sink.wait_for(1)
    assert answer.status_code == 200
    [sent] = fake.requests
    assert sent.body.count(b'"model"') == 1 and sent.body.count(b'"max_tokens"') == 1
    assert (sent.json["model"], sent.json["max_tokens"]) == ("deepseek-flash", 10)
    assert record.model_requested == "deepseek-flash"


# --- 5. no compressed-body bomb ------------------------------------------------------------


def gzip_of_zeros(size: int) -> bytes:
    """A gzip body inflating to `size` zero bytes, built piecewise (never `size` in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size // len(block))]
    parts.append(packer.flush())
    return b"".join(parts)


async def test_compressed_bodies_are_refused_unread(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """A compressed body is a 415 without being inflated (before or after auth): bombs sent
    with no key stall nothing, and a valid gzip body is never forwarded inflated."""
    bomb = gzip_of_zeros(256 << 20)
    assert len(bomb) < 1 << 20
    valid = gzip.compress(orjson.dumps(CHAT))
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        bombs = [
            asyncio.create_task(http.post(path, content=bomb, headers={"Content-Encoding": "gzip"}))
            for path in ("/chat/completions", "/v1/chat/completions", "/nope", "/models")
        ]
        # the event loop stays free while the bombs arrive: probes answer at once
        async with asyncio.timeout(5):
            health = [await http.get("/healthz") for _ in range(20)]
        answered = await asyncio.gather(*bombs)
        signed = await http.post(
            "/chat/completions", content=valid, headers={**JSON_AUTH, "Content-Encoding": "gzip"}
        )
        plain = await http.post(
            "/chat/completions",
            content=orjson.dumps(CHAT),
            headers={**JSON_AUTH, "Content-Encoding": "identity"},
        )
    assert {r.status_code for r in health} == {200}
    assert [r.status_code for r in answered] == [401, 401, 404, 405]  # no key: auth first
    assert signed.status_code == 415 and signed.headers["Accept-Encoding"] == "identity"
    assert signed.json()["error"]["code"] == "unsupported_content_encoding"
    assert plain.status_code == 200
    [sent] = fake.requests
    assert "Content-Encoding" not in sent.headers and sent.json == CHAT


# --- 6. secrets stay out of logs and replies ----------------------------------------------

MALFORMED = [
    b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + KEY.encode()
    + bad
    + b"\r\nContent-Length: 2\r\n\r\n{}"
    for bad in (b"\x01", b"\x7f", b"\x00")
] + [
    b"POST /chat/completions HTTP/1.1\nHost: x\nAuthorization: Bearer "
    + KEY.encode()
    + b"\nContent-Length: 2\n\n{}",
    b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + KEY.encode()
    + b"x" * 9000
    + b"\r\nContent-Length: 2\r\n\r\n{}",
]


async def test_malformed_requests_never_echo_the_client_key(
    fake: FakeDeepSeek, proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")  # every logger, every level
    answers = [await raw_request(proxy.url, request, whole=True) for request in MALFORMED]
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"400", b"431"), head
        error = json.loads(body)["error"]
        assert error["message"].startswith("malformed HTTP request: ")
        assert KEY.encode() not in answer and KEY[:12].encode() not in answer
    logged = "\n".join(r.getMessage() + str(r.exc_info) + str(r.args) for r in caplog.records)
    assert KEY not in logged and KEY[:12] not in logged
    assert "malformed HTTP request from 127.0.0.1" in logged
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert fake.requests == []


async def test_non_utf8_authorization_is_a_401(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    answers = [
        await raw_request(
            proxy.url,
            (
                b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: Bearer " + token + b"\r\nContent-Length: 2\r\n\r\n{}"
            ),
            whole=True,
        )
        for token in (b"\xff\xfe", KEY.encode() + b"\xc3\x28", b"sk-\x80proxy")
    ]
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 "), head
        assert json.loads(body)["error"]["code"] == "invalid_api_key"


async def test_upstream_key_echoed_in_a_success_never_reaches_the_client(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """DeepSeek never does this, but if it echoed the key in a 200 (body, stream or header),
    the client would get asterisks of the same length in its place."""
    echo = {"x-echo": f"key={FAKE_UPSTREAM_KEY}"}
    big = "y" * (70 << 10)  # past the one-write path: relayed as it arrives
    fake.enqueue(
        Reply(content=["your key: ", FAKE_UPSTREAM_KEY], usage=SMALL_USAGE, headers=echo),
        Reply(content=["your key: ", FAKE_UPSTREAM_KEY], usage=SMALL_USAGE, headers=echo),
        Reply(content=[big, FAKE_UPSTREAM_KEY, big], usage=SMALL_USAGE, headers=echo),
    )
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        answers = [
            await http.post("/chat/completions", content=orjson.dumps(body))
            for body in (CHAT, STREAM, CHAT)
        ]
    mask = "*" * len(FAKE_UPSTREAM_KEY)
    for answer in answers:
        assert answer.status_code == 200
        assert FAKE_UPSTREAM_KEY not in answer.text and FAKE_UPSTREAM_KEY not in str(answer.headers)
        assert answer.headers["x-echo"] == f"key={mask}"
        assert mask in answer.text
    assert answers[0].json()["choices"][0]["message"]["content"] == f"your key: {mask}"
    assert answers[2].json()["choices"][0]["message"]["content"] == big + mask + big


# --- 7. no client can fill the disk --------------------------------------------------------


async def test_client_and_upstream_strings_are_bounded(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """`model` is stored: over 256 characters or with control characters it is a 400, and
    nothing reaches DeepSeek or the ledger. What DeepSeek sends back and the ledger stores
    (served model, trace id) is bounded too."""
    fake.enqueue(
        Reply(
            raw_body=orjson.dumps({"model": "m" * 100_000, "choices": [], "usage": SMALL_USAGE}),
            headers={"x-ds-trace-id": "t" * 4000},
        ),
        Reply(
            raw_events=[
                b"data: "
                + orjson.dumps(
                    {"model": "\x1b[2J" + "m" * 500_000, "choices": [], "usage": SMALL_USAGE}
                )
                + b"\n\n",
                b"data: [DONE]\n\n",
            ]
        ),
    )
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        refused = [
            await http.post("/chat/completions", content=orjson.dumps({**CHAT, "model": model}))
            for model in ("m" * 257, "deepseek-flash\x1b[2J", "deepseek\nflash", "m" * (900 << 10))
        ]
        ok = await http.post("/chat/completions", content=orjson.dumps(CHAT))
        streamed = await http.post("/chat/completions", content=orjson.dumps(STREAM))
        records = await proxy.sink.wait_for(2)
    assert [r.status_code for r in refused] == [400, 400, 400, 400]
    assert "longer than 256 characters" in refused[0].json()["error"]["message"]
    assert "control" in refused[1].json()["error"]["message"]
    assert ok.status_code == streamed.status_code == 200 and len(fake.requests) == 2
    assert records[0].upstream_trace_id is None
    for record in records:  # the answer's served model, in a body or in a stream
        assert record.model_served is None and "unprintable_upstream_field" in record.flags
        assert record.usage_source == "reported"


# --- 11. a hostile or broken upstream cannot make the bill absurd or the proxy huge ---------


def flash_cost(book: PriceBook, usage: TokenUsage) -> Decimal:
    return price(book, "deepseek-flash", usage, PEAK).costs["CNY"].total


async def test_absurd_usage_is_cut_to_what_the_request_allows(
    fake: FakeDeepSeek, book: PriceBook, proxy: RunningProxy
) -> None:
    """99M cache hits, 99M misses, 99M output tokens and 99M searches on a small call with
    ``max_tokens: 100`` once recorded 495,990 CNY. Each count is now cut to what the request
    allows (its prompt bound and max_tokens, widened by a context window and an output bound
    per server tool call, at most 32 calls per tool) and the record is flagged."""
    absurd = {
        "prompt_tokens": 99_000_000,
        "completion_tokens": 99_000_000,
        "prompt_cache_hit_tokens": 99_000_000,
        "prompt_cache_miss_tokens": 99_000_000,
        "server_tool_use": {"web_search_requests": 99_000_000},
    }
    quiet = {**absurd, "server_tool_use": {}}
    payload = {**CHAT, "max_tokens": 100}
    body = orjson.dumps(payload)
    fake.enqueue(Reply(usage=absurd), Reply(usage=quiet))
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        for _ in range(2):
            assert (await http.post("/chat/completions", content=body)).status_code == 200
        searched, plain = await proxy.sink.wait_for(2)
        counted = proxy.registry.get_sample_value(
            "llm_upstream_anomalies_total", {"reason": "usage_exceeds_bound"}
        )
    assert counted == 2  # and llm_upstream_anomalies_total says so (alert UpstreamAnomalies)
    prompt = len(body) + BASE_TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_ITEM
    context = Limits().max_context_tokens
    cut = TokenUsage(
        cache_hit=prompt + 32 * context, cache_miss=0, output=100 * 33, tool_calls={"search": 32}
    )
    assert (
        searched.cache_hit_tokens,
        searched.cache_miss_tokens,
        searched.output_tokens,
        dict(searched.tool_calls),
    ) == (cut.cache_hit, 0, 3300, {"search": 32})
    assert searched.prompt_tokens == 99_000_000  # as DeepSeek reported it
    assert searched.costs["CNY"] == flash_cost(book, cut) < Decimal(2)
    assert (plain.cache_hit_tokens, plain.cache_miss_tokens, plain.output_tokens) == (
        prompt,
        0,
        100,
    )
    assert plain.costs["CNY"] == flash_cost(book, TokenUsage(cache_hit=prompt, output=100))
    for record in (searched, plain):
        assert "usage_exceeds_bound" in record.flags


async def test_many_tool_names_cannot_widen_the_bound(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """The tool-call cap is for all tools together, so sixteen made-up tool names of 32 calls
    each widen the bound no more than one tool's 32; seventeen names, or one that is not
    short printable text, make the usage untrusted altogether (estimated, flagged)."""
    absurd = {
        "prompt_tokens": 99_000_000,
        "completion_tokens": 99_000_000,
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": 99_000_000,
    }
    sixteen = {f"t{i:02}": 32 for i in range(16)}
    payload = {**CHAT, "max_tokens": 100}
    body = orjson.dumps(payload)
    fake.enqueue(
        Reply(usage={**absurd, "server_tool_use": sixteen}),
        Reply(usage={**absurd, "server_tool_use": {**sixteen, "t16": 1}}),
        Reply(usage={**absurd, "server_tool_use": {"\x1b[2J" + "x" * 100: 1}}),
    )
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        for _ in range(3):
            assert (await http.post("/chat/completions", content=body)).status_code == 200
        capped, *untrusted = await proxy.sink.wait_for(3)
    prompt = len(body) + BASE_TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_ITEM
    assert sum(capped.tool_calls.values()) == 32
    assert dict(capped.tool_calls) == {"t00": 32}  # the cap is shared, in name order
    assert (capped.cache_miss_tokens, capped.output_tokens) == (
        prompt + 32 * Limits().max_context_tokens,
        100 * 33,
    )
    for record in untrusted:
        assert record.usage_source == "estimated" and "malformed_usage" in record.flags
        assert record.tool_calls == {} and not any("\x1b" in f for f in record.flags)


async def test_usage_after_done_is_ignored(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    """Events after ``[DONE]`` are neither billed nor relayed: once, a usage chunk there
    turned a 0.00006 CNY call into 10 CNY."""

    def event(chunk: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-flash",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
    }
    late = {**SMALL_USAGE, "prompt_cache_miss_tokens": 1_000_000, "prompt_tokens": 1_000_000}
    fake.enqueue(
        Reply(
            raw_events=[
                event({**chunk, "usage": SMALL_USAGE}),
                b"data: [DONE]\n\n",
                event({**chunk, "choices": [], "usage": late}),
            ]
        )
    )
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        answer = await http.post("/chat/completions", content=orjson.dumps(STREAM))
        [record] = await proxy.sink.wait_for(1)
        counted = proxy.registry.get_sample_value(
            "llm_upstream_anomalies_total", {"reason": "data_after_done"}
        )
    assert counted == 1
    assert answer.text.endswith("data: [DONE]\n\n") and answer.text.count("usage") == 1
    assert (record.cache_miss_tokens, record.output_tokens) == (36, 7)  # SMALL_USAGE
    assert record.outcome == "complete" and "data_after_done" in record.flags
    # 64 x 0.04 + 36 x 2 + 7 x 8 CNY per million
    assert record.costs["CNY"] == Decimal("0.00013056")


async def test_an_estimate_never_passes_the_output_bound(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """A stream of 60 chunks for ``max_tokens: 10``, cut before its usage: the estimate (one
    token per chunk) stops at 10, what the budget held and what DeepSeek can bill."""
    fake.enqueue(Reply(content=["a"] * 60, usage=SMALL_USAGE, cut_after_events=50))
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        await http.post("/chat/completions", content=orjson.dumps({**STREAM, "max_tokens": 10}))
        [record] = await proxy.sink.wait_for(1)
    assert (record.usage_source, record.output_tokens) == ("estimated", 10)


async def test_endless_event_is_cut_not_buffered(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    """An SSE line that never ends grows to 1 MiB at most: then the client gets an error
    event (no [DONE]) and the record is flagged."""
    fake.enqueue(
        Reply(
            raw_events=[
                b'data: {"id":"c","choices":[],"model":"deepseek-flash"}\n\n',
                b"data: " + b"x" * (3 << 20),
            ]
        )
    )
    async with openai.AsyncOpenAI(base_url=proxy.url, api_key=KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="deepseek-flash", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="cannot read DeepSeek's answer"):
            async for _ in stream:
                pass
        [record] = await proxy.sink.wait_for(1)
    assert record.outcome == "bad_response" and "oversized_event" in record.flags
    assert record.usage_source == "estimated"


async def test_compressed_answers_are_decoded_or_refused(
    fake: FakeDeepSeek, proxy: RunningProxy
) -> None:
    """DeepSeek is asked for identity; a gzip answer anyway is relayed inflated (and metered),
    never as compressed bytes without their header; an encoding the proxy cannot undo is a
    502 that may still be billed."""
    document = orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "model": "deepseek-flash",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": SMALL_USAGE,
        }
    )
    events = (
        b'data: {"id":"c","model":"deepseek-flash","choices":[{"index":0,"delta":'
        b'{"content":"hi"},"finish_reason":"stop"}],"usage":'
        + orjson.dumps(SMALL_USAGE)
        + b"}\n\ndata: [DONE]\n\n"
    )
    gzipped = {"Content-Encoding": "gzip"}
    fake.enqueue(
        Reply(raw_body=gzip.compress(document), headers=gzipped),
        Reply(raw_events=[gzip.compress(events)], headers=gzipped),
        Reply(raw_body=b"\x1b\x00 brotli?", headers={"Content-Encoding": "br"}),
        Reply(status=400, error_body=b"\x1b\x00 brotli error?", headers={"Content-Encoding": "br"}),
    )
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        body = await http.post("/chat/completions", content=orjson.dumps(CHAT))
        stream = await http.post("/chat/completions", content=orjson.dumps(STREAM))
        brotli = await http.post("/chat/completions", content=orjson.dumps(CHAT))
        refused = await http.post("/chat/completions", content=orjson.dumps(CHAT))
        records = await proxy.sink.wait_for(4)
    assert body.content == document and "content-encoding" not in body.headers
    assert stream.content == events and "content-encoding" not in stream.headers
    assert brotli.status_code == 502 and brotli.headers["x-should-retry"] == "false"
    assert brotli.json()["error"]["code"] == "upstream_bad_response"
    # an error needs no metering: relayed as it came, its encoding named, never billed
    assert refused.status_code == 400 and refused.headers["Content-Encoding"] == "br"
    assert [(r.outcome, r.usage_source) for r in records] == [
        ("complete", "reported"),
        ("complete", "reported"),
        ("bad_response", "estimated"),
        ("upstream_error", "none"),
    ]
    assert "undecodable_body" in records[2].flags


async def test_huge_answer_is_metered_from_its_ends(
    fake: FakeDeepSeek, proxy: RunningProxy, tmp_path: Path
) -> None:
    """A 200 body past 4 MiB is relayed whole but kept only by its ends: the usage at its
    end is still found (bounded memory is measured in bench/, with 100 MB bodies)."""
    content = "z" * (12 << 20)
    document = orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "model": "deepseek-flash",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": SMALL_USAGE,
        }
    )
    fake.enqueue(Reply(raw_body=document))
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH, timeout=60) as http:
        answer = await http.post("/chat/completions", content=orjson.dumps(CHAT))
        [record] = await proxy.sink.wait_for(1)
    assert answer.content == document
    assert (record.usage_source, record.cache_miss_tokens, record.output_tokens) == (
        "reported",
        36,
        7,
    )
    assert record.model_served == "deepseek-flash"
    assert "response_body_too_large" in record.flags
