"""Alerts, alert routing and the Grafana dashboard, checked with the real Prometheus tools.

`promtool` and `amtool` validate the files and run the alerts' unit tests
(`config/prometheus/alerts_test.yml`). Then a real Prometheus scrapes two replicas of the real
proxy (in this process, against the fake DeepSeek, sharing one real ledger) every second, and
every query of the dashboard must return data and every alert rule must evaluate without
error: a renamed metric or label, or a join that matches many-to-many (as a join of two
replicas' spend would), fails here rather than in production. The dashboard's budget figures
must equal the ledger's, not twice them, and a team over budget must alert once. The panels
that total the dashboard's time range must equal `python -m proxy report` for the calls made in
it, series born inside the range included (issue 16), and their queries are also run by
promtool on series that fail a scrape, restart or vanish.

The tools come from Debian's `prometheus` and `prometheus-alertmanager` packages (`.ci/run`
installs them). Without them the tests are skipped locally, and fail in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from proxy.app import POLLER
from proxy.config import Budget
from proxy.ledger.queries import open_sqlite
from proxy.ledger.store import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.pricing import PriceBook
from proxy.reconcile.live import LiveBook, SQLiteSource
from proxy.reconcile.poller import Polled
from tests.conftest import ROOT, SHIPPED_BOOK
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import Reply
from tests.support.ledger_rows import write_config
from tests.support.proxy_harness import OFF_PEAK, PEAK, TEAM_KEYS, RunningProxy, running_proxy
from tests.support.requests import CHAT, USAGE

PROMETHEUS_DIR = ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
ALERTMANAGER = ROOT / "config" / "alertmanager" / "alertmanager.yml"
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "deepseek-proxy.json"
INSTALL = "apt-get install prometheus prometheus-alertmanager"
T = TypeVar("T")

CALLS_PER_ROUND = 10
REPLICAS = 2
DEADLINE = 30.0  # seconds; the whole live test takes about ten
POLL = 0.1
# Prometheus stamps a scrape with its scheduled instant when it starts within 2 ms of it, so a
# stamp can be a little later than the scrape's real start.
STAMP_TOLERANCE = 0.01


def tool(name: str) -> str:
    """The path of a Prometheus tool: skipped if missing locally, a failure in CI."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; CI must install it ({INSTALL}, see .ci/run)")
        pytest.skip(f"{name} is not installed ({INSTALL}); CI runs this test")
    return path


def run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def all_rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def rules() -> list[dict[str, Any]]:
    """The alert rules."""
    return [rule for rule in all_rules() if "alert" in rule]


def recording_rules() -> dict[str, str]:
    """The recording rules: recorded name -> expression."""
    return {rule["record"]: rule["expr"] for rule in all_rules() if "record" in rule}


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        yield panel
        yield from panel.get("panels", [])


# --- static checks with promtool and amtool ------------------------------------------------------


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.replicas.yml"])
def test_prometheus_config_is_valid(name: str) -> None:
    # rule_files resolve next to the file; the targets are compose service names.
    output = run(tool("promtool"), "check", "config", str(PROMETHEUS_DIR / name))
    assert "1 rule files found" in output


def test_alert_rules_are_valid() -> None:
    run(tool("promtool"), "check", "rules", str(ALERTS))


def test_alert_rules_pass_their_unit_tests() -> None:
    run(tool("promtool"), "test", "rules", str(ALERTS_TEST))


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
            for alert in case["exp_alerts"]:
                assert {"team", "severity"} <= set(alert["exp_labels"]), case
                assert {"summary", "description"} <= set(alert["exp_annotations"]), case
    names = {rule["alert"] for rule in rules()}
    assert {name: cases.get(name, set()) for name in names} == {
        name: {True, False} for name in names
    }


def test_every_alert_has_severity_and_annotations() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, rule["alert"]
        assert "{{ $" in annotations["description"], rule["alert"]  # the numbers, the names


def test_alertmanager_config_is_valid() -> None:
    run(tool("amtool"), "check-config", str(ALERTMANAGER))


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (["team=example", "severity=warning"], "team-example"),
        (["team=example", "severity=critical"], "oncall,team-example"),
        (["team=platform", "severity=critical"], "oncall,team-platform"),
        (["team=platform", "severity=warning"], "team-platform"),
        (["team=unknown-team", "severity=warning"], "default"),
        (["team=unknown-team", "severity=critical"], "oncall"),  # a match: no default
    ],
)
def test_alertmanager_routes_by_team_and_severity(labels: list[str], receivers: str) -> None:
    output = run(
        tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels
    )
    assert receivers in output.splitlines()


