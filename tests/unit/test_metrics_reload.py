"""The ``llm_config_*`` figures: the reloader's status as /metrics shows it, in one process and
combined over the workers of ``serve --workers N`` (docs/metrics.md)."""

from __future__ import annotations

import dataclasses
import hashlib
from zoneinfo import ZoneInfo

from prometheus_client import CollectorRegistry

from proxy.metrics import MetricSources, ProxyMetrics, ReloadStatus
from proxy.pricing import PriceBook
from tests.support.exposition import Labels, families, series
from tests.support.metric_workers import SimulatedWorkers
from tests.support.proxy_harness import PEAK

CONFIG_A, CONFIG_B, CONFIG_C = (
    hashlib.sha256(text.encode()).hexdigest() for text in ("config A", "config B", "config C")
)
STARTED = ReloadStatus(
    successes=0,
    failures=0,
    loaded_at=1_790_000_000.25,
    config_digest=CONFIG_A,
    book_digest="febd9b82f25fba99fc8eb51cd6606febb1a1dc4e9e53aa8acee4f96c67b0394d",
    stale=False,
)


class Reloader:
    """Stands in for the proxy's reloader: its status is what the test last set."""

    def __init__(self, status: ReloadStatus) -> None:
        self.current = status

    def status(self) -> ReloadStatus:
        return self.current

    def update(self, **changes: object) -> None:
        self.current = dataclasses.replace(self.current, **changes)  # type: ignore[arg-type]


def sources(book: PriceBook, reloader: Reloader | None) -> MetricSources:
    return MetricSources(
        teams=("alpha",),
        book=book,
        billing_timezone=ZoneInfo("Asia/Shanghai"),
        clock=lambda: PEAK,
        reload=None if reloader is None else reloader.status,
    )


def figures(text: bytes) -> dict[str, dict[Labels, float]]:
    """Every ``llm_config_*`` series in `text`."""
    names = (
        "llm_config_reload_total",
        "llm_config_last_reload_success_timestamp_seconds",
        "llm_config_info",
        "llm_config_stale",
    )
    return {name: series(text, name) for name in names}


def expected(
    success: int, failure: int, loaded: float, configs: list[str], stale: bool
) -> dict[str, dict[Labels, float]]:
    """The figures for these values, with the book of `STARTED`."""
    return {
        "llm_config_reload_total": {
            (("result", "success"),): success,
            (("result", "failure"),): failure,
        },
        "llm_config_last_reload_success_timestamp_seconds": {(): loaded},
        "llm_config_info": {
            (("book_digest", "febd9b82f25f"), ("config_digest", config[:12])): 1
            for config in configs
        },
        "llm_config_stale": {(): float(stale)},
    }


def test_one_process_shows_its_reloaders_status(book: PriceBook) -> None:
    reloader = Reloader(STARTED)
    metrics = ProxyMetrics(CollectorRegistry(), sources(book, reloader))
    assert figures(metrics.exposition()) == expected(0, 0, 1_790_000_000.25, [CONFIG_A], False)

    # config B is written: not applied until SIGHUP; its reload is refused, then a fixed one
    # is applied.
    reloader.update(stale=True)
    assert figures(metrics.exposition()) == expected(0, 0, 1_790_000_000.25, [CONFIG_A], True)
    reloader.update(failures=1)
    assert figures(metrics.exposition()) == expected(0, 1, 1_790_000_000.25, [CONFIG_A], True)
    reloader.update(successes=1, loaded_at=1_790_000_600.5, config_digest=CONFIG_B, stale=False)
    assert figures(metrics.exposition()) == expected(1, 1, 1_790_000_600.5, [CONFIG_B], False)


def test_no_config_figures_without_a_reloader(book: PriceBook) -> None:
    metrics = ProxyMetrics(CollectorRegistry(), sources(book, None))
    assert not {name for name in families(metrics.exposition()) if name.startswith("llm_config")}


def test_workers_combine_their_figures(book: PriceBook, workers: SimulatedWorkers) -> None:
    """Stale if any live worker is; the oldest load; one info series per configuration a live
    worker runs; reloads summed over every worker that ran, so the counter never goes down."""
    folder = workers.folder
    reloaders = {1: Reloader(STARTED), 2: Reloader(STARTED)}
    metrics: dict[int, ProxyMetrics] = {}

    def start(worker: int) -> None:
        with workers.acting(worker):
            metrics[worker] = ProxyMetrics(
                CollectorRegistry(), sources(book, reloaders[worker]), folder
            )

    def scrape(worker: int) -> dict[str, dict[Labels, float]]:
        """What a scrape answered by `worker` shows, the others having published."""
        for other, each in metrics.items():
            if other != worker:
                with workers.acting(other):
                    each.publish()
        with workers.acting(worker):
            return figures(metrics[worker].exposition())

    start(1)
    start(2)
    assert scrape(1) == scrape(2) == expected(0, 0, 1_790_000_000.25, [CONFIG_A], False)

    # SIGHUP: worker 1 has applied config B, worker 2 not yet.
    reloaders[1].update(successes=1, loaded_at=1_790_000_600.5, config_digest=CONFIG_B)
    reloaders[2].update(stale=True)
    assert scrape(2) == expected(1, 0, 1_790_000_000.25, [CONFIG_A, CONFIG_B], True)
    reloaders[2].update(
        successes=1, loaded_at=1_790_000_600.75, config_digest=CONFIG_B, stale=False
    )
    assert scrape(1) == expected(2, 0, 1_790_000_600.5, [CONFIG_B], False)

    # Config C is written without a SIGHUP; worker 2 dies and its replacement, worker 3,
    # starts with config C while worker 1 still runs B.
    reloaders[1].update(stale=True)
    del metrics[2]
    workers.died(2)
    reloaders[3] = Reloader(
        dataclasses.replace(STARTED, loaded_at=1_790_001_200.0, config_digest=CONFIG_C)
    )
    start(3)
    assert scrape(3) == expected(2, 0, 1_790_000_600.5, [CONFIG_B, CONFIG_C], True)

    # Worker 1 refuses a reload (C fails its checks there, say), then worker 1 dies too.
    reloaders[1].update(failures=1)
    assert scrape(3) == expected(2, 1, 1_790_000_600.5, [CONFIG_B, CONFIG_C], True)
    del metrics[1]
    workers.died(1)
    assert scrape(3) == expected(2, 1, 1_790_001_200.0, [CONFIG_C], False)
