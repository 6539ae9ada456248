"""Reading DeepSeek's usage object: its cache fields are the truth, oddities are flagged."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.usage import MalformedUsage, TokenUsage, estimate_tokens, parse_usage

DOCUMENTED = {
    "prompt_tokens": 10,
    "completion_tokens": 11,
    "total_tokens": 21,
    "prompt_tokens_details": {"cached_tokens": 0},
    "prompt_cache_hit_tokens": 0,
    "prompt_cache_miss_tokens": 10,
    "completion_tokens_details": {"reasoning_tokens": 81},
}


def test_documented_example() -> None:
    usage = parse_usage(DOCUMENTED)
    assert usage.tokens == TokenUsage(cache_hit=0, cache_miss=10, output=11, reasoning=81)
    assert usage.prompt_tokens == 10
    assert usage.flags == ()


def test_deepseek_fields_win_over_openai_cached_tokens() -> None:
    usage = parse_usage(
        {
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 10},
            "prompt_cache_hit_tokens": 64,
            "prompt_cache_miss_tokens": 36,
        }
    )
    assert (usage.tokens.cache_hit, usage.tokens.cache_miss) == (64, 36)


def test_openai_only_usage_falls_back_and_is_flagged() -> None:
    usage = parse_usage(
        {
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 64},
        }
    )
    assert (usage.tokens.cache_hit, usage.tokens.cache_miss) == (64, 36)
    assert usage.flags == ("cache_fields_missing",)


def test_mismatch_is_flagged_never_fixed() -> None:
    usage = parse_usage(
        {
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "prompt_cache_hit_tokens": 64,
            "prompt_cache_miss_tokens": 40,
        }
    )
    assert (usage.tokens.cache_hit, usage.tokens.cache_miss, usage.prompt_tokens) == (64, 40, 100)
    assert usage.flags == ("prompt_tokens_mismatch",)


def test_server_tool_use() -> None:
    usage = parse_usage(
        {
            **DOCUMENTED,
            "server_tool_use": {
                "web_search_requests": 2,
                "read_url_requests": 1,
                "code_requests": 3,
            },
        }
    )
    assert dict(usage.tokens.tool_calls) == {"search": 2, "fetch": 1, "code_requests": 3}
    assert usage.flags == ("unknown_tool_field:code_requests",)
    custom = parse_usage(
        {**DOCUMENTED, "server_tool_use": {"code_requests": 3}}, {"code_requests": "code"}
    )
    assert dict(custom.tokens.tool_calls) == {"code": 3}


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        "usage",
        {"completion_tokens": 1},
        {"prompt_tokens": -1, "completion_tokens": 1},
        {"prompt_tokens": 1, "completion_tokens": 10**12},
        {"prompt_tokens": "5", "completion_tokens": 1},
        {"prompt_tokens": True, "completion_tokens": 1},
        {"prompt_tokens": 5.5, "completion_tokens": 1},
        {"prompt_tokens": 5, "completion_tokens": 1, "prompt_cache_hit_tokens": -5},
        {**DOCUMENTED, "server_tool_use": {"web_search_requests": -1}},
    ],
)
def test_malformed_usage_is_rejected(bad: Any) -> None:
    with pytest.raises(MalformedUsage):
        parse_usage(bad)


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a" * 10) == 3
    assert estimate_tokens("你好世界你好世界你好") == 6


@pytest.mark.parametrize(
    "fields",
    [
        {"cache_hit": -1},
        {"cache_miss": 1.0},
        {"output": True},
        {"reasoning": "3"},
        {"tool_calls": {"search": -2}},
    ],
)
def test_token_usage_refuses_what_is_not_a_count(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        TokenUsage(**fields)  # type: ignore[arg-type]
