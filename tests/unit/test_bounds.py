"""What one call can be billed at most (`proxy.bounds`): one rule for budgets, estimates and
trusting reported usage, and the masks that keep the upstream key out of answers."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxy.bounds import (
    BASE_TEMPLATE_TOKENS,
    FLAG_ESTIMATE_WITHOUT_FILES,
    TEMPLATE_TOKENS_PER_ITEM,
    TOOL_PREAMBLE_TOKENS,
    estimate_prompt,
    output_bound,
    prompt_bound,
)
from proxy.config import Limits
from proxy.upstream import KeyMask
from proxy.usage import estimate_tokens
from tests.support.requests import TOOL

LIMITS = Limits()
IMAGE: dict[str, Any] = {
    "type": "image_url",
    "image_url": {"url": "data:image/png;base64," + "A" * 5000},
}


def bound(payload: dict[str, Any]) -> int:
    return prompt_bound(payload, len(orjson.dumps(payload)), LIMITS)


def test_text_is_bounded_by_its_bytes_plus_the_template() -> None:
    chat = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "你好" * 100},
        ],
    }
    assert bound(chat) == (
        len(orjson.dumps(chat)) + BASE_TEMPLATE_TOKENS + 2 * TEMPLATE_TOKENS_PER_ITEM
    )
    fim = {"model": "m", "prompt": "def f(", "suffix": "return x"}
    assert bound(fim) == len(orjson.dumps(fim)) + BASE_TEMPLATE_TOKENS


def test_tools_tool_calls_and_response_formats_count() -> None:
    """Everything DeepSeek renders into the prompt is in the body, so in the bound; tools
    add the template's preamble and their own markers."""
    call = {"id": "c", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    payload = {
        "model": "m",
        "tools": [TOOL, TOOL],
        "response_format": {"type": "json_object"},
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "row"},
        ],
    }
    assert bound(payload) == (
        len(orjson.dumps(payload))
        + BASE_TEMPLATE_TOKENS
        + 5 * TEMPLATE_TOKENS_PER_ITEM
        + TOOL_PREAMBLE_TOKENS
    )


def test_images_count_their_stated_cost_not_their_bytes() -> None:
    payload = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE, IMAGE]}
        ],
    }
    # the image parts' strings, keys included: what any body carrying them spends on them
    url = IMAGE["image_url"]["url"]
    image_bytes = sum(len(text) for text in ("type", "image_url", "image_url", "url", url))
    assert bound(payload) == (
        len(orjson.dumps(payload))
        - 2 * image_bytes
        + 2 * LIMITS.image_prompt_tokens
        + BASE_TEMPLATE_TOKENS
        + TEMPLATE_TOKENS_PER_ITEM
    )


def test_padding_an_image_part_cannot_hide_text() -> None:
    """Numbers re-serialise longer than they can be written (``1e15``): an image part padded
    with them must not shrink the bound below the text the request carries."""
    text = "t" * 400_000
    padded = {"type": "image_url", "image_url": {"url": "x"}, "pad": [1e15] * 100_000}
    payload = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}, padded]}],
    }
    body = json.dumps(payload, separators=(",", ":")).replace("1000000000000000.0", "1e15").encode()
    assert len(body) < len(orjson.dumps(padded))  # the part is shorter in the body
    assert prompt_bound(payload, len(body), LIMITS) > len(text)


def test_files_and_size_are_bounded_by_the_context_window() -> None:
    file_part = {"type": "file", "file": {"file_id": "file-1"}}
    assert bound({"model": "m", "messages": [{"role": "user", "content": [file_part]}]}) == (
        LIMITS.max_context_tokens
    )
    huge = {"model": "m", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    assert bound(huge) == LIMITS.max_context_tokens


def test_a_part_of_no_known_type_is_bounded_by_the_context() -> None:
    """A ``type`` that is not text (a list, an object) is a kind of part the proxy does not
    know: bounded by the context window, never an error."""
    for kind in (["image_url"], {"a": 1}, 7):
        payload = {"model": "m", "messages": [{"role": "user", "content": [{"type": kind}]}]}
        assert bound(payload) == LIMITS.max_context_tokens
        assert estimate_prompt(payload, LIMITS) == (0, ())


def test_responses_input_items_are_bounded_like_messages() -> None:
    """The Responses API's ``input`` list: items count as messages, its image parts at their
    stated cost, tool outputs by their bytes; ``input`` as one string by its bytes."""
    image = {"type": "input_image", "image_url": "https://example.com/cat.png"}
    payload = {
        "model": "m",
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "what is this?"}, image]},
            {"type": "function_call", "call_id": "c1", "name": "look", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "a cat"},
        ],
    }
    image_bytes = sum(len(t) for t in ("type", "input_image", "image_url", image["image_url"]))
    assert bound(payload) == (
        len(orjson.dumps(payload))
        - image_bytes
        + LIMITS.image_prompt_tokens
        + BASE_TEMPLATE_TOKENS
        + 3 * TEMPLATE_TOKENS_PER_ITEM
    )
    plain = {"model": "m", "input": "hello", "instructions": "be brief"}
    assert bound(plain) == len(orjson.dumps(plain)) + BASE_TEMPLATE_TOKENS
    structured = {**plain, "text": {"format": {"type": "json_schema", "schema": {}}}}
    assert bound(structured) == (
        len(orjson.dumps(structured)) + BASE_TEMPLATE_TOKENS + TOOL_PREAMBLE_TOKENS
    )


