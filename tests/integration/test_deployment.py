"""The container deployment, checked without a Docker engine: docker-compose.yml's structure,
the files it mounts, the Dockerfile's essentials, and the container's proxy configuration; then
the `replicas` profile: PostgreSQL, two replicas, HAProxy in front of them and a Prometheus
scraping both."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import ProxyConfig, load_config
from proxy.listener import CANCEL_GRACE
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CMD = ["python", "-m", "proxy", "serve", "--config", "/app/config/proxy.yaml"]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]  # type: ignore[no-any-return]


def mounts(name: str) -> dict[str, str]:
    """Container path -> host path (relative to the repository) or named volume."""
    result = {}
    for entry in service(name).get("volumes", []):
        source, target, *_ = entry.split(":")
        result[target] = source
    return result


def bind_mount(name: str, target: str) -> Path:
    source = mounts(name)[target]
    assert source.startswith("./"), f"{name}: {target} is not a bind mount of the repository"
    return ROOT / source


def command_flag(name: str, flag: str) -> str:
    values = [
        str(arg).split("=", 1)[1]
        for arg in service(name)["command"]
        if str(arg).startswith(f"{flag}=")
    ]
    assert len(values) == 1, (name, flag)
    return values[0]


def in_container(name: str, container_path: str) -> Path:
    """The repository file a container sees at `container_path`, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in mounts(name).items():
        if source.startswith("./") and path.is_relative_to(target):
            return ROOT / source / path.relative_to(target)
    raise AssertionError(f"{name}: nothing of the repository is mounted at {container_path}")


def published(name: str) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    ports = []
    for entry in service(name).get("ports", []):
        address, host, container = str(entry).split(":")
        ports.append((address, int(host), int(container)))
    return ports


def default_services() -> set[str]:
    """What `docker compose up` starts: the services without a profile."""
    return {name for name, spec in compose()["services"].items() if "profiles" not in spec}


def test_the_stack_has_its_four_services() -> None:
    assert default_services() == {"proxy", "prometheus", "alertmanager", "grafana"}


def test_proxy_is_built_here_with_its_config_and_a_ledger_volume() -> None:
    proxy = service("proxy")
    assert proxy["build"] in (".", {"context": "."})
    assert (ROOT / "Dockerfile").is_file()
    volumes = mounts("proxy")
    assert volumes["/app/config/proxy.yaml"] == "./config/proxy.docker.yaml"
    assert bind_mount("proxy", "/app/config/proxy.yaml").is_file()
    assert bind_mount("proxy", "/app/config/pricing").is_dir()
    assert volumes["/app/data"] in compose()["volumes"], "the ledger must live on a named volume"
    assert published("proxy") == [("127.0.0.1", 8080, 8080)]


def test_the_deepseek_key_comes_from_the_environment() -> None:
    environment = service("proxy")["environment"]
    assert re.fullmatch(r"\$\{DEEPSEEK_API_KEY(:?[?-].*)?\}", environment["DEEPSEEK_API_KEY"])


@pytest.mark.parametrize("name", sorted(compose()["services"]))
def test_no_secret_is_written_in_the_compose_file(name: str) -> None:
    environment = service(name).get("environment", {})
    assert isinstance(environment, dict), "use the mapping form, so values can be checked"
    for key, value in environment.items():
        secret_like = re.search(r"KEY|TOKEN|SECRET|PASSWORD", key)
        assert not secret_like or str(value).startswith("${"), f"{name}: {key} is a literal"
    assert "sk-" not in COMPOSE.read_text()


def test_proxy_healthcheck_asks_healthz() -> None:
    check = service("proxy")["healthcheck"]
    assert check["test"][0] == "CMD"
    assert "http://127.0.0.1:8080/healthz" in " ".join(check["test"])


@pytest.mark.parametrize("name", ["prometheus", "alertmanager", "grafana"])
def test_monitoring_images_are_pinned(name: str) -> None:
    image, _, tag = service(name)["image"].partition(":")
    assert image in ("prom/prometheus", "prom/alertmanager", "grafana/grafana")
    assert tag and tag != "latest"


