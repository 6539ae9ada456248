"""Fixtures of the unit tests: the metrics of one process, or of a worker of ``serve --workers
N`` sharing them through a folder (`tests.support.metric_workers`); price-book files written
in the test's folder (`tests.support.book_files`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.book_files import Write, book_writer
from tests.support.metric_workers import MULTIPROC_ENV, SimulatedWorkers


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatedWorkers]:
    """Workers sharing their figures through `tmp_path`, played in turn by this process."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    simulated = SimulatedWorkers(tmp_path)
    try:
        yield simulated
    finally:
        simulated.close()


@pytest.fixture(params=["one process", "a worker"])
def shared_dir(request: pytest.FixtureRequest) -> Iterator[Path | None]:
    """`ProxyMetrics`' `shared_dir`: None for one process; for worker 1 of ``serve --workers
    N`` (acting for the whole test), the folder the workers share their figures through."""
    if request.param == "one process":
        yield None
        return
    workers: SimulatedWorkers = request.getfixturevalue("workers")
    with workers.acting(1):
        yield workers.folder


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """Write a price-book file (dedented) in the test's folder."""
    return book_writer(tmp_path)
