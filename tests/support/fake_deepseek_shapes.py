"""What the fake DeepSeek sends: replies, usage numbers and response bodies, as pure data.

Split from `tests.support.fake_deepseek` (the server) so tests can compute the bytes and usage
the proxy should see without starting anything.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, Literal, get_args

FAKE_UPSTREAM_KEY: Final = "sk-fake-upstream-0000CANARY"
SYSTEM_FINGERPRINT: Final = "fp_eaab8d114b_prod0820_fp8_kvcache"
NONEXISTENT_MODEL: Final = "nonexistent-model"
CACHE_UNIT: Final = 64
"""DeepSeek's context cache stores prefixes in 64-token units, so hits are multiples of 64."""

MODELS: Final = {
    "object": "list",
    "data": [
        {"id": "deepseek-flash", "object": "model", "owned_by": "deepseek"},
        {"id": "deepseek-v4-pro", "object": "model", "owned_by": "deepseek"},
    ],
}
BALANCE: Final = {
    "is_available": True,
    "balance_infos": [
        {
            "currency": "CNY",
            "total_balance": "110.00",
            "granted_balance": "10.00",
            "topped_up_balance": "100.00",
        },
    ],
}

UsagePlacement = Literal["last_chunk", "separate_chunk", "null_chunks_then_separate", "twice"]
USAGE_PLACEMENTS: Final[tuple[str, ...]] = get_args(UsagePlacement)


# status -> (message, type, code). DeepSeek's messages from its error-code table; type and code
# vary between DeepSeek's own bodies, and the proxy must not key logic on them anyway.
_ERRORS: Final[dict[int, tuple[str, str, str]]] = {
    400: ("Invalid Format", "invalid_request_error", "invalid_request_error"),
    401: ("Authentication Fails", "authentication_error", "invalid_request_error"),
    402: ("Insufficient Balance", "unknown_error", "invalid_request_error"),
    422: ("Invalid Parameters", "invalid_request_error", "invalid_request_error"),
    429: ("Rate Limit Reached", "rate_limit_error", "rate_limit_exceeded"),
    500: ("Server Error", "server_error", "internal_error"),
    503: ("Server Overloaded", "server_error", "service_unavailable"),
}


class _Computed(enum.Enum):
    TOKEN = enum.auto()


COMPUTED: Final = _Computed.TOKEN
"""Default of `Reply.usage`: report `default_usage` (distinct from None, which sends none)."""


def _hello() -> list[str]:
    return ["Hello", " world"]


@dataclass
class Reply:
    """How the fake answers one chat or FIM request. Every field is optional.

    ``usage_placement`` (streaming only) reproduces the placements seen in the wild:

    - ``"last_chunk"`` (DeepSeek 2026): usage on the chunk whose ``finish_reason`` is set, whether
      or not ``stream_options.include_usage`` was sent; with ``include_usage: true`` every earlier
      chunk carries ``"usage": null``.
    - ``"separate_chunk"`` (OpenAI style): only with ``include_usage: true``, every choice chunk
      carries ``"usage": null`` and one extra chunk with ``"choices": []`` carries the usage just
      before ``[DONE]``; without it, no usage at all.
    - ``"null_chunks_then_separate"``: every choice chunk has ``"usage": null`` and the separate
      usage chunk is sent even without ``include_usage``.
    - ``"twice"`` (a malformed upstream): usage on the last choice chunk and a separate usage
      chunk carrying `conflicting_usage` of it.

    ``cut_after_events`` counts every ``data:`` event (the role chunk included, ``[DONE]`` never
    sent); for ``raw_events`` it counts list items; for a non-streaming reply any value cuts the
    connection after half the JSON body. A cut request lands in `FakeDeepSeek.cut`.

    Keep-alives (``keepalive``) precede the body in every case, ``raw_body``/``raw_events``
    included; they only replace what the fake would have generated after them.

    The Anthropic Messages and OpenAI Responses endpoints (`tests.support.fake_dialect_shapes`)
    take the same `Reply`: ``content``, ``usage`` (an explicit dict is sent in the dialect's own
    shape, as given), ``server_tool_use``, ``status``/``error_body`` (the default error body is
    in the dialect's shape), ``keepalive``, ``chunk_interval``, ``line_ending``, ``headers``,
    ``raw_body``/``raw_events`` and ``cut_after_events`` (counting named SSE events, pings
    included) mean what they mean for chat. Only the Anthropic endpoint reads the last three:

    - ``cache_fields``: the computed usage carries ``cache_read_input_tokens`` and
      ``cache_creation_input_tokens`` (False: both keys absent, as some upstreams send it);
    - ``pings_after``: a ``ping`` event after each of these counts of other events (the default
      puts one after ``message_start`` and ``content_block_start``, as Anthropic does);
    - ``message_deltas``: how many ``message_delta`` events share the cumulative output count.
    """

    status: int = 200
    error_body: bytes | None = None
    content: list[str] = field(default_factory=_hello)
    reasoning: list[str] = field(default_factory=list)
    usage: dict[str, Any] | _Computed | None = COMPUTED
    usage_placement: UsagePlacement = "last_chunk"
    keepalive: int = 0
    keepalive_interval: float = 0.0
    chunk_interval: float = 0.0
    line_ending: str = "\n"
    cut_after_events: int | None = None
    finish_reason: str = "stop"
    headers: dict[str, str] = field(default_factory=dict)
    server_tool_use: dict[str, Any] | None = None
    redirect_to: str | None = None
    raw_body: bytes | None = None
    raw_events: list[bytes] | None = None
    cache_fields: bool = True
    pings_after: tuple[int, ...] = (2,)
    message_deltas: int = 1

    def __post_init__(self) -> None:
        # A typo here would silently test the wrong placement; fail where the Reply is built.
        if self.usage_placement not in USAGE_PLACEMENTS:
            raise ValueError(
                f"usage_placement must be one of {USAGE_PLACEMENTS}, not {self.usage_placement!r}"
            )
        if self.line_ending not in ("\n", "\r\n"):
            raise ValueError(f"line_ending must be '\\n' or '\\r\\n', not {self.line_ending!r}")
        if self.message_deltas < 1 or any(after < 0 for after in self.pings_after):
            raise ValueError("message_deltas must be at least 1 and pings_after non-negative")


