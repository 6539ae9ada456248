"""SSE framing: byte-exact, and the same events however the stream is chunked."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import MAX_EVENT_BYTES, Event, EventTooLarge, SSESplitter

RECORDED = (
    b": keep-alive\n\n"
    b": keep-alive\n\n"
    b'data: {"id":"1","choices":[{"delta":{"role":"assistant","content":""}}],"usage":null}\n\n'
    b'data: {"id":"1","choices":[{"delta":{"reasoning_content":"Hm","content":null}}]}\n\n'
    b'data: {"id":"1","choices":[{"delta":{"content":"Hi \\"usage\\": \\n\\n"}}]}\n\n'
    b'data: {"id":"1","choices":[{"delta":{"content":""},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


def split_all(stream: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    splitter = SSESplitter()
    events: list[Event] = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        events.extend(splitter.feed(stream[previous:cut]))
        previous = cut
    events.extend(splitter.finish())
    return events, splitter.rest()


def test_events_and_data() -> None:
    events, rest = split_all(RECORDED, [])
    assert rest == b""
    assert [e.data for e in events[:2]] == [None, None]
    assert events[-1].data == b"[DONE]"
    assert b"".join(e.raw for e in events) == RECORDED
    assert len(events) == 7


def test_multiline_data_and_other_fields() -> None:
    events, _ = split_all(b"event: x\nid: 3\ndata: a\ndata:b\n\n", [])
    assert events == [Event(b"event: x\nid: 3\ndata: a\ndata:b\n\n", b"a\nb")]


def test_incomplete_tail_is_kept() -> None:
    events, rest = split_all(RECORDED[:-3], [])
    assert events[-1].data != b"[DONE]"
    assert rest == b"data: [DONE"


@settings(max_examples=300)
@given(crlf=st.booleans(), cuts=st.lists(st.integers(0, 2 * len(RECORDED)), max_size=40))
def test_any_rechunking_gives_identical_events(crlf: bool, cuts: list[int]) -> None:
    stream = RECORDED.replace(b"\n", b"\r\n") if crlf else RECORDED
    cuts = [c % (len(stream) + 1) for c in cuts]
    whole, _ = split_all(stream, [])
    chunked, rest = split_all(stream, cuts)
    assert chunked == whole
    assert rest == b""
    assert b"".join(e.raw for e in chunked) == stream
    assert [e.data for e in chunked] == [e.data for e in split_all(RECORDED, [])[0]]


@given(cuts=st.lists(st.integers(0, 100), max_size=10))
def test_bare_cr_line_endings(cuts: list[int]) -> None:
    stream = b"data: a\r\rdata: b\r\r"
    events, rest = split_all(stream, [c % (len(stream) + 1) for c in cuts])
    assert [e.data for e in events] == [b"a", b"b"]
    assert rest == b""


@given(cuts=st.lists(st.integers(0, 3000), max_size=30), crlf=st.booleans())
def test_events_up_to_the_limit_pass_and_one_byte_more_is_cut(cuts: list[int], crlf: bool) -> None:
    """An event may be as large as the limit, however it arrives; an event still open one
    byte past it raises, so an upstream that never ends its line cannot grow memory."""
    ending = b"\r\n" if crlf else b"\n"
    limit = 1000
    event = b"data: " + b"x" * (limit - 6 - 2 * len(ending)) + ending * 2
    assert len(event) == limit
    stream = event + event
    splitter = SSESplitter(limit=limit)
    events: list[Event] = []
    previous = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        events.extend(splitter.feed(stream[previous:cut]))
        previous = cut
    assert [e.raw for e in events] == [event, event]
    endless = SSESplitter(limit=limit)
    endless.feed(b"data: " + b"x" * (limit - 6))
    with pytest.raises(EventTooLarge):
        endless.feed(b"x")


def test_the_shipped_limit_is_one_mebibyte() -> None:
    splitter = SSESplitter()
    for _ in range(MAX_EVENT_BYTES // 4096):
        assert splitter.feed(b"y" * 4096) == []
    with pytest.raises(EventTooLarge, match="1048576 bytes"):
        splitter.feed(b"y")
