"""Alerts, alert routing and the Grafana dashboard, checked with the real Prometheus tools.

`promtool` and `amtool` validate the files and run the alerts' unit tests
(`config/prometheus/alerts_test.yml`). Then a real Prometheus scrapes two replicas of the real
proxy (in this process, against the fake DeepSeek, sharing one real ledger) every second, and
every query of the dashboard must return data and every alert rule must evaluate without
error: a renamed metric or label, or a join that matches many-to-many (as a join of two
replicas' spend would), fails here rather than in production. The dashboard's budget figures
must equal the ledger's, not twice them, and a team over budget must alert once.

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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from proxy.config import Budget
from proxy.ledger.store import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.pricing import PriceBook
from tests.conftest import ROOT
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import Reply
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


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


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

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        return data["result"]  # type: ignore[no-any-return]

    async def wait_for_scrapes(self, count: int) -> None:
        """Return once `count` successful scrapes of every replica started after this call."""
        after = time.time() + STAMP_TOLERANCE

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
    budget is tiny so that the budget alerts have something to say."""
    store = SQLiteLedger(tmp_path / "ledger.sqlite3", ZoneInfo("Asia/Shanghai"))
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
            running_proxy(fake.base_url, book, **options) as replica_a,
            running_proxy(fake.base_url, book, **options) as replica_b,
        ):
            yield Stack((replica_a, replica_b), writer, store, clock)
    finally:
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


async def send_round(stack: Stack, replica: RunningProxy, fake: FakeDeepSeek) -> None:
    """One round of traffic to `replica` that feeds every series the dashboard shows: both
    teams, both endpoints, streaming and not, cache hits, tool calls, an error, a cut stream
    (missing usage) and a model the price book does not know (unpriced)."""
    calls: list[tuple[str, str, dict[str, Any], Reply]] = [
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
    done = len(replica.sink.records)
    async with httpx.AsyncClient(base_url=replica.url) as http:
        for team, path, body, reply in calls:
            fake.enqueue(reply)
            await http.post(path, json=body, headers={"Authorization": f"Bearer {TEAM_KEYS[team]}"})
    await replica.sink.wait_for(done + CALLS_PER_ROUND)
    await asyncio.to_thread(stack.writer.flush)


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

    # Every panel query returns data, with all values selected and with a selection.
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
    assert len(states) == len(rules())
    assert [state for state in states if state[1] != "ok"] == []
