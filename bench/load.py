"""The built-in async load generator (aiohttp client): closed-loop load and held-open streams.

Used for every row wrk cannot produce (time to first token, relay time of streams, 1,000 open
streams, the soak), and for the throughput and latency rows too when wrk is not installed. Each
request is timed with `time.perf_counter` from just before it is sent to the last byte read;
a stream's time to first token is the first read that carries a ``data:`` event. The generator
runs in the benchmark's own process, so its cost is the same whichever server it drives: the
rows compare servers under the same generator, never a generator against wrk.

Every loop is bounded twice, by a deadline and by a request count, so a wedged server cannot hold
the benchmark up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True, slots=True)
class Call:
    """One request the generator sends again and again."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    stream: bool


@dataclass(slots=True)
class Timings:
    """What a load run observed; latencies in seconds, in completion order."""

    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)
    """`time.perf_counter` at each completion, for per-window figures (the soak)."""
    errors: int = 0
    elapsed: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def session(connections: int) -> aiohttp.ClientSession:
    """A client session with exactly `connections` pooled keep-alive connections."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections),
        timeout=aiohttp.ClientTimeout(total=120, sock_connect=10),
        skip_auto_headers=("User-Agent",),
    )


async def _one(client: aiohttp.ClientSession, call: Call, timings: Timings) -> None:
    start = time.perf_counter()
    first: float | None = None
    try:
        async with client.post(call.url, data=call.body, headers=call.headers) as response:
            if call.stream:
                async for chunk in response.content.iter_any():
                    if first is None and b"data:" in chunk:
                        first = time.perf_counter() - start
            else:
                await response.read()
            ok = response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    end = time.perf_counter()
    if not ok or (call.stream and first is None):
        timings.errors += 1
        return
    timings.latencies.append(end - start)
    timings.finished_at.append(end)
    if first is not None:
        timings.first_tokens.append(first)


async def closed_loop(
    call: Call,
    concurrency: int,
    duration: float,
    max_requests: int,
    *,
    rate: float | None = None,
    client: aiohttp.ClientSession | None = None,
    timings: Timings | None = None,
) -> Timings:
    """`concurrency` workers send `call` until `duration` or `max_requests`.

    Back to back by default (saturation); with `rate`, the workers together start at most
    `rate` calls per second, each worker on its own schedule, so the offered load stays steady
    whatever the latency (a late worker starts its next call at once, without a catch-up burst).
    """
    timings = timings if timings is not None else Timings()
    owned = client is None
    client = client if client is not None else session(concurrency)
    started = time.perf_counter()
    deadline = started + duration
    sent = 0

    async def worker(index: int) -> None:
        nonlocal sent
        period = concurrency / rate if rate else 0.0
        due = started + period * index / concurrency
        while time.perf_counter() < deadline and sent < max_requests:
            if period:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                due = max(due + period, time.perf_counter())
            sent += 1
            await _one(client, call, timings)

    try:
        async with asyncio.timeout(duration + 60):  # a request already sent may finish late
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        timings.elapsed = time.perf_counter() - started
        if owned:
            await client.close()
    return timings


@dataclass(frozen=True, slots=True)
class HeldStreams:
    """Result of holding many streams open at once."""

    requested: int
    opened: int
    open_seconds: float
    """From the first request to the last stream's first event."""
    peak_rss_mb: float
    completed: int
    errors: int


async def hold_streams(
    call: Call, count: int, within: float, sample_rss_mb: Callable[[], float], samples: int = 5
) -> HeldStreams:
    """Open `count` slow streams at once; while all are open, sample the server's RSS.

    Each stream counts as open once its first event arrived (headers alone prove little: the
    server may not have opened its upstream side yet). RSS is sampled `samples` times, 0.2 s
    apart, and the peak kept; then the streams are read to their end. All of it takes at most
    `within` seconds.
    """
    opened = 0
    completed = 0
    errors = 0
    all_open = asyncio.Event()
    started = time.perf_counter()
    open_seconds = math.nan

    async def stream(client: aiohttp.ClientSession) -> None:
        nonlocal opened, completed, errors, open_seconds
        seen = False
        try:
            async with client.post(call.url, data=call.body, headers=call.headers) as response:
                async for chunk in response.content.iter_any():
                    if not seen and b"data:" in chunk:
                        seen = True
                        opened += 1
                        if opened == count:
                            open_seconds = time.perf_counter() - started
                            all_open.set()
                if response.status == 200:
                    completed += 1
        except (aiohttp.ClientError, TimeoutError):
            errors += 1

    peak = 0.0
    async with session(count) as client:
        tasks = [asyncio.create_task(stream(client), name=f"stream-{i}") for i in range(count)]
        try:
            async with asyncio.timeout(within):
                await all_open.wait()
                for _ in range(samples):
                    peak = max(peak, sample_rss_mb())
                    await asyncio.sleep(0.2)
                await asyncio.gather(*tasks)
        except TimeoutError:
            if not peak:  # not every stream opened in time: report what the server held
                peak = sample_rss_mb()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return HeldStreams(count, opened, open_seconds, peak, completed, errors)
