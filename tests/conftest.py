"""Shared fixtures: the shipped price book (loaded once), the fake DeepSeek and the proxy in
front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.pricing import PriceBook, load_price_book
from tests.support.fake_clients import UPSTREAM_AUTH
from tests.support.fake_deepseek import FakeDeepSeek, running_fake
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY
from tests.support.ledger_backends import BACKENDS, LedgerBackend, check_ledger
from tests.support.ledger_backends import ledger_backend as ledger_backend_of
from tests.support.postgres import Postgres, require_postgres, running_postgres
from tests.support.proxy_harness import RunningProxy, StartProxy, running_proxy

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_BOOK = ROOT / "config" / "pricing" / "deepseek.yaml"


@pytest.fixture(scope="session")
def book() -> PriceBook:
    return load_price_book([SHIPPED_BOOK])


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL for the session (tests/support/postgres.py); each test that uses it
    makes its own database. Skipped where the server binaries are missing, except in CI
    (``CI`` set), where a missing PostgreSQL is a failure: CI must run these tests."""
    require_postgres()
    with running_postgres() as server:
        yield server


@pytest.fixture
async def fake() -> AsyncIterator[FakeDeepSeek]:
    """A fresh fake DeepSeek on loopback (tests/support/fake_deepseek.py)."""
    async with running_fake() as server:
        yield server


@pytest.fixture
async def client(fake: FakeDeepSeek) -> AsyncIterator[httpx.AsyncClient]:
    """httpx straight to the fake DeepSeek, with its key."""
    async with httpx.AsyncClient(base_url=fake.base_url, headers=UPSTREAM_AUTH) as http:
        yield http


@pytest.fixture
async def sdk(fake: FakeDeepSeek) -> AsyncIterator[openai.AsyncOpenAI]:
    """The openai SDK straight to the fake DeepSeek."""
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key=FAKE_UPSTREAM_KEY, max_retries=0
    ) as api:
        yield api


@pytest.fixture(params=BACKENDS)
def ledger_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerBackend]:
    """A fresh ledger of each kind in turn (tests/support/ledger_backends.py): the tests that
    run a proxy run on SQLite and on PostgreSQL."""
    server = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    with ledger_backend_of(request.param, tmp_path, server) as backend:
        yield backend


@pytest.fixture
async def proxy(
    fake: FakeDeepSeek, book: PriceBook, ledger_backend: LedgerBackend
) -> AsyncIterator[RunningProxy]:
    """The real proxy app on loopback in front of `fake`, with the harness's defaults, its
    records in `ledger_backend`, which must hold exactly them when the test ends."""
    async with running_proxy(fake.base_url, book, **ledger_backend.options()) as running:
        yield running
    check_ledger(ledger_backend, running.sink.records)


@pytest.fixture
async def start_proxy(
    fake: FakeDeepSeek, book: PriceBook, ledger_backend: LedgerBackend
) -> AsyncIterator[StartProxy]:
    """For tests that need other settings than `proxy`'s: ``await start_proxy(budgets=...)``
    takes `running_proxy`'s keyword options; every proxy started is closed after the test.
    Unless the test brings its own sink, ledger or spend, the first proxy it starts records
    into `ledger_backend`, checked as `proxy`'s is."""
    started: list[RunningProxy] = []
    async with AsyncExitStack() as stack:

        async def start(**options: Any) -> RunningProxy:
            own = {"sink", "ledger", "spend", "team_spend"} & set(options)
            if not own and not started:
                options = {**ledger_backend.options(), **options}
            running = await stack.enter_async_context(running_proxy(fake.base_url, book, **options))
            if not own and not started:
                started.append(running)
            return running

        yield start
    for running in started:
        check_ledger(ledger_backend, running.sink.records)
