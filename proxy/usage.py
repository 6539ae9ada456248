"""The billable quantities of one call, as the pricing engine consumes them.

This is the boundary between usage parsing (which reads DeepSeek's JSON) and pricing (which is
pure arithmetic). It holds only counts: where they came from and whether they add up is the
parser's business, recorded beside them in the usage record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_NO_TOOLS: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token and tool-call counts of one call.

    `reasoning` is informational: DeepSeek counts reasoning tokens inside `output`
    (`completion_tokens`) and bills them at the output price, so pricing never adds them again.
    `tool_calls` maps a server-side tool name (``search``, ``fetch``) to the calls it billed.
    """

    cache_hit: int = 0
    cache_miss: int = 0
    output: int = 0
    reasoning: int = 0
    tool_calls: Mapping[str, int] = field(default_factory=lambda: _NO_TOOLS)

    def __post_init__(self) -> None:
        for name in ("cache_hit", "cache_miss", "output", "reasoning"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for tool, count in self.tool_calls.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"tool call count for {tool!r} must be a non-negative integer")

    @property
    def prompt(self) -> int:
        """Prompt tokens as DeepSeek counts them: cache hits plus cache misses."""
        return self.cache_hit + self.cache_miss
