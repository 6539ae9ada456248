"""A real PostgreSQL for tests and benchmarks, started in a temporary folder and removed after.

Step 3 puts the ledger and the budget holds in PostgreSQL; its tests run against the real
server, never a mock. `running_postgres` finds Debian's binaries (``pg_config --bindir``, else
the usual folders), runs ``initdb`` into a fresh folder and ``pg_ctl start`` on a free loopback
port, and stops the server and removes everything on exit. As root (CI), the server runs as the
``postgres`` user, since PostgreSQL refuses to run as root; the folder is made outside pytest's
own (root-only) temporary tree so that user can enter it.

`binaries` says why PostgreSQL cannot start here (``None`` when it can), so tests that need it
skip on a developer machine without the ``postgresql`` package with a message naming it; CI
installs the package (``.ci/run``) and runs them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MISSING = "PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql)"
USER = "proxy"
"""The database superuser the tests connect as (trust authentication on loopback only)."""
DATABASE = "ledger"
_SEARCHED = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/opt/homebrew/bin")


@dataclass(frozen=True, slots=True)
class Postgres:
    host: str
    port: int
    data: Path
    bindir: Path
    options: str = ""
    """The server's command-line options (`start` starts it with the same)."""

    @property
    def url(self) -> str:
        """A ``postgresql://`` URL to the test database."""
        return f"postgresql://{USER}@{self.host}:{self.port}/{DATABASE}"

    def new_database(self) -> str:
        """A fresh, empty database of its own (tests share the server, never a database);
        returns its URL."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}", database="postgres")
        return f"postgresql://{USER}@{self.host}:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server (``fast``: connections are cut, as when a database goes down)."""
        _run(
            self.bindir,
            os.geteuid() == 0,
            "pg_ctl",
            "-D",
            str(self.data),
            "-m",
            "fast",
            "-w",
            "stop",
        )

    def start(self) -> None:
        """Start it again, on the same port, with the same data."""
        _start(self.bindir, os.geteuid() == 0, self.data, self.options)

    def psql(self, sql: str, database: str = DATABASE) -> str:
        """Run `sql` with ``psql`` (unaligned, tuples only) and return its output."""
        url = f"postgresql://{USER}@{self.host}:{self.port}/{database}"
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url],
            input=sql,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()


def binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if found.returncode == 0:
            candidates.append(Path(found.stdout.strip()))
    for pattern in _SEARCHED:
        root = Path(pattern.split("*")[0])
        if "*" in pattern and root.is_dir():
            candidates.extend(sorted(root.glob("*/bin"), reverse=True))
        else:
            candidates.append(Path(pattern))
    for folder in candidates:
        if all((folder / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def require_postgres() -> None:
    """Skip the calling test where PostgreSQL is not installed, except in CI (``CI`` set),
    where that is a failure: CI must run every PostgreSQL test."""
    if binaries() is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def running_postgres(*, durable: bool = False) -> Iterator[Postgres]:
    """A started PostgreSQL with an empty `DATABASE`. `durable` keeps PostgreSQL's own
    settings (fsync on: what benchmarks measure); tests turn fsync off for speed, which only
    matters if the machine itself crashes."""
    bindir = binaries()
    if bindir is None:
        raise RuntimeError(MISSING)
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="proxy-pg-"))
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    if as_root:
        account = pwd.getpwnam("postgres")
        for path in (base, sockets):
            os.chown(path, account.pw_uid, account.pw_gid)
    port = free_port()
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    try:
        _run(
            bindir,
            as_root,
            "initdb",
            "-D",
            str(data),
            "-U",
            USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        _start(bindir, as_root, data, options)
        server = Postgres("127.0.0.1", port, data, bindir, options)
        server.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            _run(bindir, as_root, "pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def _start(bindir: Path, as_root: bool, data: Path, options: str) -> None:
    log = data.parent / "server.log"
    _run(
        bindir,
        as_root,
        "pg_ctl",
        "-D",
        str(data),
        "-o",
        options,
        "-l",
        str(log),
        "-w",
        "-t",
        "60",
        "start",
    )


def _run(bindir: Path, as_root: bool, program: str, *args: str) -> None:
    command = [str(bindir / program), *args]
    if as_root:
        command = ["runuser", "-u", "postgres", "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr.strip()}")
