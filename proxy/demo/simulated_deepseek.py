"""A SIMULATED DeepSeek API, for ``python -m proxy demo`` only: no model runs, nothing is billed.

It exists so that a newcomer can watch the whole path (client -> proxy -> upstream -> ledger ->
report -> metrics) without a DeepSeek key. ``serve`` never uses it. It is not the test fake
either (``tests/support/fake_deepseek.py`` reproduces DeepSeek's failure modes for the tests);
this one only answers well, in DeepSeek's 2026 shapes (``/work/shared/deepseek-api.md``):

- ``POST /chat/completions`` and ``/beta/chat/completions``: a JSON ``chat.completion``, or with
  ``"stream": true`` one ``: keep-alive`` comment, then ``data: {chunk}`` events and
  ``data: [DONE]``. The usage rides on the last chunk (``finish_reason: "stop"``); earlier chunks
  carry ``"usage": null`` when ``stream_options.include_usage`` is set.
- ``POST /beta/completions`` (FIM): the same as ``text_completion`` objects.
- ``POST /anthropic/v1/messages``: Anthropic's Messages format (a ``message``, or with
  ``"stream": true`` the ``message_start`` ... ``message_stop`` events, a ``ping`` among them);
  usage is Anthropic's (``input_tokens`` excludes ``cache_read_input_tokens``). Any model name
  is served, as DeepSeek's Anthropic endpoint serves names it does not support (``claude-*``
  included) instead of refusing them.
- ``POST /responses``: the OpenAI Responses API (a ``response``, or its ``response.*`` events
  ending with ``response.completed``, which carries the usage; ``cached_tokens`` is part of
  ``input_tokens``, ``reasoning_tokens`` of ``output_tokens``).
- ``GET /models``.
- Thinking is on unless the body says ``"thinking": {"type": "disabled"}`` (DeepSeek's 2026
  default): the answer then carries ``reasoning_content``, and its tokens are counted in
  ``completion_tokens_details.reasoning_tokens`` and, as DeepSeek does, inside
  ``completion_tokens``. FIM never thinks.
- Anything but ``Authorization: Bearer <the key it was started with>`` (or, on the Anthropic
  route, ``x-api-key: <key>``) is a 401.

Usage is a pure function of the requests seen so far, so the demo's report is the same on every
run: text costs ``characters // 4 + 1`` tokens (the prompt is every message's text joined by
newlines, or FIM's prompt and suffix; Anthropic's ``system`` and the Responses API's
``instructions`` come first). DeepSeek caches prompt prefixes in 64-token units; here a
unit is 256 characters, and a prompt's cache hit is 64 tokens for each leading 256-character
block whose whole prefix the same model saw before (the rest of the prompt is a miss).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from proxy.demo.simulated_formats import (
    anthropic_events,
    anthropic_message,
    response_events,
    response_object,
)

MODELS: Final = ("deepseek-flash", "deepseek-v4-pro")
CHARS_PER_TOKEN: Final = 4
CACHE_UNIT_TOKENS: Final = 64
FINGERPRINT: Final = "fp_simulated_demo"
_KEY = web.AppKey("simulated_api_key", str)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def count_tokens(text: str) -> int:
    """The simulation's tokenizer: one token per four characters, plus one."""
    return len(text) // CHARS_PER_TOKEN + 1


