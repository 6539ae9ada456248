"""What the fake DeepSeek sends on its Anthropic Messages and OpenAI Responses endpoints.

Pure data, like `tests.support.fake_deepseek_shapes` (chat and FIM): tests can compute the
bodies, events and usage the proxy should see without starting the server.

The shapes are Anthropic's and OpenAI's own (``/work/shared/deepseek-api.md``, sections
"Anthropic format" and "Responses API"), checked against the real ``anthropic`` and ``openai``
SDKs in ``tests/integration/test_fake_deepseek_dialects.py``. Usage definitions differ:

- Anthropic: ``input_tokens`` EXCLUDES cache reads and writes (prompt = input + cache read +
  cache creation); a stream reports the input side in ``message_start`` and the CUMULATIVE
  ``output_tokens`` in each ``message_delta``.
- Responses: ``input_tokens_details.cached_tokens`` is PART of ``input_tokens`` and
  ``output_tokens_details.reasoning_tokens`` PART of ``output_tokens``.

Both count the prompt as the chat default does (characters / 4 + 1, cache hits in 64-token
units) and one output token per content or reasoning piece. Reasoning pieces are counted, not
sent: the fake does not model thinking blocks or reasoning items yet.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Final

from tests.support.fake_deepseek_shapes import (
    CACHE_UNIT,
    COMPUTED,
    NONEXISTENT_MODEL,
    Reply,
    dumps,
    error_body,
)

# Anthropic's error types by status (docs.anthropic.com "Errors"); DeepSeek's 503 "Server
# Overloaded" is Anthropic's overloaded_error.
_ANTHROPIC_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# DeepSeek's messages for the statuses it documents; the shape around them is Anthropic's.
_DEEPSEEK_MESSAGES: Final[dict[int, str]] = {
    400: "Invalid Format",
    402: "Insufficient Balance",
    422: "Invalid Parameters",
    429: "Rate Limit Reached",
    500: "Server Error",
    503: "Server Overloaded",
}
# The chat finish reasons a `Reply` speaks, as Anthropic stop reasons.
_STOP_REASONS: Final[dict[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}

Rejection = tuple[int, bytes]
"""A request refused before it takes a `Reply`: status and body."""


# --- shared ----------------------------------------------------------------------------------


def _text_of(content: Any) -> int:
    """Characters of a content value: a string, or blocks/parts/items carrying ``text`` or a
    nested ``content``."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    total += len(part["text"])
                elif "content" in part:
                    total += _text_of(part["content"])
        return total
    return 0


def _prompt_tokens(chars: int, request_json: dict[str, Any]) -> tuple[int, int]:
    """Prompt tokens and cache hits, as `default_usage` counts them for chat."""
    if request_json.get("tools") is not None:
        chars += len(json.dumps(request_json["tools"], separators=(",", ":")))
    prompt = chars // 4 + 1
    return prompt, prompt // 2 // CACHE_UNIT * CACHE_UNIT


def _explicit(reply: Reply) -> dict[str, Any] | None:
    """`Reply.usage` as given (deep copy), ``server_tool_use`` added when set."""
    if reply.usage is None or reply.usage is COMPUTED:
        return None
    usage: dict[str, Any] = json.loads(json.dumps(reply.usage))
    if reply.server_tool_use is not None:
        usage["server_tool_use"] = dict(reply.server_tool_use)
    return usage


def sse_event(name: str, data: dict[str, Any], ending: str = "\n") -> bytes:
    """One named SSE event, as Anthropic and OpenAI frame them (``event:`` then ``data:``)."""
    return f"event: {name}{ending}data: ".encode() + dumps(data) + (ending * 2).encode()


def _missing(body: Any, fields: tuple[str, ...]) -> str | None:
    """Why a body is refused: not an object, or the first missing field (None: accepted)."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    for name in fields:
        if name not in body:
            return f"{name}: Field required"
    return None


# --- Anthropic Messages ----------------------------------------------------------------------


def anthropic_error_body(status: int, *, message: str | None = None, key: str = "") -> bytes:
    """Anthropic's error shape around DeepSeek's message; a 401 echoes the key's last 4
    characters, as DeepSeek's own 401 does."""
    if message is None:
        if status == 401:
            message = f"Authentication Fails, Your api key: ****{key[-4:]} is invalid"
        elif status in _DEEPSEEK_MESSAGES:
            message = _DEEPSEEK_MESSAGES[status]
        else:
            try:
                message = HTTPStatus(status).phrase
            except ValueError:
                message = "Error"
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return dumps({"type": "error", "error": {"type": kind, "message": message}})


