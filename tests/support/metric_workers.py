"""Workers of ``serve --workers N`` played in turn by one test process, for the metrics they share
through prometheus_client's multiprocess files (`proxy.metrics.sharing`).

prometheus_client decides where a metric's value lives when the metric, or one of its labelled
series, is created: in memory, or in multiprocess mode in files named after the process id.
Inside `SimulatedWorkers.acting(n)`, what is created writes to worker n's files in the shared
folder, as a process with id n would; so everything a worker does that may create a series
(building its `ProxyMetrics`, `apply`, `publish`, `exposition`) runs inside its `acting`.
`SimulatedWorkers.died` is what the supervisor does when a worker exits.

The per-call totals (`proxy.metrics.sharing.SharedTotals`) are files named after the real
process id, which these workers share: each sees its own totals only. Their sharing is tested
with real workers (tests/integration/test_workers.py) and in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import values
from prometheus_client.multiprocess import mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client's multiprocess values put their files: the test sets it to the
shared folder (`proxy.workers` does for real workers)."""


class SimulatedWorkers:
    """Worker ids and their prometheus_client value classes, all writing to `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._classes: dict[int, Any] = {}

    @contextlib.contextmanager
    def acting(self, worker: int) -> Iterator[None]:
        """Be worker `worker` (an id, as a pid is) for what the block does."""
        if worker not in self._classes:
            self._classes[worker] = values.MultiProcessValue(  # type: ignore[no-untyped-call]
                lambda: worker
            )
        previous = values.ValueClass
        values.ValueClass = self._classes[worker]
        try:
            yield
        finally:
            values.ValueClass = previous

    def died(self, worker: int) -> None:
        """The supervisor reaped `worker`: its ``live*`` gauges leave the shared figures."""
        mark_process_dead(worker, str(self.folder))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Close every worker's files."""
        for value_class in self._classes.values():
            value_class.close_all_files()