def label_variables() -> list[dict[str, Any]]:
    """The dashboard's variables that select label values (the first one picks the
    Prometheus)."""
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    return [variable for variable in variables if variable["type"] != "datasource"]


def test_every_panel_and_variable_queries_the_chosen_prometheus() -> None:
    """One dashboard for the single proxy's Prometheus and the replica stack's: the first
    variable picks which, and every panel, query and variable follows it."""
    dashboard = json.loads(DASHBOARD.read_text())
    first, *others = dashboard["templating"]["list"]
    assert (first["name"], first["type"], first["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    assert first["current"]["value"] == "prometheus"  # the single stack's, the default
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == chosen, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == chosen, (panel["title"], target["refId"])
    for variable in others:
        assert variable["datasource"] == chosen, variable["name"]


def test_dashboard_variables_are_multi_value_and_used() -> None:
    variables = label_variables()
    assert [variable["name"] for variable in variables] == ["team", "model", "currency"]
    exprs = " ".join(
        target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])
    )
    for variable in variables:
        assert variable["type"] == "query"
        assert variable["definition"].startswith("label_values(")
        assert (variable["multi"], variable["includeAll"], variable["allValue"]) == (
            True,
            True,
            ".*",
        )
        name = variable["name"]
        assert f'=~"${name}"' in exprs, name


# --- totals over the dashboard's time range and the error ratio ----------------------------------

TOTAL_PANELS = (
    "Spend in the time range",
    "Cache savings in the time range",
    "Calls refused by a hard budget",
    "Peak vs off-peak share of spend",
    "Calls with missing usage",
    "Unpriced calls by model",
)
RANGE_SELECTOR = re.compile(r"(\w+\{[^}]*\})\[\$__range\]")


def range_total(selector: str) -> str:
    """How the dashboard totals the counter `selector` over its time range (docs/metrics.md,
    "Totals over a time range"): per series, its last value in the range minus its value at the
    range's start (its last sample in the 5 minutes before, a failed scrape's staleness marker
    ignored; 0 for a series born inside the range), or Prometheus' `increase()` for a series
    that went down (a proxy restart). `increase()` alone extrapolates, and cannot see a series'
    first count: issue 16's "Unpriced calls by model" showed 0 for 2 calls."""
    latest = f"last_over_time({selector}[$__range])"
    at_start = f"last_over_time({selector}[5m] offset $__range)"
    return (
        f"    {latest}\n"
        f"  - ({at_start} or {latest} * 0)\n"
        f"  unless resets({selector}[$__range]) > 0\n"
        f"  unless min_over_time({selector}[$__range]) < {at_start}\n"
        f"  or increase({selector}[$__range])\n"
    )


def panel_expr(title: str) -> str:
    """The query of the panel titled `title` (one query)."""
    [expr] = [
        str(target["expr"])
        for panel in dashboard_panels()
        if panel["title"] == title
        for target in panel["targets"]
    ]
    return expr


def test_every_total_over_the_range_counts_first_samples() -> None:
    """Every query over `$__range` takes its counters through `range_total`, none through a
    bare `increase()`."""
    totals = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            if "$__range" not in expr:
                continue
            totals.append(panel["title"])
            for selector in set(RANGE_SELECTOR.findall(expr)):
                expr = expr.replace(range_total(selector), "")
            assert "$__range" not in expr, (panel["title"], expr)
    assert sorted(totals) == sorted(TOTAL_PANELS)