@dataclass
class RecordedRequest:
    """One request as the fake received it; ``id`` is the completion id it answered with (every
    request gets one, so `FakeDeepSeek.finished`/``disconnects`` can name any request; ``msg_...``
    on the Anthropic paths, ``resp_...`` on the Responses paths). ``auth_header`` names the
    header the fake took the key from (``"x-api-key"``, ``"Authorization"``, or None when the
    request carried neither), so a test can tell how a key arrived, not only which."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    id: str
    auth_header: str | None = None


# --- pure helpers: what the fake reports, computable by tests ------------------------------------


def _is_fim(request_json: dict[str, Any]) -> bool:
    return "messages" not in request_json and "prompt" in request_json


def _text_length(content: Any) -> int:
    """Characters of a message ``content``: a string, or OpenAI-style parts with ``text``."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _schema_length(request_json: dict[str, Any]) -> int:
    """Characters of what DeepSeek renders into the prompt beside message text: tool and
    function schemas, a response format, and the tool calls of earlier assistant turns (as
    compact JSON, a stand-in for the chat template)."""
    parts: list[Any] = [
        request_json[name]
        for name in ("tools", "functions", "response_format")
        if request_json.get(name) is not None
    ]
    parts.extend(
        message["tool_calls"]
        for message in request_json.get("messages", [])
        if isinstance(message, dict) and message.get("tool_calls")
    )
    return sum(len(json.dumps(part, separators=(",", ":"))) for part in parts)


def default_usage(request_json: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """The usage the fake reports when `Reply.usage` is not given.

    - ``prompt_tokens``: characters of all message contents and of the tool schemas, response
      format and tool calls (chat), or of ``prompt`` (FIM), divided by 4, plus 1 - a stand-in
      for a tokenizer that is deterministic and grows with input, including the parts of a
      request that are not message text (DeepSeek bills those too).
    - cache hit: half the prompt rounded down to a multiple of 64 (DeepSeek caches in 64-token
      units), so prompts under 256 tokens never hit; miss is the rest.
    - ``completion_tokens``: one token per content piece plus one per reasoning piece (FIM sends
      no reasoning, so counts only content); ``completion_tokens_details.reasoning_tokens`` is the
      reasoning pieces, included in ``completion_tokens`` as DeepSeek does, and omitted when zero.
    - ``server_tool_use`` is `Reply.server_tool_use`, when given.
    """
    fim = _is_fim(request_json)
    if fim:
        chars = _text_length(request_json.get("prompt"))
    else:
        chars = sum(
            _text_length(message.get("content"))
            for message in request_json.get("messages", [])
            if isinstance(message, dict)
        )
        chars += _schema_length(request_json)
    prompt = chars // 4 + 1
    hit = prompt // 2 // CACHE_UNIT * CACHE_UNIT
    reasoning = 0 if fim else len(reply.reasoning)
    completion = len(reply.content) + reasoning
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": hit},
        "prompt_cache_hit_tokens": hit,
        "prompt_cache_miss_tokens": prompt - hit,
    }
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    if reply.server_tool_use is not None:
        usage["server_tool_use"] = dict(reply.server_tool_use)
    return usage


