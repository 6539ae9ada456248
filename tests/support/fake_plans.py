"""How the fake DeepSeek plans an answer: status, headers and every write, decided up front.

Split from `tests.support.fake_deepseek` (the server) so the socket server and
`tests.support.memory_transport` send the same plan, and every API (chat, FIM, Anthropic
Messages, Responses) frames its keep-alives, events, cuts and JSON bodies the same way.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from tests.support.fake_deepseek_shapes import RecordedRequest, Reply, dumps
from tests.support.fake_dialect_shapes import sse_event


@dataclass(frozen=True, slots=True)
class Write:
    """One write of a response body, after a pause (the fake's pacing, never a test's wait)."""

    delay: float
    data: bytes


@dataclass(slots=True)
class PlannedAnswer:
    """Everything about one answer, decided when the request arrives (`FakeDeepSeek.answer`)."""

    record: RecordedRequest
    status: int
    headers: dict[str, str]
    writes: list[Write]
    cut_at: int | None = None
    """Index of the write before which the connection is cut (len(writes): after the last)."""
    whole: bytes | None = None
    """A body sent in one piece, with its Content-Length (errors, model list, balance)."""


def stream_plan(
    record: RecordedRequest,
    reply: Reply,
    headers: dict[str, str],
    events: list[dict[str, Any]] | list[tuple[str, dict[str, Any]]],
    *,
    done: bytes | None,
) -> PlannedAnswer:
    """A streamed answer: keep-alive comments, then one write per event (``data:`` chunks, or
    named events as (name, data)), then ``done`` unless cut; `Reply.raw_events` replace the
    generated events and ``done``."""
    ending = reply.line_ending
    headers = {
        **headers,
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
    }
    writes = keepalives(reply, b": keep-alive" + ending.encode() * 2)
    if reply.raw_events is not None:
        frames = list(reply.raw_events)
    else:
        frames = [
            sse_event(*event, ending)
            if isinstance(event, tuple)
            else b"data: " + dumps(event) + ending.encode() * 2
            for event in events
        ]
    cut_at = None
    if reply.cut_after_events is not None:
        cut_at = len(writes) + min(reply.cut_after_events, len(frames))
    elif reply.raw_events is None and done is not None:
        frames.append(done + ending.encode() * 2)
    first_delay = reply.keepalive_interval if reply.keepalive else 0.0
    writes += [
        Write(first_delay if index == 0 else reply.chunk_interval, frame)
        for index, frame in enumerate(frames)
    ]
    return PlannedAnswer(record, reply.status, headers, writes, cut_at)


def document_plan(
    record: RecordedRequest, reply: Reply, headers: dict[str, str], document: bytes
) -> PlannedAnswer:
    """A JSON answer after blank keep-alive lines; `Reply.raw_body` replaces ``document``, and
    any ``cut_after_events`` sends half of it, then cuts."""
    headers = {**headers, "Content-Type": "application/json"}
    writes = keepalives(reply, b"\n")
    if reply.raw_body is not None:
        document = reply.raw_body
    cut_at = None
    if reply.cut_after_events is not None:
        document = document[: len(document) // 2]
        cut_at = len(writes) + 1
    writes.append(Write(reply.keepalive_interval if reply.keepalive else 0.0, document))
    return PlannedAnswer(record, reply.status, headers, writes, cut_at)


def json_plan(record: RecordedRequest, value: Any) -> PlannedAnswer:
    headers = {**trace_headers({}), "Content-Type": "application/json"}
    return PlannedAnswer(record, 200, headers, [], whole=dumps(value))


def error_plan(
    record: RecordedRequest, status: int, body: bytes, extra: dict[str, str]
) -> PlannedAnswer:
    headers = trace_headers(extra)
    if body:
        headers["Content-Type"] = "application/json"
    return PlannedAnswer(record, status, headers, [], whole=body)


def keepalives(reply: Reply, line: bytes) -> list[Write]:
    return [
        Write(reply.keepalive_interval if index else 0.0, line) for index in range(reply.keepalive)
    ]


def trace_headers(extra: dict[str, str]) -> dict[str, str]:
    """DeepSeek's trace id header (it sends no x-request-id), then the Reply's extra headers."""
    return {"x-ds-trace-id": uuid.uuid4().hex, **extra}
