"""The stream filter (`proxy.metering.StreamMeter.inspect`): what each SSE event teaches the
meter, and which events reach the client.

Events are cut from bytes by the real `SSESplitter`, as the relay cuts them."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.config import Limits
from proxy.metering import (
    FLAG_AFTER_DONE,
    FLAG_BAD_UPSTREAM_TEXT,
    FLAG_MALFORMED_CHUNK,
    FLAG_MALFORMED_USAGE,
    FLAG_USAGE_TWICE,
    CallMeter,
    StreamMeter,
)
from proxy.relay.request import usage_option, wants_usage
from proxy.sse import Event, SSESplitter
from proxy.usage import DEFAULT_TOOL_FIELDS, TokenUsage
from tests.support.calls import call_meter
from tests.support.requests import SMALL_USAGE, STREAM

LIMITS = Limits()


def meter() -> CallMeter:
    return call_meter(stream=True, payload=STREAM)


def event(raw: bytes) -> Event:
    """The one complete event in `raw`."""
    [only] = SSESplitter().feed(raw)
    return only


def data(body: dict[str, Any]) -> Event:
    return event(b"data: " + orjson.dumps(body) + b"\n\n")


def chunk(content: str, *, usage: object = None, with_usage_key: bool = False) -> Event:
    """A content chunk as DeepSeek streams it; with include_usage, ``"usage": null`` on it."""
    body: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "deepseek-flash",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    if usage is not None or with_usage_key:
        body["usage"] = usage
    return data(body)


def usage_only(usage: object) -> Event:
    return data({"id": "c1", "model": "deepseek-flash", "choices": [], "usage": usage})


def inspect_all(stream: StreamMeter, *events: Event) -> list[bool]:
    return [stream.inspect(each) for each in events]


SMALL = TokenUsage(cache_hit=64, cache_miss=36, output=7)
DONE = event(b"data: [DONE]\n\n")
KEEP_ALIVE = event(b": keep-alive\n\n")


def test_keep_alive_comments_pass_and_teach_nothing() -> None:
    call = meter()
    stream = StreamMeter(call, False, DEFAULT_TOOL_FIELDS)
    assert inspect_all(stream, KEEP_ALIVE, KEEP_ALIVE) == [True, True]
    assert (call.model_served, call.output_chunks, call.reported, call.flags) == (None, 0, None, [])
    assert not stream.done


def test_content_chunks_are_counted_and_the_first_names_the_served_model() -> None:
    call = meter()
    stream = StreamMeter(call, False, DEFAULT_TOOL_FIELDS)
    forwarded = inspect_all(
        stream, chunk("Hel"), chunk("lo", with_usage_key=True), KEEP_ALIVE, chunk(" world")
    )
    assert forwarded == [True, True, True, True]
    assert (call.model_served, call.output_chunks, call.reported) == ("deepseek-flash", 3, None)


def test_usage_on_the_last_content_chunk_is_taken_and_the_chunk_forwarded() -> None:
    """DeepSeek 2026 puts usage on the last content chunk, asked or not."""
    call = meter()
    stream = StreamMeter(call, False, DEFAULT_TOOL_FIELDS)
    assert inspect_all(stream, chunk("Hi"), chunk("!", usage=SMALL_USAGE), DONE) == [
        True,
        True,
        True,
    ]
    assert call.reported is not None
    assert (call.reported.tokens, call.reported.prompt_tokens) == (SMALL, 100)
    assert (call.output_chunks, call.flags, stream.done) == (2, [], True)


@pytest.mark.parametrize("asked", [True, False])
def test_a_usage_only_chunk_reaches_only_a_client_that_asked(asked: bool) -> None:
    """The proxy sets include_usage on every stream; the usage-only chunk that follows exists
    because of that, so a client that did not ask never sees it. Its usage is taken anyway,
    and it is not an output chunk."""
    call = meter()
    stream = StreamMeter(call, asked, DEFAULT_TOOL_FIELDS)
    forwarded = inspect_all(stream, chunk("Hi", with_usage_key=True), usage_only(SMALL_USAGE), DONE)
    assert forwarded == [True, asked, True]
    assert call.reported is not None and call.reported.tokens == SMALL
    assert call.output_chunks == 1


def test_null_usage_chunks_are_content_not_usage() -> None:
    """With include_usage DeepSeek writes ``"usage": null`` on every other chunk, with or
    without a space; and text that mentions "usage" is escaped inside its JSON string."""
    call = meter()
    stream = StreamMeter(call, False, DEFAULT_TOOL_FIELDS)
    spaced = event(
        b'data: {"model": "deepseek-flash", "choices": [{"delta": {"content": "x"}}], '
        b'"usage": null}\n\n'
    )
    forwarded = inspect_all(
        stream, chunk("a"), spaced, chunk('the "usage" key'), chunk("b", with_usage_key=True)
    )
    assert forwarded == [True, True, True, True]
    assert (call.output_chunks, call.reported, call.flags) == (4, None, [])


def test_done_ends_the_stream_and_nothing_after_it_counts_or_reaches_the_client() -> None:
    call = meter()
    stream = StreamMeter(call, True, DEFAULT_TOOL_FIELDS)
    late = {**SMALL_USAGE, "prompt_cache_miss_tokens": 1_000_000, "prompt_tokens": 1_000_064}
    forwarded = inspect_all(
        stream,
        chunk("Hi", usage=SMALL_USAGE),
        DONE,
        KEEP_ALIVE,
        usage_only(late),
        chunk("more"),
        DONE,
    )
    assert forwarded == [True, True, False, False, False, False]
    assert stream.done
    assert call.reported is not None and call.reported.tokens == SMALL
    assert (call.output_chunks, call.flags) == (1, [FLAG_AFTER_DONE])


def test_a_comment_after_done_is_dropped_without_a_flag() -> None:
    call = meter()
    stream = StreamMeter(call, False, DEFAULT_TOOL_FIELDS)
    assert inspect_all(stream, DONE, KEEP_ALIVE) == [True, False]
    assert call.flags == []


def test_an_error_event_is_forwarded_as_it_came_and_teaches_no_usage() -> None:
    """DeepSeek can end a stream with an error object instead of a chunk: the client gets it
    unchanged; it names no model and carries no usage, and is relayed as a data event."""
    call = meter()
    stream = StreamMeter(call, False, DEFAULT_TOOL_FIELDS)
    error = data({"error": {"message": "Server busy", "type": "server_error", "code": None}})
    assert inspect_all(stream, error) == [True]
    assert (call.model_served, call.reported, call.flags, call.output_chunks) == (None, None, [], 1)


def test_an_unparsable_chunk_is_forwarded_and_flagged() -> None:
    call = meter()
    stream = StreamMeter(call, False, DEFAULT_TOOL_FIELDS)
    assert inspect_all(stream, event(b"data: {not json\n\n"), data({"n": 1})) == [True, True]
    assert call.flags == [FLAG_MALFORMED_CHUNK]
    assert stream.inspect(event(b"data: [1, 2]\n\n"))  # JSON, but not an object: passed on
    assert call.flags == [FLAG_MALFORMED_CHUNK]


def test_a_second_different_usage_wins_and_is_flagged() -> None:
    call = meter()
    stream = StreamMeter(call, True, DEFAULT_TOOL_FIELDS)
    bigger = {**SMALL_USAGE, "completion_tokens": 9, "total_tokens": 109}
    inspect_all(stream, chunk("a", usage=SMALL_USAGE), usage_only(SMALL_USAGE), usage_only(bigger))
    assert call.reported is not None
    assert call.reported.tokens == TokenUsage(cache_hit=64, cache_miss=36, output=9)
    assert call.flags == [FLAG_USAGE_TWICE]


def test_malformed_usage_is_flagged_and_not_taken() -> None:
    call = meter()
    stream = StreamMeter(call, True, DEFAULT_TOOL_FIELDS)
    assert inspect_all(stream, chunk("a"), usage_only({"prompt_tokens": -5})) == [True, True]
    assert (call.reported, call.flags) == (None, [FLAG_MALFORMED_USAGE])


def test_an_unprintable_served_model_is_not_kept() -> None:
    call = meter()
    stream = StreamMeter(call, False, DEFAULT_TOOL_FIELDS)
    hostile = data({"model": "\x1b[2Jdeepseek", "choices": [{"delta": {"content": "a"}}]})
    assert stream.inspect(hostile)
    assert (call.model_served, call.flags) == (None, [FLAG_BAD_UPSTREAM_TEXT])


@pytest.mark.parametrize(
    ("options", "asked"),
    [
        ({"include_usage": True}, True),
        ({"include_usage": False}, False),
        ({"include_usage": "true"}, False),  # only JSON true asks
        ({}, False),
        (None, False),
        ("include_usage", False),
    ],
)
def test_whether_the_client_asked_for_usage(options: object, asked: bool) -> None:
    """What `StreamMeter` is told as `wants_usage`, read from the request before the proxy
    adds include_usage itself."""
    payload = dict(STREAM) if options is None else {**STREAM, "stream_options": options}
    assert wants_usage(payload) is asked
    added = usage_option(payload)
    if asked:
        assert added == {}
    else:
        kept = options if isinstance(options, dict) else {}
        assert added == {"stream_options": {**kept, "include_usage": True}}
