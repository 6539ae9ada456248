"""The package's layering, read from its imports: what step 2 cut apart stays apart.

- aiohttp's client is used by the upstream transport alone (`proxy.upstream.transport`): the
  relay and the routes see only `UpstreamAnswer` and the proxy's own exceptions;
- the configuration, periods, record, outcome and attribution modules are leaves: they import
  nothing of the proxy but other leaves, so any module may use them without an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "proxy"
SERVER_SIDE = (
    "aiohttp.web",
    "aiohttp.http_exceptions",
    "aiohttp.web_protocol",
    "aiohttp.web_request",
)
"""Modules of aiohttp's server, which the listener and the routes use."""
LEAVES = {
    "proxy.auth": set(),
    "proxy.usage": set(),
    "proxy.yamlfile": set(),
    "proxy.periods": set(),
    "proxy.formats": set(),
    "proxy.record_schema": {"proxy.formats"},
    "proxy.records": {"proxy.record_schema"},
    "proxy.outcome": {"proxy.records"},
    "proxy.attribution": {"proxy.records"},
    "proxy.config": {
        "proxy.attribution",
        "proxy.auth",
        "proxy.periods",
        "proxy.usage",
        "proxy.yamlfile",
    },
}
"""Each leaf and what of the proxy it may import (a package: any of its modules)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_only_the_upstream_transport_uses_aiohttps_client() -> None:
    users = {
        name
        for name, imported in modules().items()
        for target in imported
        if (target == "aiohttp" or target.startswith("aiohttp."))
        and not target.startswith(SERVER_SIDE)
        and target != "aiohttp.web"
    }
    assert users == {"proxy.upstream.transport"}


def test_leaves_import_only_leaves() -> None:
    for name, imported in modules().items():
        leaf = next((leaf for leaf in LEAVES if name == leaf or name.startswith(leaf + ".")), None)
        if leaf is None:
            continue
        allowed = (leaf, *LEAVES[leaf])
        outside = {
            target
            for target in imported
            if target.startswith("proxy.")
            and not any(target == ok or target.startswith(ok + ".") for ok in allowed)
        }
        assert not outside, f"{name} imports {sorted(outside)}"
