"""``serve --workers N``: every worker's figures summed, whichever worker a scrape reaches.

Two channels, both through one folder the workers share (``PROMETHEUS_MULTIPROC_DIR``, fresh
per run, `proxy.workers`):

- the per-call totals (`SharedTotals`): each worker rewrites ``calls-<pid>.json`` every second
  and at exit, and a scrape adds the other workers' files to its own live totals; sums stay
  exact, other workers' figures lag by up to a second, and the totals of a worker that exited
  stay in (counters never go down);
- gauges and rare counters (calls in progress, refusals, the ledger's and the reloads'
  figures) as prometheus_client's own multiprocess files, combined by its
  `MultiProcessCollector`.

The budgets are not shared: every worker exports those of the configuration it runs (they all
reload on the same SIGHUP). prometheus_client cannot remove a series from a worker's file, so
what a reload removed is left out when a scrape reads the files (`_WorkerFiles`).

`WorkerSharing.publish` writes this worker's share; `WorkerSharing.publishing` runs it every
second for the app's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy.ledger.writer import LedgerStatus
from proxy.metrics import contract
from proxy.metrics.collectors import digests, ledger_values, reload_counts
from proxy.metrics.contract import RELOAD_RESULTS, Family
from proxy.metrics.sources import MetricSources, ReloadStatus
from proxy.metrics.totals import CallTotals, Tables, add, export


class SharedTotals(Collector):
    """This worker's `CallTotals` plus every other worker's last published ones."""

    def __init__(self, totals: CallTotals, shared_dir: Path, worker: str | None = None) -> None:
        """`worker` names this process's file in `shared_dir` (default: the process id)."""
        self._totals = totals
        self._dir = shared_dir
        self._own = f"calls-{worker or os.getpid()}.json"

    def dump(self) -> None:
        """Publish this worker's totals for the other workers' scrapes."""
        data = {
            name: [[*labels, _encode(value)] for labels, value in table.items()]
            for name, table in self._totals.tables().items()
        }
        temporary = self._dir / f".{self._own}.tmp"
        temporary.write_text(json.dumps(data), encoding="utf-8")
        temporary.replace(self._dir / self._own)

    def tables(self) -> Tables:
        """Every worker's totals, summed."""
        tables = self._totals.tables()
        for path in self._dir.glob("calls-*.json"):
            if path.name == self._own:
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a worker is replacing its file right now; next scrape has it
            for name, rows in data.items():
                if name not in tables:
                    continue
                for *labels, value in rows:
                    add(tables[name], tuple(labels), _decode(value))
        return tables

    def collect(self) -> Iterator[Metric]:
        return export(self.tables())


