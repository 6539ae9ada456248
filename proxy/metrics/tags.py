"""Tag values as metric labels, for the tag keys the operator names, with a cap on each.

Tags are recorded on every call in the ledger, where reports group by any of them. Metrics are
another matter: each distinct label value is a series Prometheus keeps in memory and every query
scans, so a tag whose values are ids (users, requests, branches) would grow the series without
bound, the failure peers kept hitting. So a tag key is a label only when the config lists it
under ``attribution.metric_labels``, with the most distinct values it may export: the first
`cap` values this process sees keep their own series, every later one is counted under
``other`` (`OTHER`), and ``llm_tag_values_overflow_total`` counts the calls that went there so
an operator sees the cap bite. Ten thousand distinct values leave the series count flat.

The set of values admitted is this process's: with ``serve --workers N`` each worker admits up
to its cap, so the exported series are at most N x cap per tag; a restart starts afresh.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.metrics.contract import OTHER


class TagValues:
    """The label value each tag value of the listed keys is exported as."""

    __slots__ = ("_caps", "_seen")

    def __init__(self, caps: Mapping[str, int]) -> None:
        self._caps = dict(caps)
        self._seen: dict[str, set[str]] = {key: set() for key in caps}

    def __bool__(self) -> bool:
        return bool(self._caps)

    def labels(self, tags: Mapping[str, str]) -> list[tuple[str, str, bool]]:
        """(tag key, label value, overflowed) for each listed key the call carries."""
        found = []
        for key, cap in self._caps.items():
            value = tags.get(key)
            if value is None:
                continue
            seen = self._seen[key]
            if value in seen:
                found.append((key, value, False))
            elif len(seen) < cap:
                seen.add(value)
                found.append((key, value, False))
            else:
                found.append((key, OTHER, True))
        return found
