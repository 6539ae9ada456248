"""The container deployment, checked without a Docker engine: docker-compose.yml's structure,
the files it mounts, the Dockerfile's essentials, and the container's proxy configuration."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.config import load_config
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


def test_the_stack_has_its_four_services() -> None:
    assert set(compose()["services"]) == {"proxy", "prometheus", "alertmanager", "grafana"}


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


@pytest.mark.parametrize("name", ["proxy", "prometheus", "alertmanager", "grafana"])
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
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
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