def test_every_bind_mount_exists_in_the_repository() -> None:
    for name in compose()["services"]:
        for target, source in mounts(name).items():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} (for {target}) is missing"
            else:
                assert source in compose()["volumes"], f"{name}: volume {source} undeclared"


def test_prometheus_uses_the_mounted_config_and_scrapes_the_proxy() -> None:
    config_file = in_container("prometheus", command_flag("prometheus", "--config.file"))
    assert config_file == ROOT / "config" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    for rule_file in config["rule_files"]:
        assert (config_file.parent / rule_file).is_file()
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "deepseek-proxy"]
    assert job["static_configs"][0]["targets"] == ["proxy:8080"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [alertmanagers] = config["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert ("127.0.0.1", 9093, 9093) in published("alertmanager")
    assert command_flag("prometheus", "--storage.tsdb.path") in mounts("prometheus")


def test_alertmanager_uses_the_mounted_config() -> None:
    config_file = in_container("alertmanager", command_flag("alertmanager", "--config.file"))
    assert config_file == ROOT / "config" / "alertmanager" / "alertmanager.yml"
    assert command_flag("alertmanager", "--storage.path") in mounts("alertmanager")


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    provisioning = bind_mount("grafana", "/etc/grafana/provisioning")
    datasource, *_ = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert ("127.0.0.1", 9090, 9090) in published("prometheus")
    [provider] = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())[
        "providers"
    ]
    dashboards = in_container("grafana", provider["options"]["path"])
    dashboard = json.loads((dashboards / "deepseek-proxy.json").read_text())
    sources = {
        json.dumps(panel["datasource"], sort_keys=True)
        for panel in dashboard["panels"]
        if "datasource" in panel
    }
    # Every panel queries the Prometheus the first variable picks, by default this one.
    assert sources == {json.dumps({"type": "prometheus", "uid": "${datasource}"}, sort_keys=True)}
    picker = dashboard["templating"]["list"][0]
    assert (picker["type"], picker["query"]) == ("datasource", datasource["type"])
    assert picker["current"]["value"] == datasource["uid"]
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert in_container("grafana", home).is_file()


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_dockerfile_builds_a_slim_python_311_image() -> None:
    assert dockerfile()[0] == ("FROM", "python:3.11-slim")


def test_dockerfile_runs_the_proxy_as_a_non_root_user() -> None:
    instructions = dockerfile()
    users = [(index, args) for index, (name, args) in enumerate(instructions) if name == "USER"]
    assert users, "no USER instruction: the proxy would run as root"
    index, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    cmd = [i for i, (name, _) in enumerate(instructions) if name == "CMD"]
    assert cmd and cmd[-1] > index
    assert json.loads(instructions[cmd[-1]][1]) == CMD


def test_dockerfile_installs_tzdata_exposes_8080_and_keeps_the_ledger_on_a_volume() -> None:
    instructions = dockerfile()
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert re.search(r"apt-get install .*\btzdata\b", runs)
    assert re.search(r"pip install .*\.", runs)
    assert ("EXPOSE", "8080") in instructions
    volumes = [args for name, args in instructions if name == "VOLUME"]
    assert any("/app/data" in volume for volume in volumes)
    assert ("COPY", "config/proxy.docker.yaml ./config/proxy.yaml") in instructions


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        source for name, args in dockerfile() if name == "COPY" for source in args.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        path = PurePosixPath(source)
        for candidate in (path, *path.parents[:-1]):
            ignored = [p for p in patterns if fnmatch.fnmatch(str(candidate), p.rstrip("/"))]
            assert not ignored, f"{source} is excluded by .dockerignore: {ignored}"


def test_container_config_is_the_shipped_one_listening_on_all_interfaces() -> None:
    """config/proxy.docker.yaml differs from config/proxy.yaml only where a container must."""
    shipped = load_config(ROOT / "config" / "proxy.yaml")
    container = load_config(ROOT / "config" / "proxy.docker.yaml")
    assert container.host == "0.0.0.0"  # noqa: S104 - inside the container, on purpose
    assert container.port == 8080
    assert container.ledger_path == Path("/app/data/ledger.sqlite3")
    assert (
        replace(
            shipped, path=container.path, host=container.host, ledger_path=container.ledger_path
        )
        == container
    )


# --- the `replicas` profile ----------------------------------------------------------------------

REPLICAS = ("proxy-a", "proxy-b")
PROFILED = {"postgres", *REPLICAS, "lb", "prometheus-replicas"}
HAPROXY_CFG = "/usr/local/etc/haproxy/haproxy.cfg"


def haproxy() -> dict[str, list[list[str]]]:
    """The load balancer's config: each section (``global``, ``defaults``, ``backend
    replicas`` ...) and its lines, split into words, comments left out."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for raw in bind_mount("lb", HAPROXY_CFG).read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line[0].isspace():
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(line.split())
    return sections


def directive(section: str, *words: str) -> list[list[str]]:
    """The lines of `section` that start with `words`."""
    return [line for line in haproxy()[section] if line[: len(words)] == list(words)]


def seconds(value: str) -> float:
    """A duration as compose and HAProxy write it: ``60s``, ``1900s``, ``2m``."""
    match = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert match is not None, value
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def replica_config(name: str) -> ProxyConfig:
    return load_config(in_container(name, "/app/config/proxy.yaml"))


def test_the_replica_profile_adds_postgres_two_replicas_a_balancer_and_a_prometheus() -> None:
    services = compose()["services"]
    assert set(services) - default_services() == PROFILED
    for name in PROFILED:
        assert services[name]["profiles"] == ["replicas"], name


def test_default_services_need_no_profiled_service() -> None:
    """Compose refuses a service that depends on one its profiles leave out."""
    for name in default_services():
        depends = service(name).get("depends_on", [])
        assert not set(depends) & PROFILED, name


def test_the_default_stack_needs_only_the_deepseek_key() -> None:
    """Compose interpolates the whole file, profiles included, before it leaves services out:
    a variable required with `:?` anywhere is required by `docker compose up` too."""
    required = set(re.findall(r"\$\{(\w+):?\?", COMPOSE.read_text()))
    assert required == {"DEEPSEEK_API_KEY"}


def test_every_published_port_is_on_the_loopback() -> None:
    for name in compose()["services"]:
        for address, _, _ in published(name):
            assert address == "127.0.0.1", name
    assert published("lb") == [("127.0.0.1", 8081, 8080)]
    for name in (*REPLICAS, "postgres"):
        assert published(name) == [], f"{name} is reached through the compose network only"


@pytest.mark.parametrize("name", REPLICAS)
def test_a_replica_runs_the_proxy_image_with_the_postgresql_config(name: str) -> None:
    replica, single = service(name), service("proxy")
    assert replica["image"] == single["image"]
    assert replica["build"] == single["build"]
    volumes = mounts(name)
    assert volumes["/app/config/proxy.yaml"] == "./config/proxy.replicas.yaml"
    assert volumes["/app/config/pricing"] == mounts("proxy")["/app/config/pricing"]
    assert volumes["/app/data"] in compose()["volumes"]
    assert replica["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert replica["healthcheck"] == single["healthcheck"]


def test_each_replica_keeps_its_files_on_its_own_volume() -> None:
    volumes = [mounts(name)["/app/data"] for name in (*REPLICAS, "proxy")]
    assert len(set(volumes)) == len(volumes)


@pytest.mark.parametrize("name", REPLICAS)
def test_a_replica_gets_its_secrets_from_the_environment(name: str) -> None:
    environment = service(name)["environment"]
    assert environment["DEEPSEEK_API_KEY"] == service("proxy")["environment"]["DEEPSEEK_API_KEY"]
    # libpq's variable, the one the ledger's driver reads; the same as the database's.
    assert environment["PGPASSWORD"] == service("postgres")["environment"]["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD(:?[?-].*)?\}", environment["PGPASSWORD"])


def test_the_replicas_config_is_the_container_one_with_the_postgresql_ledger() -> None:
    """config/proxy.replicas.yaml loads with the proxy's own loader and differs from
    config/proxy.docker.yaml only in where the ledger is."""
    container = load_config(ROOT / "config" / "proxy.docker.yaml")
    for name in REPLICAS:
        config = replica_config(name)
        assert config.path == ROOT / "config" / "proxy.replicas.yaml"
        assert config.ledger_url is not None
        assert config.spill_anchor.parent == Path("/app/data")  # on the replica's own volume
        assert (
            replace(
                container,
                path=config.path,
                ledger_url=config.ledger_url,
                ledger_path=config.ledger_path,
            )
            == config
        )


def test_the_ledger_url_names_the_compose_database_without_a_password() -> None:
    url = urlsplit(replica_config("proxy-a").ledger_url or "")
    environment = service("postgres")["environment"]
    assert url.scheme == "postgresql"
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == environment["POSTGRES_USER"]
    assert url.path == "/" + environment["POSTGRES_DB"]
    assert url.password is None


def test_postgres_is_pinned_keeps_its_data_and_is_checked_with_pg_isready() -> None:
    postgres = service("postgres")
    image, _, tag = postgres["image"].partition(":")
    assert image == "postgres"
    assert tag and tag != "latest"
    assert mounts("postgres")["/var/lib/postgresql/data"] in compose()["volumes"]
    environment = postgres["environment"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD(:?[?-].*)?\}", environment["POSTGRES_PASSWORD"])
    test = postgres["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    assert test[test.index("-U") + 1] == environment["POSTGRES_USER"]
    assert test[test.index("-d") + 1] == environment["POSTGRES_DB"]
    assert test[test.index("-h") + 1] == "127.0.0.1"  # not the first run's socket-only server


@pytest.mark.parametrize("name", REPLICAS)
def test_a_replica_stop_ends_within_its_grace_period(name: str) -> None:
    """As for the single proxy (tests/unit/test_config.py): the drain, aiohttp's two waits for
    cancelled calls, the ledger's shutdown_timeout and the writer thread's stop must fit in
    the time compose gives before its SIGKILL."""
    config = replica_config(name)
    stop = config.timeouts.drain + 2 * CANCEL_GRACE + config.ledger_shutdown_timeout + 0.5
    assert stop < seconds(service(name)["stop_grace_period"])


def test_the_balancer_sends_calls_to_both_replicas_on_their_port() -> None:
    lb = service("lb")
    image, _, tag = lb["image"].partition(":")
    assert image == "haproxy"
    assert tag and tag != "latest"
    assert mounts("lb")[HAPROXY_CFG].startswith("./config/")
    assert set(lb["depends_on"]) == set(REPLICAS)
    [frontend] = [name for name in haproxy() if name.startswith("frontend ")]
    assert directive(frontend, "bind") == [["bind", f":{published('lb')[0][2]}"]]
    assert directive(frontend, "default_backend") == [["default_backend", "replicas"]]
    servers = {line[1]: line[2] for line in directive("backend replicas", "server")}
    assert servers == {name: f"{name}:{replica_config(name).port}" for name in REPLICAS}


def test_the_balancer_sends_no_call_to_a_replica_that_is_not_ready() -> None:
    """A draining replica answers /readyz with 503: it must stop getting calls."""
    backend = "backend replicas"
    assert directive(backend, "option", "httpchk") == [["option", "httpchk", "GET", "/readyz"]]
    assert directive(backend, "http-check", "expect") == [["http-check", "expect", "status", "200"]]
    [defaults] = directive(backend, "default-server")
    assert "check" in defaults
    interval, fall = defaults[defaults.index("inter") + 1], defaults[defaults.index("fall") + 1]
    assert seconds(interval) * int(fall) <= 5  # out within seconds of its SIGTERM


def test_the_balancer_streams_without_buffering_and_outlasts_the_longest_call() -> None:
    text = "\n".join(" ".join(line) for lines in haproxy().values() for line in lines)
    assert directive("defaults", "no", "option", "http-buffer-request")
    assert not re.search(r"^option http-buffer-request", text, re.MULTILINE)
    assert "compression" not in text
    assert directive("defaults", "mode") == [["mode", "http"]]
    assert directive("defaults", "option", "http-keep-alive")
    config = replica_config("proxy-a")
    longest = max(config.timeouts.total, config.timeouts.first_byte)
    for side in ("client", "server"):
        [[*_, value]] = directive("defaults", "timeout", side)
        assert seconds(value) > longest, side
    # Only a failed connection is tried again: a call that reached a replica may have been
    # sent to DeepSeek and billed.
    assert not [line for lines in haproxy().values() for line in lines if line[0] == "retry-on"]


def test_the_balancer_stops_after_the_replicas_drain_and_before_its_sigkill() -> None:
    [[_, hard_stop]] = directive("global", "hard-stop-after")
    assert replica_config("proxy-a").timeouts.drain < seconds(hard_stop)
    assert seconds(hard_stop) < seconds(service("lb")["stop_grace_period"])


def test_haproxy_accepts_the_balancer_config(tmp_path: Path) -> None:
    """`haproxy -c` (Debian's `haproxy`: skipped where it is missing, except in CI, which
    installs it); the replicas' names resolve only on the compose network, so those two
    warnings are expected."""
    binary = shutil.which("haproxy")
    if binary is None:
        missing = "haproxy is not installed (apt-get install haproxy)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    result = subprocess.run(
        [binary, "-c", "-f", str(bind_mount("lb", HAPROXY_CFG))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    warnings = [line for line in output.splitlines() if "[WARNING]" in line]
    assert all("could not resolve address 'proxy-" in line for line in warnings), output


def test_the_replica_prometheus_scrapes_both_replicas_with_the_same_rules() -> None:
    config_file = in_container(
        "prometheus-replicas", command_flag("prometheus-replicas", "--config.file")
    )
    assert config_file == ROOT / "config" / "prometheus" / "prometheus.replicas.yml"
    config = yaml.safe_load(config_file.read_text())
    single = yaml.safe_load((ROOT / "config" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == single["rule_files"]
    assert config["alerting"] == single["alerting"]
    assert config["global"]["external_labels"] == {"stack": "replicas"}
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "deepseek-proxy"]
    [targets] = [group["targets"] for group in job["static_configs"]]
    assert targets == [f"{name}:{replica_config(name).port}" for name in REPLICAS]
    assert service("prometheus-replicas")["image"] == service("prometheus")["image"]
    assert set(service("prometheus-replicas")["depends_on"]) == {*REPLICAS, "alertmanager"}
    storage = command_flag("prometheus-replicas", "--storage.tsdb.path")
    assert mounts("prometheus-replicas")[storage] != mounts("prometheus")[storage]


def test_grafana_has_a_datasource_for_each_prometheus() -> None:
    provisioning = bind_mount("grafana", "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    hosts = {urlsplit(source["url"]).hostname: source for source in datasources}
    assert set(hosts) == {"prometheus", "prometheus-replicas"}
    assert [source["isDefault"] for source in datasources] == [True, False]
    for host, source in hosts.items():
        assert source["type"] == "prometheus"
        assert urlsplit(source["url"]).port == 9090
        assert service(host)["image"].startswith("prom/prometheus:")


def test_alertmanager_inhibits_within_a_stack_only() -> None:
    """Both Prometheus servers send to the one Alertmanager; the replica stack's alerts carry
    `stack`, so one ledger's over-budget alert does not silence the other's thresholds."""
    config = yaml.safe_load((ROOT / "config" / "alertmanager" / "alertmanager.yml").read_text())
    for rule in config["inhibit_rules"]:
        assert "stack" in rule["equal"], rule