def test_range_totals_on_the_prometheus_engine(tmp_path: Path) -> None:
    """Two panels' own queries, run by promtool (Prometheus' engine) on two replicas' series
    sampled every minute, over the range (5m, 10m]: a series there at the start, one born
    inside (its first count counts), a failed scrape at the start (the sample before it is the
    start), a restart inside, a replica gone before the end, a series unchanged."""
    a = 'job="deepseek-proxy", instance="proxy-a:8080"'
    b = 'job="deepseek-proxy", instance="proxy-b:8080"'
    flash = 'model="deepseek-flash"'
    series = {
        f'llm_cost_total{{team="alpha", {flash}, currency="CNY", tier="peak", {a}}}': "0+1x20",
        # born at 2.5 inside the range: 3
        f'llm_cost_total{{team="alpha", {flash}, currency="CNY", tier="peak", {b}}}': (
            "_x7 2.5 2.5 3 3"
        ),
        # a failed scrape at 5m (a staleness marker), no restart: 4.5 - 2
        (
            'llm_cost_total{team="alpha", model="deepseek-v4-pro", currency="CNY",'
            f' tier="off_peak", {a}}}'
        ): "0+0.5x4 stale 2.5 3 3.5 4 4.5",
        # restarted at 7m: 7 - 6 before, 3 after; samples at both ends, so increase() is exact
        f'llm_cost_total{{team="beta", {flash}, currency="CNY", tier="peak", {b}}}': (
            "1+1x6 stale 1 2 3"
        ),
        f'llm_cost_total{{team="beta", {flash}, currency="USD", tier="peak", {a}}}': "3x20",
        # gone at 8m: 7 - 5
        f'llm_cost_total{{team="beta", {flash}, currency="USD", tier="peak", {b}}}': (
            "0+1x7 stale"
        ),
        # issue 16: born at 2 inside the range, where increase() shows 0
        f'llm_unpriced_requests_total{{model="deepseek-chat", {a}}}': "_x7 2 2 2 2",
        # born before the range: 0
        f'llm_unpriced_requests_total{{model="other", {a}}}': "_x2 1x8",
        f'llm_unpriced_requests_total{{model="other", {b}}}': "_x9 1 1",
    }
    variables = {**ALL, "__range": "300s"}

    def expected(values: dict[str, float]) -> list[dict[str, Any]]:
        return [{"labels": labels, "value": value} for labels, value in values.items()]

    spend = substitute(panel_expr("Spend in the time range"), variables)
    unpriced = substitute(panel_expr("Unpriced calls by model"), variables)
    cases: list[tuple[str, dict[str, float]]] = [
        (
            spend,
            {
                '{team="alpha", currency="CNY"}': 5 + 3 + 2.5,
                '{team="beta", currency="CNY"}': 4,
                '{team="beta", currency="USD"}': 2,
            },
        ),
        (unpriced, {'{model="deepseek-chat"}': 2, '{model="other"}': 1}),
        # What the panel showed before: the new model's calls invisible.
        (
            'sum by (model) (increase(llm_unpriced_requests_total{model=~".*"}[300s]))',
            {'{model="deepseek-chat"}': 0, '{model="other"}': 0},
        ),
    ]
    test_file = tmp_path / "range_totals_test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [],
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [
                            {"series": name, "values": values} for name, values in series.items()
                        ],
                        "promql_expr_test": [
                            {"expr": expr, "eval_time": "10m", "exp_samples": expected(values)}
                            for expr, values in cases
                        ],
                    }
                ],
            }
        )
    )
    run(tool("promtool"), "test", "rules", str(test_file))


def test_the_error_ratio_panel_shows_what_its_alert_compares() -> None:
    """One recording rule is both the panel and the alert's ratio, and it leaves out the
    clients' own malformed requests (400, 422) as the alert always did."""
    recorded = "proxy:upstream_error_ratio:rate5m"
    expr = recording_rules()[recorded]
    assert 'llm_upstream_errors_total{reason!~"http_400|http_422"}' in expr
    [alert] = [rule for rule in rules() if rule["alert"] == "UpstreamErrorRatioHigh"]
    assert alert["expr"].startswith(f"{recorded} > 0.1\n")
    assert panel_expr("Upstream error ratio") == recorded


# --- a real Prometheus scraping the real proxy ---------------------------------------------------


class SwitchingClock:
    """Wall time elapsed since the last switch, added to a fixed instant: calls keep their real
    durations, and the test moves the proxy between a peak and an off-peak instant between
    rounds of traffic (never during a call) so that both tiers get cost."""

    def __init__(self, instant: datetime) -> None:
        self.switch(instant)

    def switch(self, instant: datetime) -> None:
        self._base = instant
        self._since = time.monotonic()

    def __call__(self) -> datetime:
        return self._base + timedelta(seconds=time.monotonic() - self._since)


