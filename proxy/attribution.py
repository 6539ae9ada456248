"""Who a call was for, below the team: tags from a request header and the end user from the body.

Spend per team is not enough to run a company on: a team wants it per project, feature or
environment, and per end user of its product. The proxy records both on every call
(`proxy.records.CallRequest.tags`, `end_user`), in the ledger, where reports group by them; they
are Prometheus labels only where the operator says so, with a cap on distinct values
(`ProxyConfig.tag_labels`, `proxy.metrics.tags`), because an unbounded label is how peers'
metrics exploded.

**Tags** come in one header, ``x-proxy-tags: project=ranker,env=prod``: comma-separated
``key=value`` pairs. Keys must be allow-listed in the config (``attribution.tags``): a key not
listed is a 400, not silently dropped, so a typo is seen the first time. Values are 1 to
``attribution.tag_value_max_chars`` (default 64) characters from ``A-Z a-z 0-9 . _ : / @ + -``:
enough for ids, versions and paths, nothing a report or a terminal could trip on. A key given
twice is a 400 (which one would count?). The header is the proxy's own and never goes to
DeepSeek (`proxy.upstream.headers`).

**The end user** is read from the body as each API format names it: OpenAI's ``user``,
DeepSeek's own ``user_id`` (its KV-cache isolation field), Anthropic's ``metadata.user_id``,
the first present. The body goes upstream unchanged (the proxy never injects or strips it:
DeepSeek uses it to isolate caches, and setting it per tenant lowers cache hits). A value that
is not a short printable string is a 400, as the model name is: it is stored and reported.

A leaf module (pure parsing, no I/O): the config reads `AttributionConfig` from here, and the
relay turns `AttributionError` into its 400.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.records import storable

TAGS_HEADER = "x-proxy-tags"
"""The header a client puts its tags in."""
PARSED_HEADERS = 4096
"""Distinct tags headers a config keeps parsed (`AttributionConfig.read_tags`)."""
CACHED_HEADER_CHARS = 512
"""Longest header kept parsed: a valid header may be padded with spaces and empty pairs up
to the header size limit, and 4,096 of those must not hold 64 MB; a longer one is parsed
every time."""


class Tags(dict[str, str]):
    """A call's tags, sorted by key, never changed once parsed (the record holds them as a
    `Mapping`), with the JSON text the ledger stores computed once for all the calls that
    share the header, instead of once per row written."""

    __slots__ = ("json",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(items)
        self.json = json.dumps(self, sort_keys=True) if self else "{}"


NO_TAGS: Mapping[str, str] = Tags()
DEFAULT_TAG_VALUE_MAX_CHARS = 64


class AttributionError(ValueError):
    """A tag or end user the proxy does not accept; the relay answers it with a 400 in the
    request's API format, the message saying why."""


MAX_TAG_VALUE_CHARS = 256
"""The most `AttributionConfig.tag_value_max_chars` may be: what the ledger stores from outside
the proxy at most (`proxy.records.MAX_TEXT_CHARS`)."""
TAG_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
"""What a tag key may be (checked in the config): short, lower case, a valid label-like name."""
_VALUE_CHARS = r"A-Za-z0-9._:/@+\-"


@dataclass(frozen=True, slots=True)
class AttributionConfig:
    """``attribution`` in the config."""

    tags: frozenset[str] = frozenset()
    """Allow-listed tag keys; empty: the proxy accepts no tags (a tags header is a 400)."""
    tag_value_max_chars: int = DEFAULT_TAG_VALUE_MAX_CHARS
    _value: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _parsed: dict[str, Tags] = field(init=False, repr=False, compare=False)
    """Header text -> its tags: a client sends the same few headers over and over, so a call
    usually costs one lookup (bounded by `PARSED_HEADERS`; refused headers are not kept)."""

    def __post_init__(self) -> None:
        pattern = re.compile(f"[{_VALUE_CHARS}]{{1,{self.tag_value_max_chars}}}")
        object.__setattr__(self, "_value", pattern)
        object.__setattr__(self, "_parsed", {})

    def read_tags(self, header: str | None) -> Mapping[str, str]:
        """The tags of a call from its ``x-proxy-tags`` header (None: no header);
        `AttributionError` with the reason on anything not allowed."""
        if header is None:
            return NO_TAGS
        found = self._parsed.get(header)
        if found is None:
            found = self._parse(header)
            if len(header) <= CACHED_HEADER_CHARS:  # padding cannot make the cache large
                if len(self._parsed) >= PARSED_HEADERS:
                    self._parsed.clear()
                self._parsed[header] = found
        return found

    def _parse(self, header: str) -> Tags:
        tags: dict[str, str] = {}
        for part in header.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                raise AttributionError(
                    f"{TAGS_HEADER}: expected key=value pairs, got {part.strip()!r}"
                )
            if key not in self.tags:
                allowed = ", ".join(sorted(self.tags)) or "none (tags are not enabled)"
                raise AttributionError(
                    f"{TAGS_HEADER}: tag key {key[:40]!r} is not allowed; allowed: {allowed}"
                )
            if key in tags:
                raise AttributionError(f"{TAGS_HEADER}: tag key {key!r} is given twice")
            if not self._value.fullmatch(value):
                raise AttributionError(
                    f"{TAGS_HEADER}: the value of {key!r} must be 1 to "
                    f"{self.tag_value_max_chars} characters from A-Z a-z 0-9 . _ : / @ + -"
                )
            tags[key] = value
        return Tags(sorted(tags.items()))


DEFAULT_ATTRIBUTION = AttributionConfig()

_USER_FIELDS = ("user", "user_id")


def end_user(payload: Mapping[str, Any]) -> str | None:
    """The end user a request names (OpenAI ``user``, DeepSeek ``user_id``, Anthropic
    ``metadata.user_id``, the first present), or None; `AttributionError` if it is not a
    short printable string."""
    found: Any = None
    name = ""
    for name in _USER_FIELDS:
        found = payload.get(name)
        if found is not None:
            break
    else:
        metadata = payload.get("metadata")
        if type(metadata) is dict:
            name, found = "metadata.user_id", metadata.get("user_id")
    if found is None or found == "":
        return None
    if not isinstance(found, str) or not storable(found):
        raise AttributionError(f"{name!r} must be a string of at most 256 printable characters")
    return found
