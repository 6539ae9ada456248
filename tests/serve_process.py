"""`python -m proxy serve` as a real child process, for restart, SIGTERM and kill -9 tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from proxy.auth import hash_key
from tests.conftest import ROOT, SHIPPED_BOOK
from tests.fake_deepseek_shapes import FAKE_UPSTREAM_KEY
from tests.proxy_harness import TEAM_KEYS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, upstream_url: str, port: int, flush_interval: float = 0.1,
                 extra: str = "", ledger: str = "") -> Path:
    """`extra`: more top-level YAML; `ledger`: more keys of the ledger's flow mapping."""
    teams = "".join(f"  {team}:\n    keys: ['sha256:{hash_key(key)}']\n"
                    for team, key in TEAM_KEYS.items())
    path = directory / "proxy.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"upstream: {{base_url: '{upstream_url}', api_key_env: TEST_DEEPSEEK_KEY}}\n"
        f"pricing: {{book: ['{SHIPPED_BOOK}']}}\n"
        f"teams:\n{teams}"
        f"ledger: {{path: ledger.sqlite3, flush_interval: {flush_interval}"
        f"{', ' + ledger if ledger else ''}}}\n{extra}",
        encoding="utf-8")
    return path


@dataclass
class ServeProcess:
    process: asyncio.subprocess.Process
    url: str
    ledger: Path


@asynccontextmanager
async def serve_process(directory: Path, upstream_url: str, *, workers: int = 1,
                        extra_config: str = "", loop: str | None = None,
                        ledger_config: str = "", log: Path | None = None
                        ) -> AsyncIterator[ServeProcess]:
    """``python -m proxy serve`` on a free port (`loop`: its ``--loop``, else the default;
    `ledger_config`: more ledger keys; `log`: a file for its log, else it is discarded)."""
    port = free_port()
    config = write_config(directory, upstream_url, port, extra=extra_config,
                          ledger=ledger_config)
    env = {**os.environ, "TEST_DEEPSEEK_KEY": FAKE_UPSTREAM_KEY}
    with contextlib.ExitStack() as files:
        stderr = (files.enter_context(log.open("wb")) if log is not None
                  else asyncio.subprocess.DEVNULL)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config),
            "--workers", str(workers), *(["--loop", loop] if loop else []), cwd=ROOT, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, process)
        yield ServeProcess(process, url, directory / "ledger.sqlite3")
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def wait_healthy(url: str, process: asyncio.subprocess.Process, timeout: float = 30
                       ) -> None:
    async with httpx.AsyncClient() as client, asyncio.timeout(timeout):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"serve exited with {process.returncode}")
            try:
                if (await client.get(url + "/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)  # polling a condition (the port opening), with a deadline
