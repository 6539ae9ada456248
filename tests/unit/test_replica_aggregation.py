"""Every shipped alert rule and dashboard query combines each metric across replicas as
docs/metrics.md's "Several replicas" table says: per-call counters summed, the figures every
replica reads from the shared ledger or the config taken with `max`, never summed or joined
bare (a second replica would double them, or make the join fail as many-to-many).

The table is read from the page itself, so the page, the rules and the dashboard cannot drift
apart; `tests.support.promql` reads the expressions. config/prometheus/alerts_test.yml runs the
rules on two replicas' series, and tests/integration/test_observability.py runs the dashboard
and the rules against two real proxies scraped by a real Prometheus."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from proxy.metrics.contract import FAMILIES
from tests.conftest import ROOT
from tests.support.promql import Rule, uses, violations

DOC = ROOT / "docs" / "metrics.md"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
DASHBOARDS = ROOT / "config" / "grafana" / "dashboards"
ROW = re.compile(r"^\| (?P<reports>[^|`]+?) \| `(?P<metric>\w+)` \| (?P<across>[^|]+) \|$")
OPERATOR = re.compile(r"`(sum|min|max|avg)\b[^`]*`")
SUMMED = Rule(frozenset({"sum"}), per_instance=True, sole=False)
"""Counters and histogram series: each replica counts its own calls (the table's first rows);
they sit inside `rate()` or `increase()`, so the aggregation never takes them alone."""


def section() -> list[str]:
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Several replicas")
    return lines[start + 1 :]


def documented_rules() -> dict[str, Rule]:
    """The table's one-metric rows: the aggregations it names, and "per `instance`"."""
    rules: dict[str, Rule] = {}
    for line in section():
        match = ROW.match(line)
        if match is None:
            continue
        across = match["across"]
        rules[match["metric"]] = Rule(
            frozenset(OPERATOR.findall(across)),
            per_instance="per `instance`" in across,
            sole=True,
        )
    return rules


def rules() -> dict[str, Rule]:
    """The documented gauges' rules, and `SUMMED` for every counter and histogram series."""
    table = documented_rules()
    for family in FAMILIES:
        if family.kind == "counter":
            table[family.name] = SUMMED
        elif family.kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                table[family.name + suffix] = SUMMED
    return table


def alert_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in panels(json.loads(path.read_text(encoding="utf-8"))["panels"]):
            for target in panel.get("targets", []):
                yield f"{path.name}: {panel['title']} ({target['refId']})", target["expr"]


def test_the_table_has_a_rule_for_every_gauge_and_for_up() -> None:
    gauges = {family.name for family in FAMILIES if family.kind == "gauge"}
    table = documented_rules()
    assert set(table) == gauges | {"up"}
    for metric, rule in table.items():
        assert rule.operators or rule.per_instance, metric


def test_shared_figures_are_taken_with_max_and_never_per_replica() -> None:
    """The figures every replica reads from the same ledger, config or price book."""
    shared = ("llm_team_spend", "llm_team_budget", "llm_team_budget_threshold")
    table = documented_rules()
    for metric in (*shared, "llm_holiday_calendar_missing"):
        assert table[metric] == Rule(frozenset({"max"}), per_instance=False, sole=True), metric


@pytest.mark.parametrize("expr", [pytest.param(expr, id=name) for name, expr in alert_exprs()])
def test_alert_rules_combine_replicas_as_documented(expr: str) -> None:
    assert violations(expr, rules()) == []


@pytest.mark.parametrize("expr", [pytest.param(expr, id=name) for name, expr in dashboard_exprs()])
def test_dashboard_queries_combine_replicas_as_documented(expr: str) -> None:
    assert violations(expr, rules()) == []


def test_every_metric_the_rules_and_dashboard_name_has_a_rule() -> None:
    """A metric missing from `rules()` would escape the checks above."""
    known = frozenset(rules())
    names = re.compile(r"\b(?:llm_\w+|up)\b")
    for name, expr in (*alert_exprs(), *dashboard_exprs()):
        selected = {use.metric for use in uses(expr, known)}
        named = set(names.findall(re.sub(r"\"[^\"]*\"|\{[^}]*\}", "", expr)))
        assert named <= selected, (name, named - selected)


# --- the check itself: what it must catch, and what it must let through -------------------------


@pytest.mark.parametrize(
    ("expr", "found"),
    [
        # A shared gauge summed over replicas: two replicas double the spend.
        (
            "sum by (team) (llm_team_spend)",
            ["llm_team_spend: combined across replicas with sum"],
        ),
        (
            "sum(llm_team_budget) by (team, period, currency)",
            ["llm_team_budget: combined across replicas with sum"],
        ),
        (
            "avg without (instance) (llm_team_spend)",
            ["llm_team_spend: combined across replicas with avg"],
        ),
        # Joined bare: many-to-many with two replicas, or one alert per replica.
        (
            "100 * llm_team_spend / on (team, period, currency) llm_team_budget >= 100",
            ["llm_team_spend: used per replica (bare)", "llm_team_budget: used per replica (bare)"],
        ),
        (
            "max by (instance) (llm_team_spend)",
            ["llm_team_spend: used per replica (max by instance)"],
        ),
        # The aggregation must take the gauge alone, not what it was first joined into.
        (
            "max by (team) (llm_team_spend / on (team) llm_team_budget)",
            [
                "llm_team_spend: max over more than the metric itself",
                "llm_team_budget: max over more than the metric itself",
            ],
        ),
        (
            "topk by (team) (1, llm_team_budget_threshold)",
            ["llm_team_budget_threshold: combined across replicas with topk"],
        ),
        ("max(rate(llm_cost_total[1h]))", ["llm_cost_total: combined across replicas with max"]),
        (
            "histogram_quantile(0.5, max by (le) (rate(llm_request_duration_seconds_bucket[5m])))",
            ["llm_request_duration_seconds_bucket: combined across replicas with max"],
        ),
        (
            "sum(llm_ledger_committing)",
            ["llm_ledger_committing: combined across replicas with sum"],
        ),
        # One alert per replica for the same price book.
        (
            "llm_holiday_calendar_missing == 1",
            ["llm_holiday_calendar_missing: used per replica (bare)"],
        ),
    ],
)
def test_the_check_catches(expr: str, found: list[str]) -> None:
    assert violations(expr, rules()) == found


@pytest.mark.parametrize(
    "expr",
    [
        'max by (team, currency) (llm_team_spend{period="day", team=~"$team"})',
        "max(llm_team_spend) by (team, period, currency)",
        "sum by (team) (llm_inflight_requests)",
        "sum by (instance) (llm_inflight_requests)",
        "sum without (team) (llm_inflight_requests)",  # keeps instance
        "llm_ledger_queued_records and on (job, instance) llm_ledger_committing == 0",
        "min(llm_ledger_committing)",
        "time() - max(llm_ledger_last_commit_timestamp_seconds)",
        'up{job="deepseek-proxy"} == 0',
        "sum by (model) (increase(llm_unpriced_requests_total[15m]) > 0"
        " or (llm_unpriced_requests_total unless llm_unpriced_requests_total offset 15m))",
        # A metric name inside a matcher or a string is not a selector.
        'sum(rate(llm_requests_total{team="llm_team_spend"}[5m]))',
    ],
)
def test_the_check_lets_through(expr: str) -> None:
    assert violations(expr, rules()) == []