@dataclass
class Stack:
    """Two replicas sharing one ledger: each reports the spend it reads from it and counts its
    own calls, as replicas sharing a PostgreSQL ledger do."""

    replicas: tuple[RunningProxy, RunningProxy]
    writer: LedgerWriter
    store: SQLiteLedger
    clock: SwitchingClock


async def eventually(condition: Callable[[], Awaitable[T]], what: str) -> T:
    """The first truthy result of `condition`, polled until DEADLINE."""
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                result = await condition()
                if result:
                    return result
                await asyncio.sleep(POLL)
    except TimeoutError:
        raise AssertionError(f"not within {DEADLINE} s: {what}") from None


class Prometheus:
    """The HTTP API of a running Prometheus."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def get(self, path: str, **params: str) -> Any:
        response = await self.http.get(path, params=params)
        body = response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str, at: int | None = None) -> list[dict[str, Any]]:
        """`expr` evaluated now, or at the Unix time `at`."""
        params = {"query": expr} if at is None else {"query": expr, "time": str(at)}
        data = await self.get("/api/v1/query", **params)
        return data["result"]  # type: ignore[no-any-return]

    async def wait_for_scrapes(self, count: int, after: float | None = None) -> None:
        """Return once `count` successful scrapes of every replica started after this call (or
        after the Unix time `after`)."""
        after = (time.time() if after is None else after) + STAMP_TOLERANCE

        async def scraped() -> bool:
            series = await self.query('up{job="deepseek-proxy"}[1m]')
            stamps = [
                [
                    float(stamp)
                    for stamp, value in s["values"]
                    if value == "1" and float(stamp) > after
                ]
                for s in series
            ]
            return len(stamps) == REPLICAS and all(len(each) >= count for each in stamps)

        await eventually(scraped, f"{count} scrape(s) of each replica")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def stack(fake: FakeDeepSeek, book: PriceBook, tmp_path: Path) -> AsyncIterator[Stack]:
    """Two replicas of the proxy sharing a real ledger, with budgets for both teams; alpha's day
    budget is tiny so that the budget alerts have something to say. Each replica can poll
    DeepSeek's balance (when the test asks it to)."""
    store = SQLiteLedger(tmp_path / "ledger.sqlite3", ZoneInfo("Asia/Shanghai"))
    balances = [LiveBook(SQLiteSource(store.path)) for _ in range(REPLICAS)]
    writer = LedgerWriter(store, flush_interval=0.01)
    clock = SwitchingClock(PEAK)
    soft = (Decimal(50), Decimal(80))
    budgets = tuple(
        Budget(
            team,
            period,
            Decimal("0.001") if (team, period) == ("alpha", "day") else Decimal(100),
            "CNY",
            soft=soft,
            hard=False,
        )
        for team in TEAM_KEYS
        for period in ("day", "week", "month")
    )
    options: dict[str, Any] = {
        "clock": clock,
        "budgets": budgets,
        "spend": store.spend,
        "sink": writer,
        "ledger": writer,
    }
    try:
        async with (
            running_proxy(fake.base_url, book, balance=balances[0], **options) as replica_a,
            running_proxy(fake.base_url, book, balance=balances[1], **options) as replica_b,
        ):
            yield Stack((replica_a, replica_b), writer, store, clock)
    finally:
        for balance in balances:
            balance.close()
        writer.close()


