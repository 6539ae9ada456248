"""``serve --workers N``: N worker processes on one port, one shared ledger, one /metrics.

Each worker is ``python -m proxy serve --worker`` binding the same address with SO_REUSEPORT,
so the kernel spreads connections over the cores. What must agree across workers is shared:

- the ledger: one SQLite file, each worker writing its own batches (WAL serialises commits);
  in-flight rows and stale budget holds are recovered once, by `serve`, before any worker
  starts;
- metrics: one fresh folder per run (``PROMETHEUS_MULTIPROC_DIR``), so whichever worker a
  scrape lands on exports the sum over all of them: gauges through prometheus_client's
  multiprocess mode, per-call totals as files each worker rewrites every second
  (`proxy.metrics.sharing`);
- hard budgets: reservations live in the ledger (`proxy.budgets.LedgerHolds`);
- admission limits: each worker counts its calls in progress in its slot of a small mapped file
  in the same folder (`proxy.admission.SharedAdmission`), so ``limits.max_inflight`` and
  ``limits.max_inflight_per_team`` hold across all workers, to within N - 1 calls; a team added
  by a reload (or seen by a worker restarted after the config changed) gets its column from a
  registry the workers append to under a file lock (`proxy.shared_counters`).

**A dead worker's state dies with it.** Every worker gets a fresh owner id (`OWNER_ENV`, new
for each start) and a slot (`SLOT_ENV`); its ledger rows and budget holds carry the id. When
the supervisor reaps a worker, whatever the exit (``kill -9`` included), it first releases
that owner's budget holds and in-flight rows in one ledger transaction (`proxy.worker_release`)
and zeroes its slot, so nothing of a dead worker keeps refusing calls; then it schedules a
replacement. The release happens as soon as the supervisor sees the exit (a few milliseconds);
if the ledger cannot be written then, it is retried every second, and the next start releases
everything anyway.

**Restarts back off and never give up.** A replacement starts `FIRST_DELAY` after a death; each
further death of a worker that lived less than `STABLE_AFTER` doubles the delay, up to
`MAX_DELAY`. The other workers serve meanwhile, and every death is logged with the pid, the
exit code or signal and the delay. What would make every start fail is checked once, before
any worker starts: configuration, key and ledger (by `serve`), and the address
(`listen_problem`, one line and exit code 2).

**Signals.** SIGHUP is forwarded to every running worker, each of which reloads the
configuration and price book itself (`proxy.reload`). The supervisor keeps SIGCHLD, SIGTERM,
SIGINT and SIGHUP blocked and takes them with
`signal.sigtimedwait`, whose timeout is the time to the next due restart: it never polls, and
no signal is lost between two waits. SIGTERM or SIGINT (also during a backoff) is forwarded to
every worker, which drains as a single process does; no worker is started after it, and the
supervisor exits once the last worker has. Workers are started with the signal mask restored
and, on Linux, ``PR_SET_PDEATHSIG`` = SIGTERM: if the supervisor itself is killed, they drain
and exit rather than serve on unsupervised.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from proxy.admission import SharedAdmission
from proxy.config import ProxyConfig
from proxy.ledger.spill import EXIT_UNWRITTEN
from proxy.shared_counters import SharedCounters
from proxy.worker_release import DeadOwners, ledger_release

log = logging.getLogger("proxy.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OWNER_ENV = "PROXY_WORKER_OWNER"
"""A worker's owner id: its ledger rows and budget holds carry it."""
SLOT_ENV = "PROXY_WORKER_SLOT"
"""A worker's slot (0 to N - 1) in the shared admission counters."""

FIRST_DELAY = 0.5
"""Seconds from a worker's death to its replacement's start."""
MAX_DELAY = 30.0
"""The longest delay, reached after seven quick deaths in a row."""
STABLE_AFTER = 60.0
"""A worker that lived this long died of something new: its replacement waits `FIRST_DELAY`."""
_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_STOPS = frozenset({signal.SIGTERM, signal.SIGINT})
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def new_owner(*labels: str) -> str:
    """A fresh owner id, ``host:pid:labels...:random``: unique per process start, and telling
    an operator reading the ledger which host and process wrote a row."""
    return ":".join((socket.gethostname(), str(os.getpid()), *labels, secrets.token_hex(4)))


def listen_problem(host: str, port: int) -> str | None:
    """Why the workers could not listen on `host`:`port`, or None.

    Binds every address the host resolves to as the workers will (SO_REUSEADDR and
    SO_REUSEPORT, IPv6 sockets IPv6-only, as asyncio does) and closes at once: a port held by
    another program fails here, once, rather than in every worker start. A program taking the
    port after this check makes the workers fail and be restarted with backoff.
    """
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return f"cannot listen on {host}:{port}: {reason[:1].lower()}{reason[1:]}"
    return None


