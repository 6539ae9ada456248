"""Reading ``attribution`` in the config: which tags clients may send, and which become labels.

```yaml
attribution:
  tags: [project, env, feature]   # allow-listed keys of the x-proxy-tags header
  tag_value_max_chars: 64         # 1 to 256
  metric_labels:                  # tag keys exported to Prometheus, each with a cap on
    project: 50                   #   its distinct values (the rest count as "other")
```

Every defect fails at start-up with the file, the key and the reason, as the rest of the
config does.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from proxy.attribution import (
    DEFAULT_ATTRIBUTION,
    DEFAULT_TAG_VALUE_MAX_CHARS,
    MAX_TAG_VALUE_CHARS,
    TAG_KEY,
    AttributionConfig,
)
from proxy.config.fields import Reader

MAX_LABEL_VALUES = 10_000
"""The most distinct values one tag may export as labels: past a few thousand series per
family Prometheus' memory and query time suffer; most operators want tens."""


NO_LABELS: Mapping[str, int] = MappingProxyType({})


def read_attribution(
    reader: Reader, raw: Mapping[str, Any]
) -> tuple[AttributionConfig, Mapping[str, int]]:
    """The ``attribution`` section: what tags are accepted (reloadable) and the tag keys
    exported as metric labels with their caps (a restart applies them: they shape metric
    families). Absent: no tags accepted, no tag labels."""
    section = reader.section(raw, "attribution")
    if not section:
        return DEFAULT_ATTRIBUTION, NO_LABELS
    reader.keys(section, "attribution", {"tags", "tag_value_max_chars", "metric_labels"})
    keys = section.get("tags", [])
    if not isinstance(keys, list):
        raise reader.fail("attribution.tags", "expected a list of tag keys")
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not TAG_KEY.fullmatch(key):
            raise reader.fail(
                f"attribution.tags[{index}]",
                f"expected a lower-case name (a letter, then letters, digits or '_', at most "
                f"32), got {key!r}",
            )
    if len(set(keys)) != len(keys):
        raise reader.fail("attribution.tags", "a tag key is listed twice")
    chars = reader.positive_int(
        section.get("tag_value_max_chars", DEFAULT_TAG_VALUE_MAX_CHARS),
        "attribution.tag_value_max_chars",
    )
    if chars > MAX_TAG_VALUE_CHARS:
        raise reader.fail(
            "attribution.tag_value_max_chars", f"at most {MAX_TAG_VALUE_CHARS}, got {chars}"
        )
    labels = section.get("metric_labels") or {}
    if not isinstance(labels, Mapping):
        raise reader.fail(
            "attribution.metric_labels", "expected a mapping of tag key -> most distinct values"
        )
    caps: dict[str, int] = {}
    for key, cap in labels.items():
        where = f"attribution.metric_labels.{key}"
        if key not in keys:
            raise reader.fail(where, "not a tag key listed in attribution.tags")
        caps[str(key)] = reader.positive_int(cap, where)
        if caps[str(key)] > MAX_LABEL_VALUES:
            raise reader.fail(where, f"at most {MAX_LABEL_VALUES:,} distinct values, got {cap}")
    return AttributionConfig(frozenset(keys), chars), MappingProxyType(caps)