@pytest.fixture
async def prometheus(stack: Stack, tmp_path: Path) -> AsyncIterator[Prometheus]:
    """A real Prometheus on a free loopback port, scraping both replicas every second and
    evaluating alerts.yml; always stopped."""
    binary = tool("prometheus")
    port = free_port()
    targets = [replica.url.removeprefix("http://") for replica in stack.replicas]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "evaluation_interval": "1s",
                },
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {"job_name": "deepseek-proxy", "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def ready() -> bool:
                assert process.returncode is None, "Prometheus exited"
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/-/ready")).status_code == 200
                return False

            await eventually(ready, "Prometheus ready")
            yield Prometheus(http)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        print(log.read_text()[-5000:])  # shown by pytest only if the test failed


Call = tuple[str, str, dict[str, Any], Reply]
"""A team, a path, the body it posts and the fake DeepSeek's reply."""


async def send_calls(
    stack: Stack, replica: RunningProxy, fake: FakeDeepSeek, calls: list[Call]
) -> None:
    """`calls` to `replica`, one after another; returns once their records are in the ledger
    (and so in the proxy's counters)."""
    done = len(replica.sink.records)
    async with httpx.AsyncClient(base_url=replica.url) as http:
        for team, path, body, reply in calls:
            fake.enqueue(reply)
            await http.post(path, json=body, headers={"Authorization": f"Bearer {TEAM_KEYS[team]}"})
    await replica.sink.wait_for(done + len(calls))
    await asyncio.to_thread(stack.writer.flush)


async def send_round(stack: Stack, replica: RunningProxy, fake: FakeDeepSeek) -> None:
    """One round of traffic to `replica` that feeds every series the dashboard shows: both
    teams, both endpoints, streaming and not, cache hits, tool calls, an error, a cut stream
    (missing usage) and a model the price book does not know (unpriced)."""
    calls: list[Call] = [
        ("alpha", "/chat/completions", CHAT, Reply(usage=USAGE)),
        (
            "alpha",
            "/chat/completions",
            {**CHAT, "stream": True},
            Reply(usage=USAGE, server_tool_use={"web_search_requests": 2}),
        ),
        ("alpha", "/v1/chat/completions", {**CHAT, "model": "deepseek-v4-pro"}, Reply()),
        (
            "alpha",
            "/beta/completions",
            {"model": "deepseek-flash", "prompt": "def add(a, b):"},
            Reply(),
        ),
        ("alpha", "/chat/completions", CHAT, Reply(status=500)),
        (
            "beta",
            "/chat/completions",
            CHAT,
            Reply(usage=USAGE, server_tool_use={"web_search_requests": 1}),
        ),
        ("beta", "/chat/completions", {**CHAT, "stream": True}, Reply(cut_after_events=2)),
        ("beta", "/chat/completions", {**CHAT, "model": "my-own-model"}, Reply()),
        (
            "beta",
            "/chat/completions",
            {**CHAT, "model": "deepseek-v4-pro", "stream": True},
            Reply(usage=USAGE),
        ),
        ("beta", "/chat/completions", CHAT, Reply(status=429)),
    ]
    assert len(calls) == CALLS_PER_ROUND
    await send_calls(stack, replica, fake, calls)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """What Grafana sends for a panel query: template variables and interval macros replaced."""
    for name, value in {
        "__rate_interval": "1m",
        "__interval": "15s",
        "__range": "1h",
        **variables,
    }.items():
        expr = re.sub(rf"\$(?:\{{{name}\}}|{name}\b)", value, expr)
    assert "$" not in expr, expr
    return expr


ALL = {"team": ".*", "model": ".*", "currency": ".*"}
# Grafana's form of a multi-value selection in a regex matcher.
SELECTED = {"team": "beta", "model": "(deepseek-flash|other)", "currency": "CNY"}


async def test_dashboard_and_alerts_on_a_real_prometheus(
    stack: Stack, prometheus: Prometheus, fake: FakeDeepSeek
) -> None:
    await eventually(
        lambda: prometheus.query(f'count(up{{job="deepseek-proxy"}} == 1) == {REPLICAS}'),
        "both replicas up",
    )

    # Every series is born in the first two rounds; the next two move every counter, so that
    # rate() and increase() have two scrapes with a difference between them. One replica
    # serves the peak rounds, the other the off-peak ones.
    replica_a, replica_b = stack.replicas
    for _ in range(2):
        for instant, replica in ((PEAK, replica_a), (OFF_PEAK, replica_b)):
            stack.clock.switch(instant)
            await send_round(stack, replica, fake)
        await prometheus.wait_for_scrapes(1)
    await prometheus.wait_for_scrapes(2)

    tiers = {
        s["metric"]["tier"]
        for s in await prometheus.query("sum by (tier) (increase(llm_cost_total[1m])) > 0")
    }
    assert {"peak", "off_peak"} <= tiers

    # Each replica counts its own calls; summed, every call counts once.
    [calls] = await prometheus.query("sum(llm_requests_total)")
    assert float(calls["value"][1]) == 4 * CALLS_PER_ROUND

    # Both replicas report the shared ledger's spend; the dashboard shows it once.
    alpha_day = 'team="alpha", period="day", currency="CNY"'
    reported = await prometheus.query(f"llm_team_spend{{{alpha_day}}}")
    assert len(reported) == REPLICAS
    [spent] = {float(sample["value"][1]) for sample in reported}
    assert spent > 0
    [budget_used] = [
        target["expr"]
        for panel in dashboard_panels()
        if panel["title"] == "Budget used"
        for target in panel["targets"]
    ]
    used = {
        (m["metric"]["team"], m["metric"]["period"], m["metric"]["currency"]): m["value"][1]
        for m in await prometheus.query(substitute(budget_used, ALL))
    }
    assert float(used["alpha", "day", "CNY"]) == pytest.approx(100 * spent / 0.001)

    # Two polls of DeepSeek's balance (one replica polls, holding the lease) make a window, so
    # the bill's drift has figures, which both replicas export from the ledger.
    for _ in range(2):
        assert await replica_a.app[POLLER].poll_once() is Polled.STORED
    assert await replica_b.app[POLLER].poll_once() is Polled.STANDBY

    # Every panel query returns data, with all values selected and with a selection; the error
    # ratio and the drift once their recording rules have been evaluated on two scrapes.
    for recorded in recording_rules():
        await eventually(partial(prometheus.query, recorded), f"{recorded} recorded")
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]
    assert len(queries) >= 20
    for variables in (ALL, SELECTED):
        for title, expr in queries:
            result = await prometheus.query(substitute(expr, variables))
            values = [float(sample["value"][1]) for sample in result]
            assert any(math.isfinite(value) for value in values), (title, variables, result)

    # The variables' label_values() queries list what the proxy exports.
    expected = {
        "team": {"alpha", "beta"},
        "model": {"deepseek-flash", "deepseek-v4-pro", "other"},
        "currency": {"CNY", "USD"},
    }
    for variable in label_variables():
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match is not None, variable["definition"]
        selector, label = match.groups()
        values = await prometheus.get(
            f"/api/v1/label/{label}/values", **{"match[]": substitute(selector, ALL)}
        )
        assert expected[variable["name"]] <= set(values), (variable["name"], values)

    # Every alert expression evaluates against the real metrics ...
    fired: dict[str, list[dict[str, str]]] = {}
    for rule in rules():
        result = await prometheus.query(rule["expr"])
        fired.setdefault(rule["alert"], []).extend(sample["metric"] for sample in result)
    # ... the budget joins match the labels the proxy really exports (alpha's day budget is
    # 0.001 CNY), once for both replicas ...
    assert [
        {k: m[k] for k in ("team", "period", "currency")}
        for m in fired["TeamOverBudget"]
        if m["team"] == "alpha"
    ] == [{"team": "alpha", "period": "day", "currency": "CNY"}]
    assert {"team": "alpha", "period": "day", "currency": "CNY", "threshold": "80"} in [
        {k: m[k] for k in ("team", "period", "currency", "threshold")}
        for m in fired["TeamBudgetThresholdCrossed"]
    ]
    assert {m["model"] for m in fired["UnpricedModelCalls"]} == {"other"}

    # ... and Prometheus' own rule evaluation reports no error.
    async def evaluated() -> list[tuple[str, str, str]]:
        groups = (await prometheus.get("/api/v1/rules"))["groups"]
        states = [
            (rule["name"], rule["health"], rule.get("lastError", ""))
            for group in groups
            for rule in group["rules"]
        ]
        return states if all(health != "unknown" for _, health, _ in states) else []

    states = await eventually(evaluated, "every alert rule evaluated")
    assert len(states) == len(all_rules())
    assert [state for state in states if state[1] != "ok"] == []