def _encode(value: Any) -> Any:
    """Money as text (exact), a histogram as a list, a count as it is."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, tuple):
        return [value[0], value[1]]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str):
        return Decimal(value)
    if isinstance(value, list):
        return (value[0], float(value[1]))
    return value


class _SharedLedgerGauges:
    """The ``llm_ledger_*`` figures with several workers, each worker its own ledger writer.

    How a scrape combines the live workers: committing is their minimum (one worker that
    cannot commit refuses its hard-budget calls, so the service does), records waiting and
    the bound are sums (what all of them hold in memory, against what all of them may), the
    last commit the newest; write errors are a counter, summed over every worker that ran.
    """

    _MODES: Mapping[Family, Literal["livemin", "livesum", "livemax"]] = {
        contract.LEDGER_COMMITTING: "livemin",
        contract.LEDGER_QUEUED: "livesum",
        contract.LEDGER_MAX_QUEUED: "livesum",
        contract.LEDGER_LAST_COMMIT: "livemax",
    }

    def __init__(self, registry: CollectorRegistry, status: Callable[[], LedgerStatus]) -> None:
        self._status = status
        self._gauges = {
            family: Gauge(*family.declaration, registry=registry, multiprocess_mode=mode)
            for family, mode in self._MODES.items()
        }
        self._errors = Counter(*contract.LEDGER_WRITE_ERRORS.declaration, registry=registry)
        self._errors_published = 0

    def publish(self) -> None:
        status = self._status()
        for family, value in ledger_values(status).items():
            if family in self._gauges:
                self._gauges[family].set(value)
        self._errors.inc(status.write_errors - self._errors_published)
        self._errors_published = status.write_errors


class _SharedReloadFigures:
    """The ``llm_config_*`` figures with several workers, each with its own reloader (they all
    reload on the same SIGHUP, but a worker restarted after a change on disk starts with the
    new files while the others still run the old ones).

    How a scrape combines the live workers: stale is their maximum (one worker not running
    the files on disk is enough), the load time their minimum (the oldest configuration any of
    them runs), the digests one series per configuration some worker runs. Reloads are a
    counter, summed over every worker that ran: each counts its own, so one SIGHUP counts once
    per worker.
    """

    def __init__(self, registry: CollectorRegistry, status: Callable[[], ReloadStatus]) -> None:
        self._status = status
        self._stale = Gauge(
            *contract.CONFIG_STALE.declaration, registry=registry, multiprocess_mode="livemax"
        )
        self._loaded = Gauge(
            *contract.CONFIG_LOADED.declaration, registry=registry, multiprocess_mode="livemin"
        )
        self._info = Gauge(
            *contract.CONFIG_INFO.declaration, registry=registry, multiprocess_mode="livemax"
        )
        self._digests: tuple[str, str] | None = None
        self._reloads = Counter(*contract.CONFIG_RELOADS.declaration, registry=registry)
        self._published = dict.fromkeys(RELOAD_RESULTS, 0)
        for result in RELOAD_RESULTS:
            self._reloads.labels(result)

    def publish(self) -> None:
        status = self._status()
        self._stale.set(float(status.stale))
        self._loaded.set(status.loaded_at)
        running = digests(status)
        if running != self._digests:
            if self._digests is not None:
                # The file keeps the old series: 0 marks it for `_WorkerFiles` to leave out.
                self._info.labels(*self._digests).set(0)
            self._info.labels(*running).set(1)
            self._digests = running
        for result, count in reload_counts(status).items():
            self._reloads.labels(result).inc(count - self._published[result])
            self._published[result] = count


class _WorkerFiles(Collector):
    """prometheus_client's figures from every worker's files, less the series a reload
    removed: the calls in progress of teams the configuration no longer has, and the digests
    of configurations no live worker runs (0 in the files)."""

    def __init__(self, files: MultiProcessCollector, teams: Callable[[], Sequence[str]]) -> None:
        self._files = files
        self._teams = teams

    def collect(self) -> Iterator[Metric]:
        for metric in self._files.collect():  # type: ignore[no-untyped-call]
            if metric.name == contract.INFLIGHT.name:
                teams = frozenset(self._teams())
                metric.samples = [s for s in metric.samples if s.labels["team"] in teams]
            elif metric.name == contract.CONFIG_INFO.name:
                metric.samples = [s for s in metric.samples if s.value]
            yield metric


class WorkerSharing:
    """One worker's part in the shared figures.

    Its gauges and counters live on `registry`, a registry of its own whose values go to
    prometheus_client's files; the registry Prometheus scrapes gets the combination over the
    workers (`_WorkerFiles`) and every worker's per-call totals (`SharedTotals`).
    """

    def __init__(
        self,
        exported: CollectorRegistry,
        shared_dir: Path,
        totals: CallTotals,
        sources: MetricSources,
    ) -> None:
        self._sources = sources
        files = MultiProcessCollector(None, path=str(shared_dir))  # type: ignore[no-untyped-call]
        exported.register(_WorkerFiles(files, lambda: self._sources.teams))
        self.registry = CollectorRegistry()  # the metric objects; their values are in the files
        self.totals = SharedTotals(totals, shared_dir)
        exported.register(self.totals)
        self._inflight_gauge = Gauge(  # the scrape sums the live workers
            *contract.INFLIGHT.declaration, registry=self.registry, multiprocess_mode="livesum"
        )
        self._ledger_gauges = None
        if sources.ledger is not None:
            self._ledger_gauges = _SharedLedgerGauges(self.registry, sources.ledger)
        self._reload_figures = None
        if sources.reload is not None:
            self._reload_figures = _SharedReloadFigures(self.registry, sources.reload)

    def apply(self, sources: MetricSources) -> None:
        """Publish the calls in progress of `sources`' teams from now on
        (`proxy.metrics.ProxyMetrics.apply`)."""
        self._sources = sources

    def publish(self) -> None:
        """Share this worker's figures with the others: its calls in progress, its ledger
        writer's state, its reloads and its per-call totals."""
        counts = self._sources.in_flight()
        for team in self._sources.teams:
            self._inflight_gauge.labels(team).set(counts.get(team, 0))
        if self._ledger_gauges is not None:
            self._ledger_gauges.publish()
        if self._reload_figures is not None:
            self._reload_figures.publish()
        self.totals.dump()

    async def publishing(self, app: web.Application) -> AsyncIterator[None]:
        """A cleanup context: publish every second while the app runs, and once more at
        exit, so nothing this worker counted is lost when it stops."""

        async def every_second() -> None:
            while True:
                await asyncio.sleep(1.0)  # a period, not a wait for a condition
                self.publish()

        task = asyncio.create_task(every_second(), name="share-metrics")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.publish()
