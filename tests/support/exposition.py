"""What ``/metrics`` answers, read back as Prometheus would: the sample values of one family."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
"""A sample's labels, sorted by name."""


def series(text: bytes, name: str) -> dict[Labels, float]:
    """The samples called `name` (as exposed: ``llm_requests_total``, ``..._bucket``) in the
    text format `text`, by their sorted labels; empty if there are none."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if sample.name == name
    }


def families(text: bytes) -> set[str]:
    """The names of the families `text` holds (a counter's without ``_total``)."""
    return {family.name for family in text_string_to_metric_families(text.decode())}