# Calls inside the range run at later instants of the proxy's clock than those before it, so
# that `report --since` picks the same calls as the range.
INSIDE = PEAK + timedelta(hours=1)  # Monday 10:30 Beijing: peak
INSIDE_OFF_PEAK = PEAK + timedelta(hours=4)  # Monday 13:30 Beijing: off-peak (12:00-14:00)
CHAT_PATH = "/chat/completions"


async def ledger_report(config: Path, *argv: str) -> dict[str, Any]:
    """``python -m proxy report --format json``, as an operator runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "report",
        "--config",
        str(config),
        "--format",
        "json",
        *argv,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def ledger_costs(path: Path, since: datetime) -> list[tuple[str, str, str, Decimal, Decimal]]:
    """(team, tier, currency, cost, cache savings) of every ledger row started at `since` or
    later, read from the ledger's tables: `report` has neither savings nor tiers."""
    with contextlib.closing(open_sqlite(path)) as ledger:
        rows = ledger.execute(
            "SELECT team, tier, currency, amount, cache_savings FROM usage"
            " JOIN usage_cost USING (request_id) WHERE started_at >= ?",
            [since],
        )
    return [
        (team, tier, currency, Decimal(cost), Decimal(saved))
        for team, tier, currency, cost, saved in rows
    ]