def validate_anthropic(body: Any) -> Rejection | None:
    """Anthropic's checks that matter here: a JSON object with ``model``, ``messages`` and
    ``max_tokens`` (all mandatory in the Messages API), else 400 ``invalid_request_error``.
    Any model name is served: DeepSeek's Anthropic guide says a name it does not support
    (``nonexistent-model`` included) is answered by deepseek-v4-flash, not refused; the
    answer names the model asked for."""
    reason = _missing(body, ("model", "messages", "max_tokens"))
    if reason is not None:
        return 400, anthropic_error_body(400, message=reason)
    return None


def default_anthropic_usage(request_json: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """The usage when `Reply.usage` is not given: the prompt counted over ``system``,
    ``messages`` and ``tools``; cache reads as chat's hits, cache creation 0 (what DeepSeek has
    been seen to report); ``input_tokens`` the rest. When `Reply.cache_fields` is False both
    cache fields are left out and ``input_tokens`` is the whole prompt, so that
    prompt = input + cache read + cache creation still holds for what was sent."""
    chars = _text_of(request_json.get("system"))
    chars += sum(
        _text_of(message.get("content"))
        for message in request_json.get("messages", [])
        if isinstance(message, dict)
    )
    prompt, hit = _prompt_tokens(chars, request_json)
    usage: dict[str, Any] = {"input_tokens": prompt - hit if reply.cache_fields else prompt}
    if reply.cache_fields:
        usage["cache_creation_input_tokens"] = 0
        usage["cache_read_input_tokens"] = hit
    usage["output_tokens"] = len(reply.content) + len(reply.reasoning)
    if reply.server_tool_use is not None:
        usage["server_tool_use"] = dict(reply.server_tool_use)
    return usage


def anthropic_usage(request_json: dict[str, Any], reply: Reply) -> dict[str, Any] | None:
    """The usage object sent (None: none): `Reply.usage` as given, else the default."""
    if reply.usage is COMPUTED:
        return default_anthropic_usage(request_json, reply)
    return _explicit(reply)


def stop_reason(reply: Reply) -> str:
    return _STOP_REASONS.get(reply.finish_reason, reply.finish_reason)


def anthropic_message(
    *, message_id: str, model: str, reply: Reply, usage: dict[str, Any] | None
) -> dict[str, Any]:
    """A non-streaming Messages answer (no ``usage`` key when usage is None)."""
    body: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "".join(reply.content)}],
        "stop_reason": stop_reason(reply),
        "stop_sequence": None,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def anthropic_events(
    *, message_id: str, model: str, reply: Reply, usage: dict[str, Any] | None
) -> list[tuple[str, dict[str, Any]]]:
    """Every event of a Messages stream, in order, as (event name, data).

    ``message_start`` carries the input side of the usage and ``output_tokens`` of at most 1;
    one text block gets a ``text_delta`` per content piece; `Reply.message_deltas` events
    ``message_delta`` share the output tokens CUMULATIVELY (the last carries the total, the stop
    reason and ``server_tool_use``; earlier ones a null stop reason); then ``message_stop``.
    A ``ping`` goes after each count of generated events in `Reply.pings_after`."""
    events: list[tuple[str, dict[str, Any]]] = []
    start: dict[str, Any] = {
        **anthropic_message(message_id=message_id, model=model, reply=reply, usage=None),
        "content": [],
        "stop_reason": None,
    }
    output = 0
    if usage is not None:
        output = int(usage.get("output_tokens", 0))
        start["usage"] = {
            **{name: value for name, value in usage.items() if name != "server_tool_use"},
            "output_tokens": min(output, 1),
        }
    events.append(("message_start", {"type": "message_start", "message": start}))
    block = {"type": "text", "text": ""}
    events.append(
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
    )
    events.extend(
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
        for piece in reply.content
    )
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    for number in range(1, reply.message_deltas + 1):
        last = number == reply.message_deltas
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(reply) if last else None, "stop_sequence": None},
        }
        if usage is not None:
            delta["usage"] = {"output_tokens": output * number // reply.message_deltas}
            if last and "server_tool_use" in usage:
                delta["usage"]["server_tool_use"] = usage["server_tool_use"]
        events.append(("message_delta", delta))
    events.append(("message_stop", {"type": "message_stop"}))
    for after in sorted(reply.pings_after, reverse=True):
        events.insert(min(after, len(events)), ("ping", {"type": "ping"}))
    return events


# --- OpenAI Responses ------------------------------------------------------------------------


def validate_responses(body: Any) -> Rejection | None:
    """A JSON object with ``model`` (``input`` may come from elsewhere in OpenAI's API, and
    ``max_output_tokens`` is optional), else 400 in OpenAI's error shape."""
    reason = _missing(body, ("model",))
    if reason is not None:
        return 400, error_body(400, message=f"Invalid Format: {reason}")
    if body["model"] == NONEXISTENT_MODEL:
        return 400, error_body(400, message="Model Not Exist")
    return None


def default_responses_usage(request_json: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """The usage when `Reply.usage` is not given: the prompt counted over ``instructions``,
    ``input`` (a string or items) and ``tools``; cached tokens as chat's hits, inside
    ``input_tokens``; reasoning pieces inside ``output_tokens``."""
    chars = _text_of(request_json.get("instructions")) + _text_of(request_json.get("input"))
    prompt, hit = _prompt_tokens(chars, request_json)
    output = len(reply.content) + len(reply.reasoning)
    usage: dict[str, Any] = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": hit},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": len(reply.reasoning)},
        "total_tokens": prompt + output,
    }
    if reply.server_tool_use is not None:
        usage["server_tool_use"] = dict(reply.server_tool_use)
    return usage


