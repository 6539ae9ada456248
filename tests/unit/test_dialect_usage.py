"""Usage in the three formats DeepSeek serves reads as the same billed tokens: the same call
described by a chat, an Anthropic and a Responses usage object costs the same, to the last
decimal; and streams never count a token twice (the bugs peers ship: cache reads billed as
input when streaming, cache tokens added once per delta)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, load_config
from proxy.dialects import anthropic, responses
from proxy.dialects.registry import ANTHROPIC as ANTHROPIC_DIALECT
from proxy.pricing import PriceBook, price
from proxy.usage import (
    DEFAULT_TOOL_FIELDS,
    FLAG_CACHE_FIELDS_MISSING,
    MalformedUsage,
    TokenUsage,
    parse_usage,
)
from tests.support.config_files import ONE_TEAM, config_with_shipped_book

PEAK = datetime(2026, 11, 2, 1, 30, tzinfo=UTC)  # Monday 09:30 Beijing: deepseek-flash peak

CHAT = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "prompt_cache_hit_tokens": 1000,
    "prompt_cache_miss_tokens": 200,
    "completion_tokens_details": {"reasoning_tokens": 120},
    "server_tool_use": {"web_search_requests": 2},
}
ANTHROPIC = {
    "input_tokens": 200,  # neither read from nor written to the cache
    "cache_read_input_tokens": 1000,
    "cache_creation_input_tokens": 0,
    "output_tokens": 300,
    "server_tool_use": {"web_search_requests": 2},
}
RESPONSES = {
    "input_tokens": 1200,  # the cached part included
    "input_tokens_details": {"cached_tokens": 1000},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 120},
    "total_tokens": 1500,
    "server_tool_use": {"web_search_requests": 2},
}


def test_the_three_formats_cost_the_same(book: PriceBook) -> None:
    chat = parse_usage(CHAT).tokens
    messages = anthropic.parse_usage(ANTHROPIC).tokens
    resp = responses.parse_usage(RESPONSES).tokens
    assert (chat.cache_hit, chat.cache_miss, chat.output) == (1000, 200, 300)
    assert (messages.cache_hit, messages.cache_miss, messages.output) == (1000, 200, 300)
    assert (resp.cache_hit, resp.cache_miss, resp.output, resp.reasoning) == (1000, 200, 300, 120)
    assert chat.tool_calls == messages.tool_calls == resp.tool_calls == {"search": 2}
    costs = [
        price(book, "deepseek-flash", t, PEAK).costs["CNY"].total for t in (chat, messages, resp)
    ]
    # 1000 x 0.04 + 200 x 2 + 300 x 8 per million at peak, plus 2 searches at 5 per 1000.
    assert costs == [costs[0]] * 3
    assert costs[0] == Decimal("0.01284")


def test_anthropic_cache_creation_is_billed_as_cache_misses() -> None:
    usage = anthropic.parse_usage({**ANTHROPIC, "cache_creation_input_tokens": 50})
    assert anthropic.CACHE_CREATION == "miss"
    assert (usage.tokens.cache_hit, usage.tokens.cache_miss, usage.prompt_tokens) == (
        1000,
        250,
        1250,
    )
    assert usage.flags == ()


def test_missing_cache_fields_are_flagged_never_guessed() -> None:
    bare = anthropic.parse_usage({"input_tokens": 200, "output_tokens": 3})
    assert (bare.tokens.cache_hit, bare.tokens.cache_miss) == (0, 200)
    assert bare.flags == (FLAG_CACHE_FIELDS_MISSING,)
    plain = responses.parse_usage({"input_tokens": 200, "output_tokens": 3})
    assert (plain.tokens.cache_hit, plain.tokens.cache_miss) == (0, 200)
    assert plain.flags == (FLAG_CACHE_FIELDS_MISSING,)


@pytest.mark.parametrize(
    ("reader", "usage", "reason"),
    [
        (anthropic.parse_usage, {"output_tokens": 3}, "usage has no input_tokens"),
        (anthropic.parse_usage, {"input_tokens": -1, "output_tokens": 3}, "out of range"),
        (anthropic.parse_usage, {"input_tokens": True, "output_tokens": 3}, "not an integer"),
        (anthropic.parse_usage, [], "usage is not an object"),
        (responses.parse_usage, {"input_tokens": 5}, "usage has no output_tokens"),
        (
            responses.parse_usage,
            {"input_tokens": 5, "output_tokens": 1, "input_tokens_details": {"cached_tokens": 6}},
            "cached_tokens (6) exceed input_tokens (5)",
        ),
    ],
)
def test_malformed_usage_is_refused(reader: Any, usage: object, reason: str) -> None:
    with pytest.raises(MalformedUsage, match=reason.replace("(", r"\(").replace(")", r"\)")):
        reader(usage)


def test_an_anthropic_stream_takes_the_last_value_of_each_field() -> None:
    """message_start gives the input side and 1 output token; two message_delta events give the
    cumulative output (and, in newer versions, the input side again): nothing is added twice."""
    stream = anthropic.StreamUsage()
    assert not stream.seen
    start = {"input_tokens": 200, "cache_read_input_tokens": 1000, "output_tokens": 1}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "usage": start}},
        {"type": "ping"},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 120}},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {
                "input_tokens": 200,
                "cache_read_input_tokens": 1000,
                "cache_creation_input_tokens": None,
                "output_tokens": 300,
            },
        },
        {"type": "message_stop"},
    ]
    for event in events:
        stream.take(event)
    assert stream.seen
    tokens = anthropic.parse_usage(stream.usage()).tokens
    assert tokens == TokenUsage(1000, 200, 300, 0)


def test_a_responses_stream_takes_the_terminal_events_usage() -> None:
    stream = responses.StreamUsage()
    stream.take({"type": "response.created", "response": {"usage": None}})
    stream.take({"type": "response.output_text.delta", "delta": "hi"})
    assert not stream.seen
    stream.take({"type": "response.completed", "response": {"usage": RESPONSES}})
    assert responses.parse_usage(stream.usage()).tokens == TokenUsage(
        1000, 200, 300, 120, {"search": 2}
    )
    cut = responses.StreamUsage()
    cut.take(
        {
            "type": "response.incomplete",
            "response": {"usage": {"input_tokens": 9, "output_tokens": 4}},
        }
    )
    assert responses.parse_usage(cut.usage()).tokens.output == 4


def test_cache_creation_bills_as_the_config_says(tmp_path: Path) -> None:
    """``usage.cache_creation``: misses by default; ``hit`` if DeepSeek's bill says so."""
    with_creation = {**ANTHROPIC, "cache_creation_input_tokens": 50}
    default = load_config(config_with_shipped_book(tmp_path, ONE_TEAM))
    hits = load_config(
        config_with_shipped_book(tmp_path, ONE_TEAM + "usage: {cache_creation: hit}\n")
    )
    assert default.cache_creation == "miss" and hits.cache_creation == "hit"
    as_miss = ANTHROPIC_DIALECT.reader(default)(with_creation, DEFAULT_TOOL_FIELDS).tokens
    as_hit = ANTHROPIC_DIALECT.reader(hits)(with_creation, DEFAULT_TOOL_FIELDS).tokens
    assert (as_miss.cache_hit, as_miss.cache_miss) == (1000, 250)
    assert (as_hit.cache_hit, as_hit.cache_miss) == (1050, 200)
    bad = config_with_shipped_book(tmp_path, ONE_TEAM + "usage: {cache_creation: read}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert (info.value.key, info.value.reason) == (
        "usage.cache_creation",
        "expected miss or hit, got 'read'",
    )