class _Refused(Exception):
    """A request DeepSeek would refuse; rendered in DeepSeek's error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@web.middleware
async def _auth_and_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if request.path.startswith("/anthropic/") and "x-api-key" in request.headers:
            token = request.headers["x-api-key"].strip()
        if token != request.app[_KEY]:
            # DeepSeek's 401 echoes the last four characters of the key it was given.
            raise _Refused(401, f"Authentication Fails, Your api key: ****{token[-4:]} is invalid")
        return await handler(request)
    except _Refused as exc:
        return web.json_response(
            {
                "error": {
                    "message": exc.message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_request_error",
                }
            },
            status=exc.status,
        )


class SimulatedDeepSeek:
    """The simulated upstream on 127.0.0.1 (random port). `start`, then `close`."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key
        self._seen: set[tuple[str, bytes]] = set()
        """(model, SHA-256 of a cached prefix): the simulated context cache."""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Listen on a free loopback port; returns the base URL (``http://127.0.0.1:PORT``)."""
        app = web.Application(middlewares=[_auth_and_errors])
        app[_KEY] = self._api_key
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_post("/beta/chat/completions", self._chat)
        app.router.add_post("/beta/completions", self._fim)
        app.router.add_post("/anthropic/v1/messages", self._messages)
        app.router.add_post("/responses", self._responses)
        app.router.add_get("/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def usage(self, model: str, prompt: str, output: str, reasoning: str) -> dict[str, Any]:
        """DeepSeek's usage object for one call; remembers the prompt's prefixes (cache)."""
        unit = CACHE_UNIT_TOKENS * CHARS_PER_TOKEN
        blocks = [
            (model, hashlib.sha256(prompt[:end].encode()).digest())
            for end in range(unit, len(prompt) + 1, unit)
        ]
        cached = 0
        while cached < len(blocks) and blocks[cached] in self._seen:
            cached += 1
        self._seen.update(blocks)
        prompt_tokens, hit = count_tokens(prompt), cached * CACHE_UNIT_TOKENS
        thought = count_tokens(reasoning) if reasoning else 0
        completion = count_tokens(output) + thought
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": hit},
            "prompt_cache_hit_tokens": hit,
            "prompt_cache_miss_tokens": prompt_tokens - hit,
            "completion_tokens_details": {"reasoning_tokens": thought},
        }

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = await _payload(request)
        messages = payload.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) for m in messages)
        ):
            raise _Refused(422, "Invalid Parameters: messages must be a non-empty list")
        prompt = "\n".join(_text(m.get("content")) for m in messages)
        thinking = payload.get("thinking")
        thinks = not (isinstance(thinking, dict) and thinking.get("type") == "disabled")
        words = " ".join(_text(messages[-1].get("content")).split()[:8])
        answer = f"Simulated answer (no model ran) to: {words}"
        reasoning = (
            f"The user asks: {words}. A real model would reason here; the simulation "
            "only counts these tokens."
            if thinks
            else ""
        )
        usage = self.usage(payload["model"], prompt, answer, reasoning)
        base = _base(payload["model"], "chat.completion")
        if payload.get("stream") is not True:
            message = {
                "role": "assistant",
                "content": answer,
                **({"reasoning_content": reasoning} if thinks else {}),
            }
            return _json(
                {
                    **base,
                    "choices": [
                        {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            )
        deltas: list[dict[str, Any]] = [{"delta": {"role": "assistant", "content": ""}}]
        deltas += [
            {"delta": {"content": None, "reasoning_content": piece}} for piece in _pieces(reasoning)
        ]
        deltas += [{"delta": {"content": piece}} for piece in _pieces(answer)]
        deltas.append({"delta": {"content": ""}})
        return await _stream(
            request,
            {**base, "object": "chat.completion.chunk"},
            deltas,
            usage,
            _wants_usage(payload),
        )

    async def _fim(self, request: web.Request) -> web.StreamResponse:
        payload = await _payload(request)
        prompt, suffix = payload.get("prompt"), payload.get("suffix", "")
        if not isinstance(prompt, str) or not isinstance(suffix, str):
            raise _Refused(422, "Invalid Parameters: prompt and suffix must be strings")
        text = f"    pass  # simulated completion between {len(prompt)} and {len(suffix)} chars\n"
        usage = self.usage(payload["model"], prompt + suffix, text, "")
        base = _base(payload["model"], "text_completion")
        if payload.get("stream") is not True:
            return _json(
                {
                    **base,
                    "choices": [
                        {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            )
        pieces = [{"text": piece} for piece in _pieces(text)] + [{"text": ""}]
        return await _stream(request, base, pieces, usage, _wants_usage(payload))

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages format. No thinking: the demo's agents do not ask for it."""
        payload = await _payload(request, any_model=True)
        messages = payload.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _Refused(400, "messages: Input should be a valid list")
        if not isinstance(payload.get("max_tokens"), int):
            raise _Refused(400, "max_tokens: Field required")
        prompt = "\n".join(
            [_text(payload.get("system")), *(_text(m.get("content")) for m in messages)]
        )
        words = " ".join(_text(messages[-1].get("content")).split()[:8]) if messages else ""
        answer = f"Simulated answer (no model ran) to: {words}"
        chat = self.usage(payload["model"], prompt, answer, "")
        message = anthropic_message(payload["model"], answer, chat)
        if payload.get("stream") is not True:
            return _json(message)
        events = anthropic_events(message, _pieces(answer))
        return await _named_events(request, events)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """The OpenAI Responses API; thinking as on chat (on unless disabled)."""
        payload = await _payload(request)
        items = payload.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise _Refused(400, "Invalid Parameters: input must be a string or a list of items")
        prompt = "\n".join(
            [_text(payload.get("instructions")), *(_text(i.get("content")) for i in items)]
        )
        thinking = payload.get("thinking")
        thinks = not (isinstance(thinking, dict) and thinking.get("type") == "disabled")
        words = " ".join(_text(items[-1].get("content")).split()[:8]) if items else ""
        answer = f"Simulated answer (no model ran) to: {words}"
        reasoning = (
            f"The user asks: {words}. The simulation only counts these tokens." if thinks else ""
        )
        chat = self.usage(payload["model"], prompt, answer, reasoning)
        response = response_object(payload["model"], answer, chat, thinks)
        if payload.get("stream") is not True:
            return _json(response)
        events = response_events(response, _pieces(answer))
        return await _named_events(request, events)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "object": "list",
                "data": [
                    {"id": model, "object": "model", "owned_by": "deepseek"} for model in MODELS
                ],
            }
        )


async def _payload(request: web.Request, *, any_model: bool = False) -> dict[str, Any]:
    try:
        payload = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise _Refused(400, "Invalid Format: the body is not JSON") from None
    if not isinstance(payload, dict):
        raise _Refused(400, "Invalid Format: the body is not a JSON object")
    if not isinstance(payload.get("model"), str) or (
        not any_model and payload["model"] not in MODELS
    ):
        raise _Refused(400, "Model Not Exist")
    if "stream_options" in payload and payload.get("stream") is not True:
        raise _Refused(400, "Invalid Format: stream_options is only allowed with stream: true")
    return payload


def _wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _text(content: object) -> str:
    """A message's text: a string, or the ``text`` parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _pieces(text: str) -> list[str]:
    """Text split the way a stream sends it: roughly one word per chunk."""
    return re.findall(r"\s*\S+\s*", text)


def _base(model: str, kind: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }


def _headers() -> dict[str, str]:
    return {"x-ds-trace-id": uuid.uuid4().hex}


def _json(body: dict[str, Any]) -> web.Response:
    return web.json_response(body, headers=_headers())


async def _stream(
    request: web.Request,
    base: dict[str, Any],
    choices: list[dict[str, Any]],
    usage: dict[str, Any],
    include_usage: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={**_headers(), "Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    await response.write(b": keep-alive\n\n")  # what DeepSeek sends while a call is queued
    for index, choice in enumerate(choices):
        last = index == len(choices) - 1
        chunk: dict[str, Any] = {
            **base,
            "choices": [
                {"index": 0, **choice, "logprobs": None, "finish_reason": "stop" if last else None}
            ],
        }
        if last or include_usage:
            chunk["usage"] = usage if last else None
        await response.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _named_events(
    request: web.Request, events: list[tuple[str, dict[str, Any]]]
) -> web.StreamResponse:
    """Server-sent events with names (``event: X`` then ``data: {...}``), as Anthropic's and the
    Responses API's streams are; each data object repeats its name as ``type``."""
    response = web.StreamResponse(headers={**_headers(), "Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    for name, data in events:
        body = json.dumps({"type": name, **data}, ensure_ascii=False)
        await response.write(f"event: {name}\ndata: {body}\n\n".encode())
    await response.write_eof()
    return response
