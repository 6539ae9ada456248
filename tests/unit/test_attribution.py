"""Attribution's pure parts: the config section, tag parsing, the label cap, and records written
before tags existed."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry

from proxy.attribution import PARSED_HEADERS, AttributionConfig, AttributionError, end_user
from proxy.config import ConfigError, load_config
from proxy.metrics import MetricSources, ProxyMetrics
from proxy.pricing import PriceBook
from proxy.records import CallRequest, UsageRecord
from tests.support.config_files import ONE_TEAM, config_with_shipped_book
from tests.support.proxy_harness import PEAK

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_the_config_section_is_read(tmp_path: Path) -> None:
    config = load_config(
        config_with_shipped_book(
            tmp_path,
            ONE_TEAM + "attribution:\n  tags: [project, env]\n  tag_value_max_chars: 40\n"
            "  metric_labels: {project: 25}\n",
        )
    )
    assert config.attribution == AttributionConfig(frozenset({"project", "env"}), 40)
    assert dict(config.tag_labels) == {"project": 25}
    default = load_config(config_with_shipped_book(tmp_path, ONE_TEAM))
    assert default.attribution.tags == frozenset() and dict(default.tag_labels) == {}


@pytest.mark.parametrize(
    ("section", "key", "reason"),
    [
        ("tags: project", "attribution.tags", "expected a list of tag keys"),
        ("tags: [Project]", "attribution.tags[0]", "expected a lower-case name"),
        ("tags: [a, a]", "attribution.tags", "a tag key is listed twice"),
        ("tags: [a]\n  tag_value_max_chars: 300", "attribution.tag_value_max_chars", "at most 256"),
        ("tags: [a]\n  metric_labels: {b: 5}", "attribution.metric_labels.b", "not a tag key"),
        ("tags: [a]\n  metric_labels: {a: 20000}", "attribution.metric_labels.a", "at most 10,000"),
        ("tags: [a]\n  metric_labels: [a]", "attribution.metric_labels", "expected a mapping"),
        ("tag: [a]", "attribution.tag", ""),
    ],
)
def test_a_bad_section_fails_at_start_up_naming_the_key(
    tmp_path: Path, section: str, key: str, reason: str
) -> None:
    path = config_with_shipped_book(tmp_path, ONE_TEAM + f"attribution:\n  {section}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_tags_parse_to_a_sorted_mapping() -> None:
    config = AttributionConfig(frozenset({"project", "env", "feature"}))
    tags = config.read_tags("project=ranker, env=prod,,feature=a.b/c@d+e:f-g_h")
    assert list(tags.items()) == [
        ("env", "prod"),
        ("feature", "a.b/c@d+e:f-g_h"),
        ("project", "ranker"),
    ]
    assert config.read_tags(None) == {} and config.read_tags(" , ") == {}
    with pytest.raises(AttributionError, match="not allowed"):
        config.read_tags("Project=x")


def test_end_user_precedence() -> None:
    assert end_user({"user": "a", "user_id": "b", "metadata": {"user_id": "c"}}) == "a"
    assert end_user({"user_id": "b", "metadata": {"user_id": "c"}}) == "b"
    assert end_user({"metadata": {"user_id": "c"}}) == "c"
    assert end_user({"metadata": "not an object"}) is None
    assert end_user({}) is None


def test_ten_thousand_tag_values_leave_the_series_flat(book: PriceBook) -> None:
    """A cap of 20: the 20 first values have series, 9,980 others are one ``other`` series,
    every call counted, the overflow too."""
    registry = CollectorRegistry()
    metrics = ProxyMetrics(
        registry,
        MetricSources(("alpha",), book, SHANGHAI, lambda: PEAK, tag_labels={"user": 20}),
    )
    base = UsageRecord.in_flight(
        CallRequest("r", "alpha", "k_00000000", "chat", False, "deepseek-flash", {}, None),
        datetime(2026, 11, 2, tzinfo=UTC),
        book.digest,
    )
    for i in range(10_000):
        base.tags = {"user": f"u{i}"}
        metrics.observe(base, 0.0)
    samples = [
        s
        for family in registry.collect()
        if family.name == "llm_tag_requests"
        for s in family.samples
        if s.name == "llm_tag_requests_total"
    ]
    assert len(samples) == 21
    assert sum(s.value for s in samples) == 10_000
    assert {s.labels["value"]: s.value for s in samples}["other"] == 9_980
    assert registry.get_sample_value("llm_tag_values_overflow_total", {"tag": "user"}) == 9_980


def test_a_spill_line_written_before_tags_existed_still_reads() -> None:
    call = CallRequest("r1", "alpha", "k_00000000", "chat", False, "deepseek-flash", {}, None)
    record = UsageRecord.in_flight(call, datetime(2026, 11, 2, tzinfo=UTC), "digest")
    line = record.to_json()
    del line["tags"], line["end_user"]
    again = UsageRecord.from_json(json.loads(json.dumps(line)))
    assert again.tags == {} and again.end_user is None
    assert again == record


def test_the_parsed_headers_stay_bounded() -> None:
    """Distinct valid headers, padded to 2 KB each: none is kept (parsed every time); short
    ones are kept up to the cap, then the cache starts afresh."""
    config = AttributionConfig(frozenset({"project"}))
    for i in range(100):
        padded = f"project=p{i}" + " ," * 1000
        assert config.read_tags(padded) == {"project": f"p{i}"}
    assert config._parsed == {}
    for i in range(PARSED_HEADERS + 10):
        config.read_tags(f"project=p{i}")
    assert 0 < len(config._parsed) <= PARSED_HEADERS
