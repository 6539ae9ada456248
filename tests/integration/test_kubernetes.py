"""The Kubernetes example (deploy/kubernetes/, docs/kubernetes.md), checked without a cluster:
the manifests parse and agree with each other and with the proxy's configuration (probes,
ports, Secret keys, mounts), the grace period covers a stop, and the ConfigMap's proxy.yaml
loads with the proxy's own loader next to the shipped price book."""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import ProxyConfig, load_config
from proxy.listener import CANCEL_GRACE
from tests.conftest import ROOT

MANIFESTS = ROOT / "deploy" / "kubernetes"
DOC = ROOT / "docs" / "kubernetes.md"
PRICING = ROOT / "config" / "pricing"
LABELS = {"app.kubernetes.io/name": "deepseek-proxy"}


def manifests() -> dict[str, dict[str, Any]]:
    """Every object of deploy/kubernetes/*.yaml by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert document["kind"] not in found, f"{path.name}: a second {document['kind']}"
            found[document["kind"]] = document
    return found


def pod() -> dict[str, Any]:
    return manifests()["Deployment"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container() -> dict[str, Any]:
    [proxy] = pod()["containers"]
    return proxy  # type: ignore[no-any-return]


def mount_of(volume: str) -> PurePosixPath:
    [path] = [m["mountPath"] for m in container()["volumeMounts"] if m["name"] == volume]
    return PurePosixPath(path)


def config_path() -> PurePosixPath:
    command = container()["command"]
    return PurePosixPath(command[command.index("--config") + 1])


def shell_commands() -> list[list[str]]:
    """The doc's shell commands (the lines of its unlabelled code blocks, continuations
    joined), split as the shell would."""
    blocks = re.findall(r"^ *```\n(.*?)^ *```", DOC.read_text(encoding="utf-8"), re.M | re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def config(tmp_path: Path) -> ProxyConfig:
    """The ConfigMap's proxy.yaml as the pod sees it: written where the `config` volume is
    mounted, with the shipped price book where the `pricing` volume is, under `tmp_path`."""
    inside = tmp_path / config_path().relative_to("/")
    inside.parent.mkdir(parents=True)
    inside.write_text(manifests()["ConfigMap"]["data"]["proxy.yaml"], encoding="utf-8")
    pricing = tmp_path / mount_of("pricing").relative_to("/")
    pricing.mkdir(parents=True)
    for book in PRICING.iterdir():
        shutil.copy(book, pricing / book.name)
    return load_config(inside)


def test_the_folder_holds_a_configmap_a_deployment_a_service_and_a_budget() -> None:
    """And no Secret: its values come from the shell (docs/kubernetes.md), never a file."""
    objects = manifests()
    assert set(objects) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for kind, item in objects.items():
        assert item["metadata"]["labels"] == LABELS, kind
    assert "sk-" not in "".join(p.read_text() for p in MANIFESTS.glob("*.yaml")).replace(
        "sk-proxy-example-change-me", ""
    )


def test_two_replicas_selected_by_the_service_and_the_disruption_budget() -> None:
    objects = manifests()
    deployment = objects["Deployment"]["spec"]
    assert deployment["replicas"] == 2
    assert deployment["selector"]["matchLabels"] == LABELS
    assert deployment["template"]["metadata"]["labels"] == LABELS
    assert objects["Service"]["spec"]["selector"] == LABELS
    budget = objects["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"] == LABELS
    assert budget["minAvailable"] == 1
    assert deployment["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_the_configmap_config_loads_next_to_the_shipped_price_book(config: ProxyConfig) -> None:
    assert [path.name for path in config.price_book_files] == [
        path.name for path in sorted(PRICING.glob("*.yaml"))
    ]
    assert config.price_book_files[0].parent.name == mount_of("pricing").name


def test_the_configmap_config_is_the_replicas_one(config: ProxyConfig) -> None:
    """The same settings as the compose replicas (config/proxy.replicas.yaml); only the files'
    places differ, and the pods watch their files (a ConfigMap update arrives without a
    signal), where compose's replicas are reloaded with ``docker compose kill -s HUP``."""
    replicas = load_config(ROOT / "config" / "proxy.replicas.yaml")
    assert config.reload_watch == 10
    assert replicas.reload_watch is None
    assert (
        replace(
            replicas,
            path=config.path,
            price_book_files=config.price_book_files,
            reload_watch=config.reload_watch,
        )
        == config
    )


def test_the_ledger_is_postgresql_without_a_password(config: ProxyConfig) -> None:
    url = urlsplit(config.ledger_url or "")
    assert url.scheme == "postgresql"
    assert url.password is None
    # What a stopping replica could not write goes to the `data` volume.
    assert PurePosixPath(config.spill_anchor).parent == mount_of("data")