def decimal_sums(pairs: list[tuple[tuple[str, ...], Decimal]]) -> dict[tuple[str, ...], Decimal]:
    sums: dict[tuple[str, ...], Decimal] = {}
    for key, amount in pairs:
        sums[key] = sums.get(key, Decimal(0)) + amount
    return sums


def as_floats(sums: dict[tuple[str, ...], Decimal]) -> dict[tuple[str, ...], float]:
    return {key: float(amount) for key, amount in sums.items()}


# Prometheus holds float64: each exported total is the float nearest its exact sum, and a panel
# subtracts and adds a handful of them, each step within half an ulp (1.1e-16 relative). A
# relative 1e-12 is that rounding and nothing else: every call here costs more than a millionth
# of any total, so a call missed or counted twice is far outside it. Counts are compared exactly.
MONEY = 1e-12


async def test_range_totals_equal_the_ledger_report(
    stack: Stack, prometheus: Prometheus, fake: FakeDeepSeek, tmp_path: Path
) -> None:
    """Every "total over the range" panel shows, for the calls made in its range, what
    `python -m proxy report` (or, for what it does not report, the ledger's own tables) says of
    the same calls: series there at the range's start and series born inside it, on either
    replica, all counted from their first call."""
    await eventually(
        lambda: prometheus.query(f'count(up{{job="deepseek-proxy"}} == 1) == {REPLICAS}'),
        "both replicas up",
    )
    replica_a, replica_b = stack.replicas

    # Before the range: alpha on both replicas, beta on one, all peak and priced.
    await send_calls(
        stack,
        replica_a,
        fake,
        [
            ("alpha", CHAT_PATH, CHAT, Reply(usage=USAGE)),
            ("beta", CHAT_PATH, CHAT, Reply(usage=USAGE)),
        ],
    )
    await send_calls(stack, replica_b, fake, [("alpha", CHAT_PATH, CHAT, Reply(usage=USAGE))])
    await prometheus.wait_for_scrapes(1)
    # The range starts on a whole second, as Grafana's $__range is whole seconds. Every scrape
    # stamped at or before it saw all the calls above, and none below: they wait for a scrape
    # stamped after it.
    start = math.ceil(time.time())
    await prometheus.wait_for_scrapes(1, after=start)

    # Inside the range: the series above grow; a team/model, a tier, a replica's beta series,
    # unpriced calls and a call with missing usage appear.
    stack.clock.switch(INSIDE)
    await send_calls(
        stack,
        replica_a,
        fake,
        [
            ("alpha", CHAT_PATH, CHAT, Reply(usage=USAGE)),
            (
                "beta",
                CHAT_PATH,
                {**CHAT, "model": "deepseek-v4-pro", "stream": True},
                Reply(usage=USAGE, server_tool_use={"web_search_requests": 1}),
            ),
            # Retired in the book: usage, no price. The series is born at 1 or 2 (as a
            # scrape falls between the calls), inside the range.
            ("beta", CHAT_PATH, {**CHAT, "model": "deepseek-chat"}, Reply()),
            ("beta", CHAT_PATH, {**CHAT, "model": "deepseek-chat"}, Reply()),
            # Cut: usage estimated (and priced).
            ("beta", CHAT_PATH, {**CHAT, "stream": True}, Reply(cut_after_events=2)),
        ],
    )
    await send_calls(stack, replica_b, fake, [("beta", CHAT_PATH, CHAT, Reply(usage=USAGE))])
    stack.clock.switch(INSIDE_OFF_PEAK)
    await send_calls(stack, replica_b, fake, [("alpha", CHAT_PATH, CHAT, Reply(usage=USAGE))])
    await prometheus.wait_for_scrapes(1)
    # The range ends on a whole second too, once it is past (its samples are final).
    end = math.ceil(time.time())
    await prometheus.wait_for_scrapes(1, after=end)
    variables = {**ALL, "__range": f"{end - start}s"}

    async def panel(
        title: str, labels: tuple[str, ...], chosen: dict[str, str] | None = None
    ) -> dict[tuple[str, ...], float]:
        """The panel's values at the range's end, by `labels`."""
        expr = substitute(panel_expr(title), variables if chosen is None else chosen)
        result = await prometheus.query(expr, at=end)
        return {tuple(s["metric"][label] for label in labels): float(s["value"][1]) for s in result}

    async def label_sets(expr: str, labels: tuple[str, ...], at: int) -> set[tuple[str, ...]]:
        return {
            tuple(s["metric"][label] for label in labels)
            for s in await prometheus.query(expr, at=at)
        }

    # The traffic does what the test is for: series born inside the range.
    cost_series = ("team", "model", "tier", "instance")
    before = await label_sets("llm_cost_total", cost_series, start)
    after = await label_sets("llm_cost_total", cost_series, end)
    born = {(team, model, tier) for team, model, tier, _ in after - before}
    assert ("alpha", "deepseek-flash", "off_peak") in born
    assert ("beta", "deepseek-flash", "peak") in born  # on replica b; a had it before
    assert ("beta", "deepseek-v4-pro") in {(team, model) for team, model, _ in born}
    for counter in ("llm_unpriced_requests_total", "llm_usage_missing_total"):
        assert await prometheus.query(counter, at=start) == [], counter
        assert await prometheus.query(counter, at=end) != [], counter

    config = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"))
    report = await ledger_report(config, "--since", INSIDE.isoformat(), "--by", "team,model")
    rows = report["rows"]
    assert report["total"]["requests"] == 5 + 2  # the calls inside the range, no other

    spend = decimal_sums(
        [
            ((row["team"], currency), Decimal(amount))
            for row in rows
            for currency, amount in row["cost"].items()
        ]
    )
    assert await panel("Spend in the time range", ("team", "currency")) == pytest.approx(
        as_floats(spend), rel=MONEY
    )
    beta_cny = {**variables, "team": "beta", "currency": "CNY"}
    assert await panel("Spend in the time range", ("team", "currency"), beta_cny) == pytest.approx(
        {("beta", "CNY"): float(spend["beta", "CNY"])}, rel=MONEY
    )

    # The report's models are the names requested; the book knows these, so they are the labels.
    assert (
        await panel("Unpriced calls by model", ("model",))
        == as_floats(
            decimal_sums(
                [((row["model"],), Decimal(row["unpriced"])) for row in rows if row["unpriced"]]
            )
        )
        == {("deepseek-chat",): 2.0}
    )
    # The only call without DeepSeek's usage is the cut stream: estimated, reason upstream_cut.
    assert (
        await panel("Calls with missing usage", ("team", "model", "reason"))
        == {
            (row["team"], row["model"], "upstream_cut"): float(row["estimated"])
            for row in rows
            if row["estimated"]
        }
        == {("beta", "deepseek-flash", "upstream_cut"): 1.0}
    )

    costs = await asyncio.to_thread(ledger_costs, tmp_path / "ledger.sqlite3", INSIDE)
    savings = decimal_sums([((team, currency), saved) for team, _, currency, _, saved in costs])
    assert sum(savings.values()) > 0
    assert await panel("Cache savings in the time range", ("team", "currency")) == pytest.approx(
        as_floats(savings), rel=MONEY
    )
    tiers = decimal_sums([((tier, currency), cost) for _, tier, currency, cost, _ in costs])
    assert {tier for tier, _ in tiers} == {"peak", "off_peak"}
    per_currency = decimal_sums([((currency,), cost) for _, _, currency, cost, _ in costs])
    shares = {
        (tier, currency): float(amount / per_currency[(currency,)])
        for (tier, currency), amount in tiers.items()
    }
    assert await panel("Peak vs off-peak share of spend", ("tier", "currency")) == pytest.approx(
        shares, rel=MONEY
    )
    # No hard budget here: both teams' refusal series exist from the start, at 0.
    assert await panel("Calls refused by a hard budget", ("team",)) == {
        ("alpha",): 0.0,
        ("beta",): 0.0,
    }
