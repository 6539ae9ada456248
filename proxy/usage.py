"""The billable quantities of one call, as the pricing engine consumes them.

This is the boundary between usage parsing (which reads DeepSeek's JSON) and pricing (which is
pure arithmetic). It holds only counts: where they came from and whether they add up is the
parser's business, recorded beside them in the usage record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_NO_TOOLS: Mapping[str, int] = MappingProxyType({})


@dataclass(slots=True)
class TokenUsage:
    """Token and tool-call counts of one call.

    `reasoning` is informational: DeepSeek counts reasoning tokens inside `output`
    (`completion_tokens`) and bills them at the output price, so pricing never adds them again.
    `tool_calls` maps a server-side tool name (``search``, ``fetch``) to the calls it billed.

    Never changed once built, though not declared frozen, like the other per-call values
    (`proxy.records.UsageRecord`): a frozen dataclass's ``__init__`` costs several times more.
    """

    cache_hit: int = 0
    cache_miss: int = 0
    output: int = 0
    reasoning: int = 0
    tool_calls: Mapping[str, int] = field(default_factory=lambda: _NO_TOOLS)

    def __post_init__(self) -> None:
        hit, miss, output, reasoning = self.cache_hit, self.cache_miss, self.output, self.reasoning
        if not (
            type(hit) is int
            and type(miss) is int
            and type(output) is int  # bool (an int
            and type(reasoning) is int
            and hit >= 0
            and miss >= 0  # subclass) is refused
            and output >= 0
            and reasoning >= 0
        ):
            for name in ("cache_hit", "cache_miss", "output", "reasoning"):
                value = getattr(self, name)
                if type(value) is not int or value < 0:
                    raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for tool, count in self.tool_calls.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"tool call count for {tool!r} must be a non-negative integer")

    @property
    def prompt(self) -> int:
        """Prompt tokens as DeepSeek counts them: cache hits plus cache misses."""
        return self.cache_hit + self.cache_miss


MAX_TOKENS_PER_FIELD = 100_000_000
"""Larger counts are not believable for one call (DeepSeek's context is 1M tokens): such a usage
object is rejected as malformed rather than priced into an absurd cost."""

DEFAULT_TOOL_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        # `usage.server_tool_use` field -> tool name in the price book. DeepSeek's inner field names
        # are unverified (Anthropic's style is the likely one), so the config can extend this.
        "web_search_requests": "search",
        "search_requests": "search",
        "web_fetch_requests": "fetch",
        "fetch_requests": "fetch",
        "read_url_requests": "fetch",
    }
)

MAX_TOOL_FIELDS = 16
MAX_TOOL_FIELD_CHARS = 64
"""An unknown ``server_tool_use`` field is recorded under its own name (and flagged), so the
names and their number are bounded like every other string the ledger takes from DeepSeek;
DeepSeek has two tools today."""

FLAG_PROMPT_MISMATCH = "prompt_tokens_mismatch"
"""hit + miss != prompt_tokens: recorded as reported, never silently "fixed"."""
FLAG_CACHE_FIELDS_MISSING = "cache_fields_missing"
"""No DeepSeek cache fields: hit taken from `cached_tokens` (else 0), miss = prompt - hit."""
FLAG_UNKNOWN_TOOL_FIELD = "unknown_tool_field:"
"""Prefix: a `server_tool_use` field with no known tool name; counted under the field name."""


@dataclass(slots=True)
class ReportedUsage:
    """A usage object read from a DeepSeek response, with what was odd about it."""

    tokens: TokenUsage
    prompt_tokens: int
    flags: tuple[str, ...]


UsageReader = Callable[[object, Mapping[str, str]], "ReportedUsage"]
"""Reads one API format's usage object (`parse_usage`, `proxy.dialects`)."""


class MalformedUsage(ValueError):
    """The usage object cannot be trusted (wrong types, negative or absurd counts)."""


def read_count(obj: Mapping[str, object], key: str, *, required: bool = False) -> int | None:
    """A token count of a usage object: None if absent (or null), `MalformedUsage` if it is
    not a believable non-negative integer (every API format's counts are read through it)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise MalformedUsage(f"usage has no {key}")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedUsage(f"usage {key} is not an integer: {value!r}")
    if not 0 <= value <= MAX_TOKENS_PER_FIELD:
        raise MalformedUsage(f"usage {key} out of range: {value}")
    return value


def parse_usage(obj: object, tool_fields: Mapping[str, str] = DEFAULT_TOOL_FIELDS) -> ReportedUsage:
    """Read DeepSeek's usage object (chat or FIM, streamed or not).

    DeepSeek's own `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` are the billing
    truth; OpenAI's `prompt_tokens_details.cached_tokens` is only a fallback. Reasoning tokens
    are already inside `completion_tokens`.
    """
    if type(obj) is not dict and not isinstance(obj, Mapping):  # JSON gives dicts: checked
        raise MalformedUsage(f"usage is not an object: {type(obj).__name__}")  # first
    flags: list[str] = []
    prompt, output = obj.get("prompt_tokens"), obj.get("completion_tokens")
    hit, miss = obj.get("prompt_cache_hit_tokens"), obj.get("prompt_cache_miss_tokens")
    if not (
        type(prompt) is int
        and type(output) is int
        and type(hit) is int  # the usual
        and type(miss) is int
        and 0 <= prompt <= MAX_TOKENS_PER_FIELD  # case, checked in
        and 0 <= output <= MAX_TOKENS_PER_FIELD
        and 0 <= hit <= MAX_TOKENS_PER_FIELD  # one
        and 0 <= miss <= MAX_TOKENS_PER_FIELD
    ):  # go; `read_count` says what is wrong
        prompt = read_count(obj, "prompt_tokens", required=True)
        output = read_count(obj, "completion_tokens", required=True)
        hit = read_count(obj, "prompt_cache_hit_tokens")
        miss = read_count(obj, "prompt_cache_miss_tokens")
    assert prompt is not None and output is not None
    if hit is None and miss is None:
        details = obj.get("prompt_tokens_details")
        cached = read_count(details, "cached_tokens") if isinstance(details, Mapping) else None
        hit = cached or 0
        miss = max(prompt - hit, 0)
        flags.append(FLAG_CACHE_FIELDS_MISSING)
    hit = hit or 0
    miss = miss or 0
    if hit + miss != prompt:
        flags.append(FLAG_PROMPT_MISMATCH)
    completion_details = obj.get("completion_tokens_details")
    reasoning = 0
    if completion_details is not None and isinstance(completion_details, Mapping):
        reasoning = read_count(completion_details, "reasoning_tokens") or 0
    tool_calls = read_server_tools(obj, tool_fields, flags)
    usage = TokenUsage(hit, miss, output, reasoning, tool_calls)
    return ReportedUsage(usage, prompt, tuple(flags))


def read_server_tools(
    obj: Mapping[str, object], tool_fields: Mapping[str, str], flags: list[str]
) -> Mapping[str, int]:
    """The server-side tool calls of ``usage.server_tool_use`` (the same field in DeepSeek's
    chat, Anthropic and Responses usage), by tool name; an unknown field is counted under its
    own name and flagged in `flags`, never dropped."""
    server_tools = obj.get("server_tool_use")
    if server_tools is None or not isinstance(server_tools, Mapping):
        return _NO_TOOLS
    if len(server_tools) > MAX_TOOL_FIELDS or not all(
        isinstance(k, str) and 0 < len(k) <= MAX_TOOL_FIELD_CHARS and k.isprintable()
        for k in server_tools
    ):
        raise MalformedUsage(
            "usage server_tool_use has too many fields, or names that are not short printable text"
        )
    tools: dict[str, int] = {}
    for field_name in server_tools:
        count = read_count(server_tools, str(field_name)) or 0
        tool = tool_fields.get(str(field_name))
        if tool is None:
            tool = str(field_name)
            flags.append(FLAG_UNKNOWN_TOOL_FIELD + tool)
        if count:
            tools[tool] = tools.get(tool, 0) + count
    return MappingProxyType(tools) if tools else _NO_TOOLS


def estimate_tokens(text: str) -> int:
    """Rough token count of text, by DeepSeek's published rule of thumb: about 0.3 token per
    ASCII character and 0.6 per other character (CJK). Used only when usage never arrived."""
    ascii_chars = sum(1 for ch in text if ch < "\x80")
    other = len(text) - ascii_chars
    return (3 * ascii_chars + 6 * other + 9) // 10