def test_the_proxy_listens_where_the_probes_and_the_service_look(config: ProxyConfig) -> None:
    [port] = container()["ports"]
    assert (port["name"], port["containerPort"]) == ("http", config.port)
    assert config.host == "0.0.0.0"  # noqa: S104 - the pod's address, on purpose
    [service_port] = manifests()["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]


@pytest.mark.parametrize(
    ("probe", "path"),
    [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")],
)
def test_probes(probe: str, path: str) -> None:
    assert container()[probe]["httpGet"] == {"path": path, "port": "http"}


def test_the_command_reads_the_configmap() -> None:
    assert container()["command"][:3] == ["python", "-m", "proxy"]
    assert config_path().parent == mount_of("config")
    assert config_path().name in manifests()["ConfigMap"]["data"]
    volumes = {volume["name"]: volume for volume in pod()["volumes"]}
    assert volumes["config"]["configMap"]["name"] == manifests()["ConfigMap"]["metadata"]["name"]
    assert volumes["pricing"]["configMap"]["name"] == "deepseek-proxy-pricing"


def test_the_secrets_come_from_the_secret(config: ProxyConfig) -> None:
    """The DeepSeek key in the variable the config names, the database password in libpq's
    PGPASSWORD; the doc's `kubectl create secret` makes exactly those keys."""
    refs = {entry["name"]: entry["valueFrom"]["secretKeyRef"] for entry in container()["env"]}
    assert set(refs) == {config.upstream_key_env, "PGPASSWORD"}
    assert {ref["name"] for ref in refs.values()} == {"deepseek-proxy"}
    assert all(ref["key"] == name for name, ref in refs.items())
    [create] = [c for c in shell_commands() if c[:4] == ["kubectl", "create", "secret", "generic"]]
    assert create[4] == "deepseek-proxy"
    keys = {
        arg.removeprefix("--from-literal=").split("=", 1)[0]
        for arg in create
        if arg.startswith("--from-literal=")
    }
    assert keys == set(refs)


def test_the_doc_makes_the_pricing_configmap_from_the_shipped_book() -> None:
    [create] = [c for c in shell_commands() if c[:3] == ["kubectl", "create", "configmap"]]
    assert create[3] == "deepseek-proxy-pricing"
    assert create[4] == "--from-file=config/pricing/"


def test_a_stop_ends_within_the_grace_period(config: ProxyConfig) -> None:
    """The preStop sleep runs first, then SIGTERM: the drain, aiohttp's two waits for
    cancelled calls, the ledger's shutdown_timeout and the writer thread's stop (as in
    tests/unit/test_config.py) must all end before the kubelet's SIGKILL."""
    sleep = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    stop = (
        float(sleep[1])
        + config.timeouts.drain
        + 2 * CANCEL_GRACE
        + config.ledger_shutdown_timeout
        + 0.5
    )
    assert stop < pod()["terminationGracePeriodSeconds"]


def test_the_pod_runs_unprivileged_with_writable_data_and_tmp() -> None:
    assert pod()["securityContext"]["runAsNonRoot"] is True
    assert pod()["automountServiceAccountToken"] is False
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    volumes = {volume["name"]: volume for volume in pod()["volumes"]}
    for name, path in (("data", "/app/data"), ("tmp", "/tmp")):  # noqa: S108
        assert "emptyDir" in volumes[name]
        assert mount_of(name) == PurePosixPath(path)


def test_the_pod_states_its_resources() -> None:
    resources = container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert set(resources["limits"]) == {"memory"}  # no CPU limit: throttling adds latency


def test_the_doc_names_every_manifest() -> None:
    text = DOC.read_text(encoding="utf-8")
    for path in MANIFESTS.glob("*.yaml"):
        assert f"`deploy/kubernetes/{path.name}`" in text, path.name


def test_the_doc_scrape_job_keeps_the_pods_the_deployment_labels() -> None:
    [block] = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    [job] = yaml.safe_load(block)["scrape_configs"]
    assert job["job_name"] == "deepseek-proxy"  # the alert rules' and dashboard's job
    keep = {
        tuple(rule["source_labels"]): rule["regex"]
        for rule in job["relabel_configs"]
        if rule.get("action") == "keep"
    }
    assert keep == {
        ("__meta_kubernetes_pod_label_app_kubernetes_io_name",): LABELS["app.kubernetes.io/name"],
        ("__meta_kubernetes_pod_container_port_name",): container()["ports"][0]["name"],
    }