def test_what_a_responses_request_only_refers_to_is_bounded_by_the_context() -> None:
    """A file, a reference to a stored item, or a stored conversation the call continues:
    the body does not show their size."""
    for extra in (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        {"input": [{"type": "item_reference", "id": "msg_1"}]},
        {"input": "go on", "previous_response_id": "resp_1"},
        {"input": "go on", "conversation": "conv_1"},
    ):
        assert bound({"model": "m", **extra}) == LIMITS.max_context_tokens
        assert estimate_prompt({"model": "m", **extra}, LIMITS)[1] in (
            (),  # nothing countable beside it
            (FLAG_ESTIMATE_WITHOUT_FILES,),
        )
    tokens, flags = estimate_prompt(
        {"model": "m", "input": "go on", "previous_response_id": "resp_1"}, LIMITS
    )
    assert (tokens, flags) == (estimate_tokens("go on"), (FLAG_ESTIMATE_WITHOUT_FILES,))


def test_anthropic_tool_results_and_system_blocks_are_looked_into() -> None:
    """An image inside a ``tool_result`` counts at its stated cost; tool use and results are
    text; a ``document`` (a PDF) is bounded by the context window."""
    image: dict[str, Any] = {
        "type": "image",
        "source": {"type": "url", "url": "https://example.com/a.png"},
    }
    payload = {
        "model": "m",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [
            {"role": "user", "content": "read it"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {"p": "x"}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}],
            },
        ],
    }
    image_bytes = sum(
        len(t) for t in ("type", "image", "source", "type", "url", "url", image["source"]["url"])
    )
    assert bound(payload) == (
        len(orjson.dumps(payload))
        - image_bytes
        + LIMITS.image_prompt_tokens
        + BASE_TEMPLATE_TOKENS
        + 3 * TEMPLATE_TOKENS_PER_ITEM
    )
    document = {"type": "document", "source": {"type": "file", "file_id": "f"}}
    with_pdf = {"model": "m", "messages": [{"role": "user", "content": [document]}]}
    assert bound(with_pdf) == LIMITS.max_context_tokens
    in_system = {"model": "m", "system": [document], "messages": []}
    assert bound(in_system) == LIMITS.max_context_tokens


def test_the_estimate_reads_every_format() -> None:
    anthropic = {
        "model": "m",
        "system": "be brief",
        "messages": [
            {"role": "user", "content": "read it"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "tool_use", "id": "t1", "name": "read", "input": {"p": "x"}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done"}],
            },
        ],
    }
    tokens, flags = estimate_prompt(anthropic, LIMITS)
    texts = ["read it", "hmm", "read", "p", "x", "done", "be brief"]
    assert (tokens, flags) == (
        estimate_tokens("\n".join(texts)) + 3 * TEMPLATE_TOKENS_PER_ITEM,
        (),
    )
    responses = {
        "model": "m",
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call", "call_id": "c", "name": "look", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "a cat"},
        ],
    }
    tokens, flags = estimate_prompt(responses, LIMITS)
    assert (tokens, flags) == (
        estimate_tokens("\n".join(["hi", "look", "{}", "a cat", "be brief"]))
        + 3 * TEMPLATE_TOKENS_PER_ITEM,
        (),
    )


def test_output_is_bounded_by_max_tokens_only() -> None:
    assert output_bound({"max_tokens": 100}, LIMITS) == 100
    assert output_bound({"max_tokens": 10**9}, LIMITS) == LIMITS.max_output_tokens
    for payload in (
        {},
        {"max_tokens": None},
        {"max_tokens": True},
        {"max_tokens": 0},
        {"max_tokens": "100"},
        {"max_completion_tokens": 100},
    ):
        assert output_bound(payload, LIMITS) == LIMITS.max_output_tokens


