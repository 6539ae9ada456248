"""Running the real proxy app on loopback against the fake DeepSeek, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.attribution import DEFAULT_ATTRIBUTION, AttributionConfig
from proxy.auth import ClientKey, hash_key, key_id_of
from proxy.config import Budget, Limits, ProxyConfig, TeamPolicy, Timeouts
from proxy.ledger.store import SpendReader, TeamSpendReader
from proxy.ledger.writer import LedgerWriter
from proxy.listener import ProxySite, make_runner
from proxy.pricing import PriceBook
from proxy.reconcile.live import LiveBook
from proxy.records import Dispatched, FanOut, RecordSink, UsageRecord
from proxy.upstream import Transport
from proxy.usage import DEFAULT_TOOL_FIELDS
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY

TEAM_KEYS = {"alpha": "sk-proxy-test-alpha-0001", "beta": "sk-proxy-test-beta-0002"}
PEAK = datetime(2026, 11, 2, 1, 30, tzinfo=UTC)  # Monday 09:30 Beijing: deepseek-flash peak
OFF_PEAK = datetime(2026, 11, 1, 1, 30, tzinfo=UTC)  # Sunday 09:30 Beijing


class RecordingSink:
    """Collects records; tests wait on it with a deadline instead of sleeping."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.in_flight: list[UsageRecord] = []
        self._changed = asyncio.Event()

    def dispatched(self, call: Dispatched) -> None:
        self.in_flight.append(call.in_flight_record())

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[UsageRecord]:
        async with asyncio.timeout(timeout):
            while len(self.records) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.records


def make_config(upstream_url: str, book_files: tuple[Path, ...], **timeouts: float) -> ProxyConfig:
    keys = {
        hash_key(key): ClientKey(team, key_id_of(hash_key(key))) for team, key in TEAM_KEYS.items()
    }
    return ProxyConfig(
        path=Path("test-config.yaml"),
        host="127.0.0.1",
        port=0,
        upstream_base_url=upstream_url,
        upstream_key_env="UNUSED",
        price_book_files=book_files,
        price_at="request_start",
        keys=MappingProxyType(keys),
        teams=tuple(TEAM_KEYS),
        timeouts=replace(Timeouts(), **timeouts),
        limits=Limits(max_request_bytes=1 << 20),
        tool_fields=DEFAULT_TOOL_FIELDS,
        ledger_path=Path("unused.sqlite3"),
        flush_interval=0.1,
        billing_timezone=ZoneInfo("Asia/Shanghai"),
    )


@dataclass
class RunningProxy:
    url: str
    sink: RecordingSink
    config: ProxyConfig
    registry: CollectorRegistry
    app: web.Application


class StartProxy(Protocol):
    """The `start_proxy` fixture: `running_proxy` in front of the test's fake DeepSeek, with the
    options given (budgets, limits, a clock, timeouts ...), closed when the test ends."""

    async def __call__(self, **options: Any) -> RunningProxy: ...


@asynccontextmanager
async def running_proxy(
    upstream_url: str,
    book: PriceBook,
    *,
    clock: Callable[[], datetime] = lambda: PEAK,
    api_key: str = FAKE_UPSTREAM_KEY,
    sink: RecordSink | None = None,
    spend: SpendReader | None = None,
    team_spend: TeamSpendReader | None = None,
    budgets: tuple[Budget, ...] = (),
    limits: Limits | None = None,
    policies: Mapping[str, TeamPolicy] | None = None,
    ledger: LedgerWriter | None = None,
    transport: Transport | None = None,
    shared_url: str | None = None,
    owner: str | None = None,
    attribution: AttributionConfig = DEFAULT_ATTRIBUTION,
    tag_labels: Mapping[str, int] | None = None,
    budget_remaining_header: bool = False,
    balance: LiveBook | None = None,
    **timeouts: float,
) -> AsyncIterator[RunningProxy]:
    """The real app on a free loopback port. Records go to `proxy.sink` and to `sink`;
    `ledger` (a writer, usually `sink` too) gives the app its health and figures;
    `transport` replaces aiohttp's to DeepSeek (`tests.support.memory_transport`);
    `shared_url` puts the budget holds in that PostgreSQL ledger, marked with `owner`;
    `team_spend` reads one team's spend for the spend API; `budget_remaining_header` is
    ``headers.budget_remaining``; `balance` gives the app DeepSeek's balance in the ledger and
    its poller (`proxy.app.POLLER`), which polls only when the test asks."""
    config = make_config(upstream_url, tuple(Path(f) for f in book.files), **timeouts)
    config = replace(
        config,
        budgets=budgets,
        limits=limits or config.limits,
        policies=MappingProxyType(dict(policies or {})),
        attribution=attribution,
        tag_labels=MappingProxyType(dict(tag_labels or {})),
        budget_remaining_header=budget_remaining_header,
    )
    recording = RecordingSink()
    registry = CollectorRegistry()
    target: RecordSink = recording if sink is None else FanOut(recording, sink)
    app = create_app(
        config,
        book,
        api_key,
        target,
        clock=clock,
        registry=registry,
        spend=spend,
        team_spend=team_spend,
        ledger=ledger,
        ledger_status=ledger.status if ledger else None,
        transport=transport,
        shared_url=shared_url,
        owner=owner,
        balance=balance,
    )
    runner = make_runner(app, config)
    await runner.setup()
    await ProxySite(
        runner, "127.0.0.1", 0, reuse_port=False, keepalive_timeout=config.timeouts.client_header
    ).start()
    port = runner.addresses[0][1]
    try:
        yield RunningProxy(f"http://127.0.0.1:{port}", recording, config, registry, app)
    finally:
        await runner.cleanup()


async def raw_request(url: str, request: bytes, *, whole: bool = False) -> bytes:
    """Send `request` as raw bytes (what an HTTP library would refuse to send) to the server
    at `url`; return the first 64 KiB of the answer, or with `whole` all of it until the
    server closes the connection (as it does after a malformed request or ``Connection:
    close``)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    try:
        read = reader.read() if whole else reader.read(65536)
        return await asyncio.wait_for(read, timeout=10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
