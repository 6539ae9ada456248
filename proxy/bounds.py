"""What one call can be billed at most, judged from its request alone.

Three parts of the proxy need to know how big a call can get, and they must agree on what a
request contains, or a budget could reserve less than the proxy later records:

- a hard budget reserves the call's worst case before dispatch (`proxy.budgets`);
- a call whose usage never arrived is estimated (`proxy.metering`);
- usage that DeepSeek reports is trusted only up to these bounds (`proxy.metering`), so a
  broken or hostile upstream cannot make the bill absurd.

What DeepSeek can bill as prompt is every part of the request that reaches the model: message
text, the tool calls and tool results in the conversation, the tool and function schemas, a
``response_format`` schema, FIM's ``prompt`` and ``suffix``, images, files. The rule, one for
all three uses (`prompt_bound`):

- **Text of any kind** is bounded by the request's own bytes: a byte-level tokenizer never makes
  more tokens than bytes, and the whole serialised body (keys, punctuation, escapes and all) is
  a superset of what the model reads, so fields we do not know of are covered too.
- **Images** are not bounded by their bytes (a URL of 40 bytes can stand for a 4K picture, a
  data URL of 5 MB for a small one): each image part counts `Limits.image_prompt_tokens` tokens
  instead of its bytes. DeepSeek publishes no per-image token count; the default, 8,192, is four
  times the largest image encoding DeepSeek has published for its vision models (DeepSeek-OCR's
  1,853 tokens, DeepSeek-VL2's dynamic tiling about 2,000), so it is a bound, not a guess.
- **Files and audio** (any content part that is neither text nor an image) have no size the
  request shows: the prompt is then bounded only by the model's context window. So has a
  Responses call that continues a conversation stored at DeepSeek (``previous_response_id``,
  ``conversation``) or refers to stored items (``item_reference``).
- **All three formats** are read alike: the conversation is chat's and Anthropic's
  ``messages`` or the Responses API's ``input`` items; Anthropic's ``system`` blocks,
  ``tool_use`` and ``tool_result`` parts and the Responses API's function calls and outputs
  are text, and nested content lists (an image inside a ``tool_result``) are looked into.
- **The chat template** adds tokens the request does not carry: `BASE_TEMPLATE_TOKENS` per
  call (the template's frame, and room for a system prompt DeepSeek may add unseen),
  `TEMPLATE_TOKENS_PER_ITEM` per message and per tool (role markers), plus
  `TOOL_PREAMBLE_TOKENS` when tools or a response format are present.
- Nothing exceeds the model's context window (`Limits.max_context_tokens`), which DeepSeek
  enforces itself.

The estimate used when usage is lost counts the same parts with DeepSeek's rule of thumb
(0.3 token per ASCII character, 0.6 per other character) instead of one token per byte, images
at the same stated cost, and the same template tokens per message and tool (not the per-call
headroom, which is there for a bound, not a best guess). Files cannot be estimated; an estimate
that had to leave them out is flagged.

The output is bounded by ``max_tokens`` when the request sets a positive one (after the proxy
wrote or lowered it, `proxy.relay.request`), else by `Limits.max_output_tokens`, DeepSeek V4's
maximum output. Only ``max_tokens`` counts: DeepSeek documents no other output limit, so a
request that sets only ``max_completion_tokens`` is bounded by the maximum.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from proxy.config import Limits
from proxy.usage import estimate_tokens

BASE_TEMPLATE_TOKENS = 1024
"""Per call: the chat template's frame and any system prompt DeepSeek adds on its side. A
bound must not undercount what DeepSeek really bills; this costs a hard budget at most
0.009 CNY per call (deepseek-v4-pro's peak cache-miss price)."""
TEMPLATE_TOKENS_PER_ITEM = 8
"""Role markers and separators the chat template adds around each message or tool."""
TOOL_PREAMBLE_TOKENS = 256
"""The instructions a chat template puts before tool schemas or a response format."""
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
"""Content parts that carry an image (OpenAI chat, OpenAI Responses, Anthropic)."""
TEXT_PART_TYPES = frozenset(
    {
        "text",
        "input_text",
        "output_text",
        # whole conversation items and the parts that hold text or JSON the model reads:
        # Anthropic Messages ...
        "tool_use",
        "tool_result",
        "thinking",
        "redacted_thinking",
        # ... and OpenAI Responses
        "message",
        "function_call",
        "function_call_output",
        "reasoning",
        "summary_text",
        "refusal",
    }
)
"""Parts whose content reaches the model as text, so the body's bytes bound it. Their nested
``content``, ``output`` and ``summary`` lists are looked into (an Anthropic ``tool_result``
may hold images); any other type (a file, audio, a Responses ``item_reference`` to stored
items) is bounded by the context window only."""
_NESTED = ("content", "output", "summary")
_SCHEMA_FIELDS = ("tools", "functions", "response_format", "tool_choice")
"""Request fields whose whole JSON (keys included) the template renders into the prompt."""
_TEXT_FIELDS = ("name", "reasoning_content", "text", "thinking", "arguments")
"""String fields of a message, item or part that the model reads as text."""
_MESSAGE_JSON_FIELDS = ("tool_calls", "function_call")
_STORED_CONTEXT = ("previous_response_id", "conversation")
"""Responses fields that make DeepSeek prepend a conversation stored on its side: a prompt
the request's bytes do not show."""

FLAG_ESTIMATE_WITHOUT_FILES = "estimate_excludes_files"
"""The request carried file or audio parts, or stored conversation it only refers to, whose
tokens an estimate cannot know."""


def prompt_bound(payload: Mapping[str, Any], body_size: int, limits: Limits) -> int:
    """The most prompt tokens DeepSeek can bill for a parsed request whose body was
    `body_size` bytes (the rule of the module docstring).

    It runs for every call, so the usual request (messages with text content) costs one pass
    over its messages and a few lookups; only content lists and typed items are looked into
    (images and files sit there), everything else is counted by the body's size.
    """
    items = payload.get("messages")  # `_conversation`, inlined: this runs for every call
    if type(items) is not list:
        items = payload.get("input")
    count = images = part_bytes = 0
    if type(items) is list:
        count = len(items)
        for item in items:  # a loop, not any(): this runs for every call
            if type(item) is dict and (
                type(item.get("content")) is list or item.get("type") is not None
            ):
                parts = _image_parts(items)
                if parts is None:
                    return limits.max_context_tokens
                images, part_bytes = parts
                break
    system = payload.get("system")
    if type(system) is list:  # Anthropic's system blocks
        parts = _image_parts(system)
        if parts is None:
            return limits.max_context_tokens
        images, part_bytes = images + parts[0], part_bytes + parts[1]
    if payload.get("previous_response_id") or payload.get("conversation"):
        return limits.max_context_tokens
    tools = _tool_count(payload)
    tokens = (
        max(body_size - part_bytes, 0)
        + BASE_TEMPLATE_TOKENS
        + template_tokens(count + tools, _preamble(payload, tools))
        + images * limits.image_prompt_tokens
    )
    return min(tokens, limits.max_context_tokens)


def _conversation(payload: Mapping[str, Any]) -> list[Any] | None:
    """The request's conversation: chat's and Anthropic's ``messages``, or the Responses
    API's ``input`` when it is a list of items."""
    messages = payload.get("messages")
    if type(messages) is list:
        return messages
    items = payload.get("input")
    return items if type(items) is list else None


def _image_parts(items: list[Any]) -> tuple[int, int] | None:
    """How many image parts the items carry, at any depth of their nested content, and the
    bytes of their strings; None if a part is of a type that is neither text nor an image (a
    file, audio: bounded by the context window only). Walked without recursion: nesting is
    the client's to choose."""
    images = 0
    part_bytes = 0
    stack = [items]
    while stack:
        for part in stack.pop():
            if not isinstance(part, dict):
                continue
            kind = _part_type(part)
            if kind in IMAGE_PART_TYPES:
                images += 1
                part_bytes += _string_bytes(part)
                continue
            if kind is not None and kind not in TEXT_PART_TYPES:
                return None
            for name in _NESTED:
                nested = part.get(name)
                if type(nested) is list:
                    stack.append(nested)
    return images, part_bytes


def _tool_count(payload: Mapping[str, Any]) -> int:
    tools = payload.get("tools")
    functions = payload.get("functions")
    return (len(tools) if type(tools) is list else 0) + (
        len(functions) if type(functions) is list else 0
    )


def _preamble(payload: Mapping[str, Any], tools: int) -> bool:
    """Tools, functions or a response format (chat's ``response_format``, the Responses API's
    ``text.format``): the template adds its instructions."""
    if tools or payload.get("response_format") is not None:
        return True
    text = payload.get("text")
    return type(text) is dict and text.get("format") is not None


def output_bound(payload: Mapping[str, Any], limits: Limits, field: str = "max_tokens") -> int:
    """The most output tokens DeepSeek can bill: `field` (``max_tokens``; the Responses API's
    ``max_output_tokens``) if set, else the maximum."""
    max_tokens = payload.get(field)
    if type(max_tokens) is int and max_tokens > 0:
        return min(max_tokens, limits.max_output_tokens)
    return limits.max_output_tokens


def estimate_prompt(payload: Mapping[str, Any], limits: Limits) -> tuple[int, tuple[str, ...]]:
    """Prompt tokens by DeepSeek's rule of thumb over the parts `prompt_bound` bounds, and flags.

    Returns 0 tokens for a request with no prompt parts at all (the caller then has nothing to
    estimate from)."""
    texts: list[str] = []
    items = _conversation(payload)
    count = len(items) if items is not None else 0
    system = payload.get("system")  # Anthropic: a string, or a list of text blocks
    lists = [x for x in (items, system) if isinstance(x, list)]
    images, unbounded = _gather_texts(lists, texts)
    unbounded = unbounded or any(payload.get(name) for name in _STORED_CONTEXT)
    for name in _SCHEMA_FIELDS:
        value = payload.get(name)
        if isinstance(value, list | dict):
            texts.extend(strings(value, keys=True))
    for name in ("prompt", "suffix", "system", "instructions", "input"):
        value = payload.get(name)
        if isinstance(value, str):
            texts.append(value)
        elif name in ("prompt", "suffix") and isinstance(value, list):
            texts.extend(v for v in value if isinstance(v, str))
    tools = _tool_count(payload)
    text_tokens = estimate_tokens("\n".join(texts))
    if not text_tokens and not images:
        return 0, ()
    tokens = (
        text_tokens
        + template_tokens(count + tools, _preamble(payload, tools))
        + images * limits.image_prompt_tokens
    )
    return min(tokens, limits.max_context_tokens), (
        (FLAG_ESTIMATE_WITHOUT_FILES,) if unbounded else ()
    )


def _gather_texts(lists: list[list[Any]], texts: list[str]) -> tuple[int, bool]:
    """Append the text the model reads in these messages, items or parts (and their nested
    ones) to `texts`; return the images counted and whether a part could not be counted.
    The same parts `_image_parts` walks, without recursion."""
    images = 0
    unbounded = False
    stack = list(lists)
    while stack:
        for part in stack.pop():
            if isinstance(part, str):  # a list of plain strings (a tool result's output)
                texts.append(part)
                continue
            if not isinstance(part, dict):
                continue
            kind = _part_type(part)
            if kind in IMAGE_PART_TYPES:
                images += 1
                continue
            if kind is not None and kind not in TEXT_PART_TYPES:
                unbounded = True
                continue
            for name in _TEXT_FIELDS:
                if isinstance(part.get(name), str):
                    texts.append(part[name])
            for name in _NESTED:
                value = part.get(name)
                if isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, list):
                    stack.append(value)
            for name in _MESSAGE_JSON_FIELDS:
                if part.get(name) is not None:
                    texts.extend(strings(part[name]))
            tool_input = part.get("input")  # an Anthropic tool_use's arguments, as JSON
            if isinstance(tool_input, dict | list):
                texts.extend(strings(tool_input, keys=True))
    return images, unbounded


