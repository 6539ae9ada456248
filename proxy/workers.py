"""``serve --workers N``: N worker processes on one port, one shared ledger, one /metrics.

Each worker is ``python -m proxy serve --worker`` binding the same address with SO_REUSEPORT,
so the kernel spreads connections over the cores. What must agree across workers is shared:

- the ledger: one SQLite file, each worker writing its own batches (WAL serialises commits);
  in-flight rows and stale budget holds are recovered once, here, before any worker starts;
- metrics: one fresh folder per run (``PROMETHEUS_MULTIPROC_DIR``), so whichever worker a
  scrape lands on exports the sum over all of them: gauges through prometheus_client's
  multiprocess mode, per-call totals as files each worker rewrites every second
  (`proxy.metrics.CallTotals`);
- hard budgets: reservations live in the ledger (`proxy.budgets.SharedBudgetGuard`).

The supervisor forwards SIGTERM/SIGINT to the workers, which drain as a single process does,
and restarts a worker that dies on its own; a worker that dies within seconds of starting
(a port taken, a broken config) stops the whole service instead of looping.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

log = logging.getLogger("proxy.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_EARLY_DEATH = 5.0  # seconds: a worker dying this soon after its start is a fatal error


def supervise(config: Path, log_level: str, count: int, loop: str) -> int:
    """Run `count` workers until a signal stops them; the exit code of the service."""
    metrics_dir = Path(tempfile.mkdtemp(prefix="proxy-metrics-"))
    env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
    command = [sys.executable, "-m", "proxy", "serve", "--config", str(config),
               "--log-level", log_level, "--loop", loop, "--worker"]
    workers: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    stopping = False

    def start() -> None:
        process = subprocess.Popen(command, env=env)  # noqa: S603 - our own interpreter
        workers[process.pid] = (process, time.monotonic())

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for process, _ in workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    try:
        for _ in range(count):
            start()
        log.info("started %d workers (metrics in %s)", count, metrics_dir)
        while workers:
            pid, status = os.wait()
            entry = workers.pop(pid, None)
            if entry is None:
                continue
            mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                failed = failed or code != 0
                continue
            if time.monotonic() - entry[1] < _EARLY_DEATH:
                log.error("worker %d exited with %d right after starting; stopping", pid, code)
                failed = True
                stop(signal.SIGTERM, None)
                continue
            log.error("worker %d exited with %d; starting a new one", pid, code)
            start()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if failed else 0
