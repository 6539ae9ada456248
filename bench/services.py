"""Starting the three servers of a run: the fake upstream, the reference forwarder, the proxy.

The proxy runs exactly as in production (``python -m proxy serve --config FILE``) with a
generated configuration: one team whose key is made like ``python -m proxy keys new`` makes it
(only its SHA-256 hash in the file), the shipped price book, the SQLite ledger in the run's
temporary folder, and the bench upstream as DeepSeek. Metrics are always on in the proxy, so
this is full metering: pricing, metrics and ledger.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import ROOT, Processes, Service, free_port
from proxy.auth import hash_key, key_id_of, new_key

UPSTREAM_KEY_ENV = "BENCH_DEEPSEEK_KEY"
TEAM = "bench"
MAX_INFLIGHT = 5000
"""Admission limits well above the benchmark's load (1,000 streams, c=256): the shipped
defaults (1,000 in all, 250 per team) would turn the saturation rows into 503s. A proxy older
than its admission limits does not know the keys, so they are written only when it does."""


@dataclass(frozen=True, slots=True)
class Services:
    upstreams: list[Service]
    reference: Service
    proxy: Service
    client_key: str
    ledger: Path


def _has_admission_limits(proxy_root: Path) -> bool:
    """Whether the proxy's config (a module, later a package) knows the admission limits."""
    sources = [proxy_root / "proxy" / "config.py", *(proxy_root / "proxy" / "config").glob("*.py")]
    return any(
        source.exists() and "max_inflight_per_team" in source.read_text(encoding="utf-8")
        for source in sources
    )


BENCH_TAGS = {"x-proxy-tags": "project=bench,env=prod"}
"""The attribution header every benchmark call carries (issue 16: the figures must hold with
tags on every call). A proxy without attribution forwards it like any header; the reference
forwarder does too."""


def _has_attribution(proxy_root: Path) -> bool:
    return (proxy_root / "proxy" / "attribution.py").exists()


def write_proxy_config(
    directory: Path, port: int, upstream_url: str, proxy_root: Path
) -> tuple[Path, str, Path]:
    """The proxy's config file; returns it, the team's client key and the ledger path."""
    price_book = proxy_root / "config" / "pricing"
    limits = (
        f"limits: {{max_inflight: {MAX_INFLIGHT}, max_inflight_per_team: {MAX_INFLIGHT}}}\n"
        if _has_admission_limits(proxy_root)
        else ""
    )
    attribution = (
        "attribution: {tags: [project, env], metric_labels: {project: 20}}\n"
        if _has_attribution(proxy_root)
        else ""
    )
    key = new_key()
    digest = hash_key(key)
    ledger = directory / "ledger.sqlite3"
    path = directory / "proxy.yaml"
    # JSON strings are YAML strings: quoting done by json.dumps, never by hand.
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"upstream: {{base_url: {json.dumps(upstream_url)}, api_key_env: {UPSTREAM_KEY_ENV}}}\n"
        f"pricing: {{book: [{json.dumps(str(price_book))}]}}\n"
        f"teams:\n  {TEAM}:\n    keys: ['sha256:{digest}']   # {key_id_of(digest)}\n"
        f"ledger: {{path: {json.dumps(str(ledger))}, flush_interval: 0.1}}\n{limits}"
        f"{attribution}",
        encoding="utf-8",
    )
    return path, key, ledger


@dataclass(frozen=True, slots=True)
class Proxied:
    """A bench upstream and one proxy in front of it (`start_proxied`)."""

    upstream: Service
    proxy: Service
    client_key: str
    ledger: Path


async def start_proxied(
    processes: Processes,
    directory: Path,
    proxy_root: Path = ROOT,
    *,
    prefix: Sequence[str] = (),
    within: float = 30.0,
) -> Proxied:
    """One bench upstream and the proxy of `proxy_root` before it, ready; `prefix` runs the
    proxy under another program (``valgrind ...``), which may need a longer `within`."""
    upstream = start_upstream(processes)
    upstream_url = upstream.url
    await processes.wait_ready(upstream)
    port = free_port()
    config, key, ledger = write_proxy_config(directory, port, upstream_url, proxy_root)
    proxy = processes.start(
        "proxy",
        [
            *prefix,
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--log-level",
            "WARNING",
        ],
        f"http://127.0.0.1:{port}",
        cwd=proxy_root,
        env={UPSTREAM_KEY_ENV: "sk-bench-upstream-not-a-real-key", "PYTHONPATH": str(proxy_root)},
    )
    await processes.wait_ready(proxy, within=within)
    return Proxied(upstream, proxy, key, ledger)


def start_upstream(processes: Processes) -> Service:
    """One bench upstream (`bench.upstream`) on a free port, not yet ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return processes.start(
        "upstream", [sys.executable, "-m", "bench.upstream", "--port", str(port)], url
    )


def start_reference(processes: Processes, upstream_url: str) -> Service:
    """The reference forwarder (`bench.reference`) in front of `upstream_url`, not yet ready."""
    port = free_port()
    return processes.start(
        "reference",
        [sys.executable, "-m", "bench.reference", "--port", str(port), "--upstream", upstream_url],
        f"http://127.0.0.1:{port}",
        under_test=True,
    )


async def start(
    processes: Processes, directory: Path, upstream_workers: int, proxy_root: Path = ROOT
) -> Services:
    """Start everything on free 127.0.0.1 ports and wait until each answers /healthz.

    `proxy_root` is the checkout whose proxy runs (its ``proxy`` package and price book), so
    two versions of the proxy can be compared with the same harness.
    """
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    argv = [sys.executable, "-m", "bench.upstream", "--port", str(upstream_port)]
    if upstream_workers > 1:
        argv.append("--reuse-port")
    upstreams = [
        processes.start(f"upstream-{i}", argv, upstream_url) for i in range(upstream_workers)
    ]
    reference = start_reference(processes, upstream_url)
    proxy_port = free_port()
    config, key, ledger = write_proxy_config(directory, proxy_port, upstream_url, proxy_root)
    proxy = processes.start(
        "proxy",
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--log-level", "WARNING"],
        f"http://127.0.0.1:{proxy_port}",
        under_test=True,
        cwd=proxy_root,
        env={UPSTREAM_KEY_ENV: "sk-bench-upstream-not-a-real-key", "PYTHONPATH": str(proxy_root)},
    )
    for service in [*upstreams, reference, proxy]:
        await processes.wait_ready(service)
    return Services(upstreams, reference, proxy, key, ledger)