def _part_type(part: Any) -> str | None:
    """A content part's ``type``: None for a plain part, ``""`` for one whose type is not
    text (an unknown kind of part, so bounded only by the context window)."""
    kind = part.get("type") if isinstance(part, dict) else None
    return kind if kind is None or isinstance(kind, str) else ""


def template_tokens(items: int, preamble: bool) -> int:
    """What the chat template adds around a request's `items` messages and tools (the bound
    adds `BASE_TEMPLATE_TOKENS` of headroom on top; an estimate does not)."""
    return TEMPLATE_TOKENS_PER_ITEM * items + (TOOL_PREAMBLE_TOKENS if preamble else 0)


def strings(value: Any, *, keys: bool = False) -> Iterator[str]:
    """Every string inside a JSON value (and every object key, with `keys`), without
    recursion: a request may nest up to 1,024 levels (orjson's parsing limit), deeper than
    Python's own recursion limit."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            if keys:
                yield from (k for k in item if isinstance(k, str))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _string_bytes(part: Any) -> int:
    """Bytes the strings (and keys) of a content part take in any body that carries it: a
    lower bound of its size there, so the body size less this stays an upper bound of the
    text. Only strings count: a number can be written shorter than any re-serialisation of it
    (``1e15``), so counting numbers could shrink the bound below the truth."""
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in strings(part, keys=True))
