"""`python -m proxy serve` as a real child process, for restart, SIGTERM and kill -9 tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from proxy.auth import hash_key
from proxy.workers import OWNER_ENV
from tests.conftest import ROOT, SHIPPED_BOOK
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY
from tests.support.proxy_harness import TEAM_KEYS

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    directory: Path,
    upstream_url: str,
    port: int,
    flush_interval: float = 0.1,
    extra: str = "",
    ledger: str = "",
    *,
    keys: Mapping[str, Sequence[str]] | None = None,
    book: Path = SHIPPED_BOOK,
) -> Path:
    """`extra`: more top-level YAML; `ledger`: more keys of the ledger's flow mapping; `keys`:
    each team's client keys (default: `TEAM_KEYS`, one each); `book`: the price book."""
    teams_keys = keys if keys is not None else {team: [key] for team, key in TEAM_KEYS.items()}
    teams = "".join(
        f"  {team}:\n    keys: [{', '.join(repr('sha256:' + hash_key(k)) for k in team_keys)}]\n"
        for team, team_keys in teams_keys.items()
    )
    path = directory / "proxy.yaml"
    # Written whole at once (a new file renamed over the old one), as an editor or a
    # ConfigMap update does: a reload never reads half a file.
    staging = directory / "proxy.yaml.new"
    staging.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"upstream: {{base_url: '{upstream_url}', api_key_env: TEST_DEEPSEEK_KEY}}\n"
        f"pricing: {{book: ['{book}']}}\n"
        f"teams:\n{teams}"
        f"ledger: {{path: ledger.sqlite3, flush_interval: {flush_interval}"
        f"{', ' + ledger if ledger else ''}}}\n{extra}",
        encoding="utf-8",
    )
    staging.replace(path)
    return path


@dataclass
class ServeProcess:
    process: asyncio.subprocess.Process
    url: str
    ledger: Path
    log: Path
    """The process's stderr (its log), for assertions and for reading when a test fails."""
    port: int


@asynccontextmanager
async def serve_process(
    directory: Path,
    upstream_url: str,
    *,
    workers: int = 1,
    extra_config: str = "",
    loop: str | None = None,
    ledger_config: str = "",
    log: Path | None = None,
    book: Path = SHIPPED_BOOK,
) -> AsyncIterator[ServeProcess]:
    """``python -m proxy serve`` on a free port (`loop`: its ``--loop``, else the default;
    `ledger_config`: more ledger keys; `log`: a file for its log, else ``serve-PORT.log`` in
    `directory`), once it answers; with several workers, once every one of them listens."""
    port = free_port()
    config = write_config(
        directory, upstream_url, port, extra=extra_config, ledger=ledger_config, book=book
    )
    env = {**os.environ, "TEST_DEEPSEEK_KEY": FAKE_UPSTREAM_KEY}
    log = log if log is not None else directory / f"serve-{port}.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--workers",
            str(workers),
            *(["--loop", loop] if loop else []),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, process)
        if workers > 1:

            async def all_listening() -> bool:
                pids = worker_pids(process.pid)
                return len(pids) == workers and all(listening(pid, port) for pid in pids)

            await eventually(all_listening, f"{workers} workers listening", timeout=30)
        yield ServeProcess(process, url, directory / "ledger.sqlite3", log, port)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def wait_healthy(url: str, process: asyncio.subprocess.Process, timeout: float = 30) -> None:
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


def ledger(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Rows of a query on a SQLite ledger that a serve process writes (WAL: never blocks it)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def worker_pids(supervisor: int) -> set[int]:
    """The running children of a ``serve --workers N`` supervisor (Linux ``/proc``)."""
    try:
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    except FileNotFoundError:
        raise AssertionError(f"the supervisor (pid {supervisor}) has exited") from None
    return {int(pid) for pid in children.split()}


def listening(pid: int, port: int) -> bool:
    """Whether the process holds a socket listening on `port` (Linux ``/proc``): a worker
    that has started serving, as opposed to one still importing."""
    try:
        inodes = {str(fd.readlink()) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return False  # gone, or a descriptor closed while we looked
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if (
                state == "0A"
                and int(local.rsplit(":", 1)[1], 16) == port
                and f"socket:[{inode}]" in inodes
            ):
                return True
    return False


def worker_owner(pid: int) -> str | None:
    """The owner id the supervisor gave a worker (what its ledger rows and holds carry), or
    None if the process has gone or has no owner."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = OWNER_ENV.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode()
    return None


async def eventually(
    condition: Callable[[], Awaitable[T | None]], what: str, timeout: float = 10.0
) -> T:
    """The first truthy result of `condition`, polled until `timeout` seconds have passed."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = await condition()
                if result:
                    return result
                await asyncio.sleep(0.02)  # polling a condition, with a deadline
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None
