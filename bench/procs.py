"""Child processes of a benchmark run: start, wait until ready, measure, and always stop.

`Processes` owns every process it starts and stops them all (SIGTERM, then SIGKILL after a
grace period) when its block exits, whether the run ended, failed or was interrupted. Children
run in their own session so that a Ctrl-C at the terminal reaches only the benchmark, which
then stops them in order (the proxy gets SIGTERM and drains its ledger).

CPU placement: on a machine with few cores the server under test, the fake upstream and the
load generator compete. `Placement` pins the server under test to its own core and everything
else (generator, upstream, wrk) to the others, identically for the reference forwarder and the
proxy, so both get the same CPU and neither is starved by the generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the child binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Placement:
    """Which CPUs the server under test gets, and which everything else gets."""

    server: frozenset[int]
    others: frozenset[int]

    @classmethod
    def choose(cls, pin: bool) -> Placement | None:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return None
        return cls(frozenset(cpus[-1:]), frozenset(cpus[:-1]))

    def describe(self) -> str:
        return (
            f"server under test on CPU {_cpus(self.server)}; generator, upstream and wrk "
            f"on CPU {_cpus(self.others)}"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Set the affinity of every thread of `pid` (threads started later inherit it)."""
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(task.name), cpus)


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from ``/proc/<pid>/status`` (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (``/proc/stat``: everything but
    idle and I/O wait, so interrupts and time stolen by the hypervisor count)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and every child it has reaped (wrk, servers...)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class Service:
    """A started child process serving HTTP on `url`."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    under_test: bool

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class StartError(RuntimeError):
    """A child did not become ready; the message carries the tail of its log."""


class Processes:
    """Starts children and guarantees they are stopped (use as a context manager)."""

    def __init__(self, log_dir: Path, placement: Placement | None) -> None:
        self.log_dir = log_dir
        self.placement = placement
        self.services: list[Service] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        url: str,
        *,
        under_test: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> Service:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(  # noqa: S603 - argv is built by the benchmark itself
                list(argv),
                cwd=cwd,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = Service(name, process, url, log, under_test)
        self.services.append(service)
        if self.placement is not None:
            pin(process.pid, self.placement.server if under_test else self.placement.others)
        return service

    async def wait_ready(self, service: Service, within: float = 30.0) -> None:
        """Poll ``GET /healthz`` until it answers 200, the process dies, or `within` s pass."""
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
            while time.monotonic() < deadline:
                if service.process.poll() is not None:
                    raise StartError(
                        f"{service.name} exited with {service.process.returncode}:"
                        f"\n{service.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with client.get(service.url + "/healthz") as response:
                        if response.status == 200:
                            self._repin(service)
                            return
                await asyncio.sleep(0.05)  # polling for the port to open, under a deadline
        raise StartError(
            f"{service.name} was not ready within {within:.0f} s:\n{service.log_tail()}"
        )

    def _repin(self, service: Service) -> None:
        """Pin again once ready: threads started before the first pin did not inherit it."""
        if self.placement is not None:
            pin(service.pid, self.placement.server if service.under_test else self.placement.others)

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every child still running (newest first), then SIGKILL stragglers."""
        for service in reversed(self.services):
            if service.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for service in reversed(self.services):
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