def within_max_tokens(request_json: dict[str, Any], reply: Reply) -> Reply:
    """DeepSeek stops generating at ``max_tokens`` (reasoning included) and says
    ``finish_reason: length``; a reply with computed usage does the same (one token per piece),
    reasoning first. An explicit `Reply.usage` is sent as the test wrote it."""
    limit = request_json.get("max_tokens")
    pieces = len(reply.reasoning) + len(reply.content)
    if type(limit) is not int or limit <= 0 or reply.usage is not COMPUTED or pieces <= limit:
        return reply
    reasoning = reply.reasoning[:limit]
    content = reply.content[: limit - len(reasoning)]
    return dataclasses.replace(reply, reasoning=reasoning, content=content, finish_reason="length")


def reported_usage(request_json: dict[str, Any], reply: Reply) -> dict[str, Any] | None:
    """The usage object the fake sends for this request and reply (None: it sends none).

    An explicit `Reply.usage` is sent as given, with ``server_tool_use`` added when set."""
    if reply.usage is None:
        return None
    if reply.usage is COMPUTED:
        return default_usage(request_json, reply)
    usage = json.loads(json.dumps(reply.usage))  # deep copy: the Reply stays untouched
    if reply.server_tool_use is not None:
        usage["server_tool_use"] = dict(reply.server_tool_use)
    return usage  # type: ignore[no-any-return]


def conflicting_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The second usage of a ``"twice"`` stream: one more completion (and total) token, so a
    test can tell which of the two the proxy kept."""
    second = json.loads(json.dumps(usage))
    second["completion_tokens"] = second.get("completion_tokens", 0) + 1
    second["total_tokens"] = second.get("total_tokens", 0) + 1
    return second  # type: ignore[no-any-return]


def error_body(status: int, *, message: str | None = None, key: str = "") -> bytes:
    """A DeepSeek-shaped error body; for 401 the message echoes the last 4 characters of
    ``key``, as DeepSeek does."""
    default_message, kind, code = _ERRORS.get(
        status, ("", "unknown_error", "invalid_request_error")
    )
    if message is None:
        if status == 401:
            message = f"Authentication Fails, Your api key: ****{key[-4:]} is invalid"
        elif default_message:
            message = default_message
        else:
            try:
                message = HTTPStatus(status).phrase
            except ValueError:
                message = "Error"
    return dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def stream_chunks(
    *,
    completion_id: str,
    created: int,
    model: str,
    reply: Reply,
    usage: dict[str, Any] | None,
    include_usage: bool,
    fim: bool,
) -> list[dict[str, Any]]:
    """Every chunk of a generated stream, in order (``[DONE]`` not included).

    Chat: a role chunk, one chunk per reasoning piece, one per content piece, then the finish
    chunk (``delta: {"content": ""}`` and the finish reason). FIM: one ``text`` chunk per content
    piece, then a finish chunk with empty text. Usage placement as documented on `Reply`."""
    kind = "text_completion" if fim else "chat.completion.chunk"

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": kind,
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }

    def choice(piece: str | dict[str, Any], finish: str | None) -> dict[str, Any]:
        if fim:
            return {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}

    chunks: list[dict[str, Any]] = []
    if fim:
        chunks.extend(chunk([choice(piece, None)]) for piece in reply.content)
        final = chunk([choice("", reply.finish_reason)])
    else:
        chunks.append(chunk([choice({"role": "assistant", "content": ""}, None)]))
        chunks.extend(
            chunk([choice({"reasoning_content": piece, "content": None}, None)])
            for piece in reply.reasoning
        )
        chunks.extend(chunk([choice({"content": piece}, None)]) for piece in reply.content)
        final = chunk([choice({"content": ""}, reply.finish_reason)])

    placement = reply.usage_placement
    nulls = include_usage or placement == "null_chunks_then_separate"
    if nulls:
        for earlier in chunks:
            earlier["usage"] = None
    if placement in ("last_chunk", "twice"):
        if usage is not None or nulls:
            final["usage"] = usage
    elif nulls:
        final["usage"] = None
    chunks.append(final)

    if usage is not None:
        if placement == "twice":
            chunks.append({**chunk([]), "usage": conflicting_usage(usage)})
        elif placement == "null_chunks_then_separate" or (
            placement == "separate_chunk" and include_usage
        ):
            chunks.append({**chunk([]), "usage": usage})
    return chunks


def completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    reply: Reply,
    usage: dict[str, Any] | None,
    fim: bool,
) -> dict[str, Any]:
    """The JSON document of a non-streaming completion (no ``usage`` key when usage is None)."""
    content = "".join(reply.content)
    choice: dict[str, Any]
    if fim:
        choice = {
            "text": content,
            "index": 0,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
    else:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reply.reasoning:
            message["reasoning_content"] = "".join(reply.reasoning)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion" if fim else "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def parse_json(body: bytes) -> Any | None:
    try:
        return json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


# --- the server ----------------------------------------------------------------------------------