def responses_usage(request_json: dict[str, Any], reply: Reply) -> dict[str, Any] | None:
    """The usage object sent (None: ``"usage": null``): `Reply.usage` as given, else the
    default."""
    if reply.usage is COMPUTED:
        return default_responses_usage(request_json, reply)
    return _explicit(reply)


def response_object(
    *,
    response_id: str,
    item_id: str,
    created_at: int,
    request_json: dict[str, Any],
    reply: Reply,
    usage: dict[str, Any] | None,
    done: bool = True,
) -> dict[str, Any]:
    """A Response as OpenAI sends it: completed with its message and usage (``done``), or in
    progress with no output yet (the first two stream events)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "completed" if done else "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": request_json.get("instructions"),
        "max_output_tokens": request_json.get("max_output_tokens"),
        "model": request_json["model"],
        "output": [output_message(item_id, reply)] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage if done else None,
        "user": None,
        "metadata": {},
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_message(item_id: str, reply: Reply, *, done: bool = True) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [_output_text("".join(reply.content))] if done else [],
    }


def responses_events(
    *,
    response_id: str,
    item_id: str,
    created_at: int,
    request_json: dict[str, Any],
    reply: Reply,
    usage: dict[str, Any] | None,
) -> list[tuple[str, dict[str, Any]]]:
    """Every event of a Responses stream, in OpenAI's order, each with its ``type`` and a
    ``sequence_number`` from 0; the usage rides only on ``response.completed``."""

    def response(done: bool) -> dict[str, Any]:
        return response_object(
            response_id=response_id,
            item_id=item_id,
            created_at=created_at,
            request_json=request_json,
            reply=reply,
            usage=usage,
            done=done,
        )

    text = "".join(reply.content)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    bodies: list[dict[str, Any]] = [
        {"type": "response.created", "response": response(done=False)},
        {"type": "response.in_progress", "response": response(done=False)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": output_message(item_id, reply, done=False),
        },
        {"type": "response.content_part.added", **where, "part": _output_text("")},
        *(
            {"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []}
            for piece in reply.content
        ),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": _output_text(text)},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": output_message(item_id, reply),
        },
        {"type": "response.completed", "response": response(done=True)},
    ]
    return [
        (body["type"], {**body, "sequence_number": number}) for number, body in enumerate(bodies)
    ]
