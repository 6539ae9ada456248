"""What the tests send through the proxy and what the fake DeepSeek reports back, defined once.

Each figure a test asserts (a cost, a reservation, a bound) follows from one of these, so a test
that needs other figures says so by building its own body or usage beside it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from tests.support.proxy_harness import TEAM_KEYS


def auth(team: str) -> dict[str, str]:
    """The Authorization header of `team`'s proxy key (`TEAM_KEYS`)."""
    return {"Authorization": f"Bearer {TEAM_KEYS[team]}"}


AUTH = auth("alpha")
BETA_AUTH = auth("beta")
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
"""Team alpha, for bodies sent as raw bytes (``content=``) rather than through ``json=``."""

PROMPT = "Say hello"
CHAT: dict[str, Any] = {
    "model": "deepseek-flash",
    "messages": [{"role": "user", "content": PROMPT}],
}
STREAM: dict[str, Any] = {**CHAT, "stream": True}

USAGE: dict[str, Any] = {
    "prompt_tokens": 1000,
    "completion_tokens": 50,
    "prompt_cache_hit_tokens": 640,
    "prompt_cache_miss_tokens": 360,
    "completion_tokens_details": {"reasoning_tokens": 20},
    "total_tokens": 1050,
}
"""A call with a cache hit and reasoning: every token price of the book takes part."""
SMALL_USAGE: dict[str, Any] = {
    "prompt_tokens": 100,
    "completion_tokens": 7,
    "prompt_cache_hit_tokens": 64,
    "prompt_cache_miss_tokens": 36,
    "total_tokens": 107,
}

TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Find a row",
        "parameters": {"type": "object", "properties": {"id": {"type": "string"}}},
    },
}
"""A function tool's schema: DeepSeek bills every byte of it as prompt."""

BOUNDED_CHAT: dict[str, Any] = {
    "model": "deepseek-flash",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "x" * 92}],
}
"""A call whose bounds are small and known: what a hard budget reserves for it is exact."""
BOUNDED_USAGE: dict[str, Any] = {
    "prompt_tokens": 100,
    "completion_tokens": 20,
    "prompt_cache_hit_tokens": 0,
    "prompt_cache_miss_tokens": 100,
    "total_tokens": 120,
}
"""Within `BOUNDED_CHAT`'s bounds, so it is billed as reported."""
BOUNDED_CALL_COST = Decimal("0.00036")
"""`BOUNDED_USAGE` at peak on deepseek-flash: 100 x 2 + 20 x 8 CNY per million."""
