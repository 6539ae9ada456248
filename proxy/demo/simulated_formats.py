"""The simulated DeepSeek's answers in Anthropic's Messages format and the OpenAI Responses
API (`proxy.demo.simulated_deepseek`): documents and named stream events built from one
call's text and its chat-format usage, so all three formats of a call report the same tokens.
Pure: the server decides the text and the usage, these only give them each format's shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

Events = list[tuple[str, dict[str, Any]]]
"""A named event stream: (``event:`` name, ``data:`` object without its ``type``)."""


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def anthropic_message(model: str, answer: str, chat: dict[str, Any]) -> dict[str, Any]:
    """The whole ``message``; Anthropic's usage: ``input_tokens`` excludes the cache reads."""
    usage = {
        "input_tokens": chat["prompt_cache_miss_tokens"],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": chat["prompt_cache_hit_tokens"],
        "output_tokens": chat["completion_tokens"],
    }
    return {
        "id": _id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": answer}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def anthropic_events(message: dict[str, Any], pieces: list[str]) -> Events:
    """``message_start`` (the input side, 1 output token so far), a text block of `pieces`
    with a ``ping``, ``message_delta`` (the cumulative output) and ``message_stop``."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events: Events = [
        ("message_start", {"message": start}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
    ]
    events += [
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
        for piece in pieces
    ]
    events += [
        ("content_block_stop", {"index": 0}),
        (
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        ),
        ("message_stop", {}),
    ]
    return events


def response_object(model: str, answer: str, chat: dict[str, Any], thinks: bool) -> dict[str, Any]:
    """The whole ``response``: a reasoning item when it thought, then the message; usage with
    the cached tokens inside ``input_tokens`` and the reasoning inside ``output_tokens``."""
    usage = {
        "input_tokens": chat["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": chat["prompt_cache_hit_tokens"]},
        "output_tokens": chat["completion_tokens"],
        "output_tokens_details": {
            "reasoning_tokens": chat["completion_tokens_details"]["reasoning_tokens"]
        },
        "total_tokens": chat["total_tokens"],
    }
    text = {"type": "output_text", "text": answer, "annotations": []}
    item = {
        "type": "message",
        "id": _id("msg"),
        "status": "completed",
        "role": "assistant",
        "content": [text],
    }
    thought = {"type": "reasoning", "id": _id("rs"), "summary": []}
    return {
        "id": _id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": model,
        "output": [thought, item] if thinks else [item],
        "usage": usage,
    }


def response_events(response: dict[str, Any], pieces: list[str]) -> Events:
    """The ``response.*`` events of `response`'s message, numbered, ending with
    ``response.completed``, which carries the usage."""
    index = len(response["output"]) - 1
    item = response["output"][index]
    text = item["content"][0]
    at = {"output_index": index, "content_index": 0}
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    events: Events = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        (
            "response.output_item.added",
            {"output_index": index, "item": {**item, "status": "in_progress", "content": []}},
        ),
        ("response.content_part.added", {**at, "part": {**text, "text": ""}}),
    ]
    events += [
        ("response.output_text.delta", {**at, "item_id": item["id"], "delta": piece})
        for piece in pieces
    ]
    events += [
        ("response.output_text.done", {**at, "item_id": item["id"], "text": text["text"]}),
        ("response.content_part.done", {**at, "part": text}),
        ("response.output_item.done", {"output_index": index, "item": item}),
        ("response.completed", {"response": response}),
    ]
    for number, (_, data) in enumerate(events):
        data["sequence_number"] = number
    return events