def supervise(config: ProxyConfig, log_level: str, count: int, loop: str) -> int:
    """Run `count` workers until SIGTERM or SIGINT has stopped them all; the exit code of the
    service (`EXIT_UNWRITTEN` if a worker stopped with ledger records it could not write, as a
    single process does; else 1 if a worker did not stop cleanly). `serve` has checked the
    configuration, the address and the ledger, and recovered the ledger, before calling
    this."""
    folder = Path(tempfile.mkdtemp(prefix="proxy-workers-"))
    try:
        counters = SharedAdmission.create(folder, count, config.teams)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            return _Supervisor(config, log_level, loop, folder, counters, mask).run(count)
        finally:
            counters.close()
            while signal.sigtimedwait(_SIGNALS, 0) is not None:
                pass  # sent during the last wait: unblocked, it would kill this process
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(slots=True)
class _Slot:
    """One worker's place: the process in it now, or when the next one starts."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    owner: str = ""
    started: float = 0.0
    delay: float = 0.0
    """The backoff used for the last restart (0: none yet)."""
    due: float | None = 0.0
    """When to start a worker here (monotonic seconds); None while one runs or after a stop."""


class _Supervisor:
    """The workers' slots, the dead owners still to release, and whether a stop was asked."""

    def __init__(
        self,
        config: ProxyConfig,
        log_level: str,
        loop: str,
        folder: Path,
        counters: SharedCounters,
        mask: set[int | signal.Signals],
    ) -> None:
        self._command = [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config.path),
            "--log-level",
            log_level,
            "--loop",
            loop,
            "--worker",
        ]
        self._env = {**os.environ, MULTIPROC_ENV: str(folder)}
        self._folder = folder
        self._counters = counters
        self._mask = mask
        self._pid = os.getpid()
        self._prctl: Callable[..., Any] | None = (
            ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
        )
        self._slots: list[_Slot] = []
        self._dead = DeadOwners(ledger_release(config))
        self._stopping = False
        self._failed = False
        self._unwritten = False

    def run(self, count: int) -> int:
        self._slots = [_Slot(index) for index in range(count)]
        self._start_due()
        log.info("started %d workers (shared files in %s)", count, self._folder)
        while not self._stopping or any(slot.process is not None for slot in self._slots):
            timeout = self._timeout()
            info = (
                signal.sigwaitinfo(_SIGNALS)
                if timeout is None
                else signal.sigtimedwait(_SIGNALS, timeout)
            )
            if info is not None and info.si_signo == signal.SIGCHLD:
                self._reap()
            elif info is not None and info.si_signo == signal.SIGHUP:
                self._reload()
            elif info is not None:
                self._stop(signal.Signals(info.si_signo))
            self._dead.retry_due()
            self._start_due()
        log.info("all workers stopped")
        return EXIT_UNWRITTEN if self._unwritten else 1 if self._failed else 0

    def _timeout(self) -> float | None:
        """Seconds until something is due (a restart, a release to retry); None: nothing."""
        now = time.monotonic()
        dues = [slot.due for slot in self._slots if slot.due is not None]
        dues += self._dead.dues()
        return max(0.0, min(dues) - now) if dues else None

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.due is not None and slot.due <= now and not self._stopping:
                self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.owner = new_owner(f"w{slot.index}")
        env = {**self._env, OWNER_ENV: slot.owner, SLOT_ENV: str(slot.index)}
        try:
            # Our own interpreter; preexec_fn is unsafe only with threads, and the supervisor
            # has none.
            process = subprocess.Popen(  # noqa: S603
                self._command,
                env=env,
                preexec_fn=self._in_child,  # noqa: PLW1509
            )
        except OSError:
            slot.delay = min(max(slot.delay * 2, FIRST_DELAY), MAX_DELAY)
            slot.due = time.monotonic() + slot.delay
            log.exception(
                "cannot start a worker in slot %d; retrying in %g s", slot.index, slot.delay
            )
            return
        slot.process, slot.started, slot.due = process, time.monotonic(), None
        log.info("worker %d started in slot %d (owner %s)", process.pid, slot.index, slot.owner)

    def _in_child(self) -> None:
        """Runs in the new worker before ``exec``: a signal mask is inherited across ``exec``,
        so the worker gets the one the supervisor had; and it asks for SIGTERM when the
        supervisor dies."""
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != self._pid:  # the supervisor died before the request took hold
                os._exit(1)

    def _reap(self) -> None:
        """Handle every worker that has exited (one SIGCHLD may stand for several)."""
        for slot in self._slots:
            if slot.process is not None and (code := slot.process.poll()) is not None:
                self._died(slot, slot.process.pid, code)

    def _died(self, slot: _Slot, pid: int, code: int) -> None:
        """Schedule the replacement (unless stopping) and release what the worker held, which
        is done before the replacement can start."""
        slot.process = None
        if self._stopping:
            # A worker that the forwarded signal ended before it could drain stopped cleanly.
            if code == EXIT_UNWRITTEN:
                log.error(
                    "worker %d stopped with ledger records it could not write; its log "
                    "names the file they are saved in",
                    pid,
                )
                self._unwritten = True
            elif code != 0 and -code not in _STOPS:
                log.error("worker %d %s while stopping", pid, _describe(code))
                self._failed = True
        else:
            uptime = time.monotonic() - slot.started
            quick = slot.delay > 0 and uptime < STABLE_AFTER
            slot.delay = min(slot.delay * 2, MAX_DELAY) if quick else FIRST_DELAY
            slot.due = time.monotonic() + slot.delay
            log.error(
                "worker %d (slot %d) %s after %.1f s; restarting in %g s",
                pid,
                slot.index,
                _describe(code),
                uptime,
                slot.delay,
            )
        mark_process_dead(pid, str(self._folder))  # type: ignore[no-untyped-call]
        self._counters.zero(slot.index)
        self._dead.release(slot.owner)

    def _reload(self) -> None:
        """SIGHUP: every running worker reloads the configuration itself (`proxy.reload`); a
        worker started later reads the files as they are then."""
        running = [slot.process for slot in self._slots if slot.process is not None]
        log.info("SIGHUP: asking %d worker(s) to reload the configuration", len(running))
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGHUP)

    def _stop(self, signum: signal.Signals) -> None:
        log.info("%s: stopping the workers", signum.name)
        self._stopping = True
        for slot in self._slots:
            slot.due = None
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signum)


def _describe(code: int) -> str:
    """A worker's exit as a log phrase (Popen gives -N for "killed by signal N")."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"