def test_cache_creation_repeated_in_the_final_delta_counts_once() -> None:
    """Bifrost's and LiteLLM's bug: an Anthropic stream that states its cache writes in
    ``message_start`` and again in the last ``message_delta`` billed them twice. Each field's
    last value counts: 50 creation tokens are 50 cache misses, once."""
    stream = anthropic.StreamUsage()
    side = {"input_tokens": 20, "cache_read_input_tokens": 700, "cache_creation_input_tokens": 50}
    stream.take({"type": "message_start", "message": {"usage": {**side, "output_tokens": 1}}})
    stream.take({"type": "message_delta", "usage": {**side, "output_tokens": 90}})
    stream.take({"type": "message_stop"})
    assert anthropic.parse_usage(stream.usage()).tokens == TokenUsage(700, 70, 90, 0)


def test_cache_reads_larger_than_input_never_go_negative() -> None:
    """new-api's bug: taking Anthropic's ``input_tokens`` as the whole prompt and subtracting
    the cache reads gave negative misses on long cached prompts. ``input_tokens`` excludes
    them: 12 uncached, 90,000 read from the cache."""
    usage = {"input_tokens": 12, "cache_read_input_tokens": 90_000, "output_tokens": 5}
    assert anthropic.parse_usage(usage).tokens == TokenUsage(90_000, 12, 5, 0)