def test_estimate_counts_the_same_parts() -> None:
    """The estimate covers what the bound covers, by DeepSeek's rule of thumb: message text,
    tool calls, tool schemas (keys too: property names are text to the model), response
    formats, images at the same stated cost; files are flagged as left out."""
    call = {"id": "c", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    payload = {
        "model": "m",
        "tools": [TOOL],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hello"}, IMAGE]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ],
    }
    tokens, flags = estimate_prompt(payload, LIMITS)
    strings = [
        "hello",
        "{}",
        "lookup",
        "function",
        "c",  # the tool call, values only
        "function",
        "lookup",
        "Find a row",
        "object",
        "string",  # the schema ...
        "type",
        "function",
        "name",
        "description",
        "parameters",
        "type",
        "properties",
        "id",
        "type",
    ]  # ... and its keys
    assert tokens == (
        estimate_tokens("\n".join(strings))
        + LIMITS.image_prompt_tokens
        + 3 * TEMPLATE_TOKENS_PER_ITEM
        + TOOL_PREAMBLE_TOKENS
    )
    assert flags == ()
    with_file = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "summarise"},
                    {"type": "file", "file": {"file_id": "f"}},
                ],
            }
        ],
    }
    tokens, flags = estimate_prompt(with_file, LIMITS)
    assert tokens == estimate_tokens("summarise") + TEMPLATE_TOKENS_PER_ITEM
    assert flags == (FLAG_ESTIMATE_WITHOUT_FILES,)
    assert estimate_prompt({"model": "m", "messages": []}, LIMITS) == (0, ())


def test_estimate_survives_any_nesting() -> None:
    deep: Any = "leaf"
    for _ in range(1000):
        deep = {"d": [deep]}
    payload = {
        "model": "m",
        "response_format": {"type": "json_schema", "schema": deep},
        "messages": [{"role": "user", "content": "x"}],
    }
    tokens, _ = estimate_prompt(payload, LIMITS)
    assert tokens >= estimate_tokens("\n".join(["d"] * 1000))  # every level's key counted


text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200)


@given(
    st.lists(
        st.tuples(st.sampled_from(["user", "assistant", "system"]), text), min_size=1, max_size=6
    ),
    st.lists(text, max_size=3),
)
def test_the_estimate_never_exceeds_the_bound(
    messages: list[tuple[str, str]], descriptions: list[str]
) -> None:
    """Same parts, a rule of thumb against a byte count: an estimate is never above what a
    budget reserves, so a call whose usage was lost never records more than was held."""
    payload: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": role, "content": content} for role, content in messages],
    }
    if descriptions:
        payload["tools"] = [
            {"type": "function", "function": {"name": "f", "description": d}} for d in descriptions
        ]
    for body in (orjson.dumps(payload), json.dumps(payload).encode()):  # compact or ASCII
        assert estimate_prompt(payload, LIMITS)[0] <= prompt_bound(payload, len(body), LIMITS)


@given(text, st.lists(st.tuples(text, text, text), min_size=1, max_size=4), text)
def test_the_estimate_never_exceeds_the_bound_in_the_other_formats(
    system: str, turns: list[tuple[str, str, str]], instructions: str
) -> None:
    """The same promise for Anthropic's tool use and results and the Responses API's items."""
    anthropic: dict[str, Any] = {"model": "m", "max_tokens": 10, "system": system, "messages": []}
    responses: dict[str, Any] = {"model": "m", "instructions": instructions, "input": []}
    for ask, argument, result in turns:
        anthropic["messages"] += [
            {"role": "user", "content": ask},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": argument}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": result}],
            },
        ]
        responses["input"] += [
            {"role": "user", "content": [{"type": "input_text", "text": ask}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": argument},
            {"type": "function_call_output", "call_id": "c", "output": result},
        ]
    for payload in (anthropic, responses):
        for body in (orjson.dumps(payload), json.dumps(payload).encode()):
            assert estimate_prompt(payload, LIMITS)[0] <= prompt_bound(payload, len(body), LIMITS)


@given(
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.lists(st.integers(min_value=0, max_value=700), max_size=8),
)
def test_key_mask_catches_the_key_across_any_split(
    before: bytes, after: bytes, cuts: list[int]
) -> None:
    """However a body is cut into reads, the key never survives, the length never changes,
    and the pieces add up to the whole masked body."""
    key = "sk-upstream-canary-0123456789"
    data = before + key.encode() + after + key.encode()[:7]
    mask = KeyMask(key)
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    relayed = b"".join(mask.part(piece) for piece in pieces) + mask.rest()
    assert relayed == KeyMask(key).whole(data)
    assert key.encode() not in relayed and len(relayed) == len(data)


def test_key_mask_never_holds_back_a_keepalive_line() -> None:
    mask = KeyMask("sk-upstream-canary")
    assert mask.part(b"\n") == b"\n" and mask.part(b"\n\n") == b"\n\n"
    assert mask.part(b'{"a": "sk-up') == b'{"a": "'
    assert mask.part(b"stream-canary") == b"*" * len("sk-upstream-canary")
