"""The measurements, each run the same way against every target (direct, reference, proxy).

A `Target` is a URL plus the process serving it (for RSS and CPU time: the upstream itself when
the target is direct). `Bench` runs one kind of load at a time, so the three servers never
compete with each other, only with the generator and the upstream they all share.

Rounds: the machine is shared (other people's test suites run on the same two cores), so each
measurement runs in several short rounds that alternate the targets' order (direct, reference,
proxy, then proxy, reference, direct, ...), and a row reports the median of its rounds. A burst
of outside load then lands on one round of one target rather than on a whole column.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp

from bench import load, wrk
from bench.ledger_rate import count_final_rows
from bench.procs import Service, cpu_seconds, machine_busy_seconds, rss_mb
from bench.upstream import ANTHROPIC_FRAME_EVENTS

T = TypeVar("T")

MODEL = "deepseek-flash"
_MESSAGES = [{"role": "user", "content": "Hello! Summarise the plot of Hamlet in one line."}]


def body(**extra: object) -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": _MESSAGES, **extra}, separators=(",", ":")
    ).encode()


SMALL = body()
STREAM_CHUNKS = 200
STREAM_EVENTS = STREAM_CHUNKS + 3
"""Role chunk, content chunks, finish chunk with usage, ``[DONE]``."""
# stream_options.include_usage is what the proxy sends upstream anyway: asking for it here keeps
# the bytes each server relays identical (DeepSeek then puts "usage": null on every chunk).
# STREAM comes in bursts of 10 chunks 1 ms apart (about 30 ms in all): sent in one burst, it
# would keep the upstream busy on the generator's core, and the generator would read the first
# chunk late (see `bench.upstream`); its timing is the time to first token. STREAM_BURST comes
# as fast as the upstream can write it: its total time is how fast a server relays 200 chunks.
STREAM = body(
    stream=True,
    max_tokens=STREAM_CHUNKS,
    stream_options={"include_usage": True},
    bench_chunk_delay_ms=1,
    bench_burst=10,
)
STREAM_BURST = body(stream=True, max_tokens=STREAM_CHUNKS, stream_options={"include_usage": True})
ANTHROPIC_STREAM = json.dumps(
    {
        "model": MODEL,
        "max_tokens": STREAM_CHUNKS,
        "messages": _MESSAGES,
        "stream": True,
        "bench_chunk_delay_ms": 1,
        "bench_burst": 10,
    },
    separators=(",", ":"),
).encode()
"""The Anthropic-format stream (DeepSeek's ``/anthropic/v1/messages``), paced as `STREAM`."""
ANTHROPIC_EVENTS = STREAM_CHUNKS + ANTHROPIC_FRAME_EVENTS
LARGE_BYTES = 1_000_000
LARGE = body(bench_response_bytes=LARGE_BYTES)


def held_body(chunks: int, delay_ms: int) -> bytes:
    return body(
        stream=True,
        max_tokens=chunks,
        stream_options={"include_usage": True},
        bench_chunk_delay_ms=delay_ms,
    )


@dataclass(frozen=True, slots=True)
class Profile:
    """How long each measurement runs (the full run and ``--quick``), in seconds per round."""

    rounds: int
    warmup: float
    saturation: float
    latency: float
    stream: float
    large: float
    held_streams: int
    held_chunks: int
    held_delay_ms: int
    ledger_calls: int
    soak: float
    soak_interval: float
    max_requests: int = 2_000_000
    """Cap on any one built-in loop, whatever its duration."""


FULL = Profile(
    rounds=3,
    warmup=2,
    saturation=4,
    latency=3,
    stream=3,
    large=2,
    held_streams=1000,
    held_chunks=24,
    held_delay_ms=500,
    ledger_calls=20_000,
    soak=20,
    soak_interval=10,
)
QUICK = Profile(
    rounds=1,
    warmup=1,
    saturation=2,
    latency=2,
    stream=1.5,
    large=1.5,
    held_streams=1000,
    held_chunks=4,
    held_delay_ms=500,
    ledger_calls=2_000,
    soak=4,
    soak_interval=2,
)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str
    """The completion URL (``.../chat/completions``)."""
    server: Service
    messages_url: str = ""
    """The Anthropic-format URL (``.../anthropic/v1/messages``)."""


@dataclass(frozen=True, slots=True)
class Latency:
    p50: float
    p99: float
    count: int
    errors: int
    rps: float
    tool: str

    @classmethod
    def of(cls, timings: load.Timings, values: list[float] | None = None) -> Latency:
        sample = timings.latencies if values is None else values
        return cls(
            load.percentile(sample, 50),
            load.percentile(sample, 99),
            timings.count,
            timings.errors,
            timings.rps,
            "builtin",
        )

    @classmethod
    def median(cls, rounds: Sequence[Latency]) -> Latency:
        """Median of each figure over rounds; counts and errors summed."""
        return cls(
            statistics.median(r.p50 for r in rounds),
            statistics.median(r.p99 for r in rounds),
            sum(r.count for r in rounds),
            sum(r.errors for r in rounds),
            statistics.median(r.rps for r in rounds),
            rounds[0].tool,
        )


@dataclass(frozen=True, slots=True)
class Saturation:
    latency: Latency
    seconds: float
    server_cpu: float
    upstream_cpu: float
    generator_cpu: float
    """CPU use as a fraction of one core, over the run."""

    @classmethod
    def median(cls, rounds: Sequence[Saturation]) -> Saturation:
        """Median latency figures; CPU use averaged over the rounds' total time."""
        seconds = sum(r.seconds for r in rounds)

        def share(cpu: list[float]) -> float:
            return sum(c * r.seconds for c, r in zip(cpu, rounds, strict=True)) / seconds

        return cls(
            Latency.median([r.latency for r in rounds]),
            seconds,
            share([r.server_cpu for r in rounds]),
            share([r.upstream_cpu for r in rounds]),
            share([r.generator_cpu for r in rounds]),
        )


@dataclass(frozen=True, slots=True)
class Streams:
    first_token: Latency
    total: Latency
    cpu_per_event: float
    """Server CPU seconds per SSE event relayed (stream set-up and metering included)."""


@dataclass(frozen=True, slots=True)
class LedgerCheck:
    requests: int
    rows: int
    lag_rows: int
    """Final rows missing from the ledger at the instant the load stopped."""
    drain_seconds: float


@dataclass(frozen=True, slots=True)
class SoakSample:
    at: float
    rss_mb: float
    p50: float
    rps: float
    server_cpu: float
    outside_cpu: float
    """CPU use, as a fraction of one core, of the server and of processes outside the
    benchmark, over the interval."""


class BenchError(RuntimeError):
    """A target answered wrongly: the figures would be meaningless."""


class Bench:
    """Runs measurements against targets; see the module docstring."""

    def __init__(
        self,
        profile: Profile,
        headers: Mapping[str, str],
        upstreams: Sequence[Service],
        services: Sequence[Service],
        wrk_binary: str | None,
        work_dir: Path,
    ) -> None:
        self.profile = profile
        self.headers = dict(headers)
        self.upstreams = list(upstreams)
        self.services = list(services)
        """Every process the run started (to tell their CPU use from everyone else's)."""
        self.wrk_binary = wrk_binary
        self.work_dir = work_dir
        self.ledger_checks: list[LedgerCheck] = []

    def call(self, target: Target, payload: bytes, stream: bool = False) -> load.Call:
        return load.Call(target.url, payload, self.headers, stream)

    async def in_rounds(
        self,
        targets: Sequence[Target],
        measure: Callable[[Target], Awaitable[T]],
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, list[T]]:
        """`measure` each target once per round, the order reversed every other round."""
        results: dict[str, list[T]] = {t.name: [] for t in targets}
        for index in range(self.profile.rounds):
            for target in targets if index % 2 == 0 else list(reversed(targets)):
                if progress is not None:
                    progress(f"round {index + 1}/{self.profile.rounds}: {target.name}")
                results[target.name].append(await measure(target))
        return results

    async def smoke(self, target: Target) -> None:
        """One call of each kind; fail loudly if an answer is not what the rows assume."""
        async with aiohttp.ClientSession() as client:
            async with client.post(target.url, data=SMALL, headers=self.headers) as response:
                answer = await response.read()
                if response.status != 200 or b'"prompt_cache_hit_tokens"' not in answer:
                    raise BenchError(
                        f"{target.name}: small call answered {response.status}: {answer[:300]!r}"
                    )
            for stream in (STREAM, STREAM_BURST):
                async with client.post(target.url, data=stream, headers=self.headers) as response:
                    answer = await response.read()
                    events = answer.count(b"data: ")
                    if (
                        response.status != 200
                        or not answer.endswith(b"data: [DONE]\n\n")
                        or events != STREAM_EVENTS
                    ):
                        raise BenchError(
                            f"{target.name}: stream answered {response.status} "
                            f"with {events} events: {answer[-300:]!r}"
                        )
            async with client.post(
                target.messages_url, data=ANTHROPIC_STREAM, headers=self.headers
            ) as response:
                answer = await response.read()
                events = answer.count(b"\nevent: ") + answer.startswith(b"event: ")
                if (
                    response.status != 200
                    or not answer.endswith(b'data: {"type":"message_stop"}\n\n')
                    or events != ANTHROPIC_EVENTS
                ):
                    raise BenchError(
                        f"{target.name}: Anthropic stream answered {response.status} "
                        f"with {events} events: {answer[-300:]!r}"
                    )

    # --- non-streaming load: wrk when installed, else the built-in generator ---------------

    async def _closed_loop(
        self, target: Target, payload: bytes, concurrency: int, seconds: float, stream: bool = False
    ) -> load.Timings:
        return await load.closed_loop(
            self.call(target, payload, stream), concurrency, seconds, self.profile.max_requests
        )

    def _script(self, target: Target) -> Path:
        return wrk.write_script(self.work_dir / f"wrk-{target.name}.lua", SMALL, self.headers)

    async def small_load(
        self, target: Target, concurrency: int, seconds: float
    ) -> tuple[Latency, float]:
        """Small non-streaming calls: latency figures, and the generator's CPU seconds."""
        if self.wrk_binary is not None:
            result = await wrk.run(
                self.wrk_binary, target.url, self._script(target), concurrency, seconds
            )
            return (
                Latency(result.p50, result.p99, result.requests, result.errors, result.rps, "wrk"),
                result.cpu_seconds,
            )
        own = time.process_time()
        timings = await self._closed_loop(target, SMALL, concurrency, seconds)
        return Latency.of(timings), time.process_time() - own

    async def warm_up(self, target: Target) -> None:
        await self.small_load(target, 32, self.profile.warmup)
        await self._closed_loop(target, STREAM, 4, self.profile.warmup / 2, stream=True)

    async def saturation(self, target: Target, concurrency: int) -> Saturation:
        """Requests/s at `concurrency` connections, with each process's CPU use."""
        upstream_pids = [u.pid for u in self.upstreams]
        server_before = cpu_seconds(target.server.pid)
        upstream_before = sum(cpu_seconds(p) for p in upstream_pids)
        started = time.perf_counter()
        result, generator = await self.small_load(target, concurrency, self.profile.saturation)
        wall = time.perf_counter() - started
        return Saturation(
            latency=result,
            seconds=wall,
            server_cpu=(cpu_seconds(target.server.pid) - server_before) / wall,
            upstream_cpu=(sum(cpu_seconds(p) for p in upstream_pids) - upstream_before) / wall,
            generator_cpu=generator / wall,
        )

    async def saturation_with_ledger(
        self, target: Target, concurrency: int, ledger: Path
    ) -> Saturation:
        """A proxy saturation run, then how far its ledger lagged and how long it took to drain.

        Every request wrk completed must end up as a final row; requests in flight when wrk
        stopped are recorded too (as client disconnects), so rows may exceed requests.
        """
        before = count_final_rows(ledger)
        result = await self.saturation(target, concurrency)
        stopped = time.perf_counter()
        expected = before + result.latency.count
        at_stop = count_final_rows(ledger)
        rows = at_stop
        drained = 0.0 if rows >= expected else math.nan
        deadline = stopped + 30
        while rows < expected and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)  # polling the ledger's row count, under a deadline
            rows = count_final_rows(ledger)
            if rows >= expected:
                drained = time.perf_counter() - stopped
        await asyncio.sleep(0.5)  # let the calls cut at wrk's end be recorded too
        rows = count_final_rows(ledger)
        self.ledger_checks.append(
            LedgerCheck(result.latency.count, rows - before, max(0, expected - at_stop), drained)
        )
        return result

    # --- the built-in generator only --------------------------------------------------------

    async def latency(self, target: Target, concurrency: int) -> Latency:
        return (await self.small_load(target, concurrency, self.profile.latency))[0]

    async def streams(self, target: Target) -> Streams:
        """200-chunk streams, one at a time: time to first token and the server's CPU time per
        event relayed (the per-chunk cost, whatever the machine's load) on paced streams, total
        relay time on streams sent in one burst."""
        cpu = cpu_seconds(target.server.pid)
        paced = await self._closed_loop(target, STREAM, 1, self.profile.stream, stream=True)
        cpu = cpu_seconds(target.server.pid) - cpu
        burst = await self._closed_loop(target, STREAM_BURST, 1, self.profile.stream, stream=True)
        return Streams(
            Latency.of(paced, paced.first_tokens),
            Latency.of(burst),
            cpu / max(paced.count * STREAM_EVENTS, 1),
        )

    async def anthropic_streams(self, target: Target) -> Streams:
        """`streams`' paced measurement in DeepSeek's Anthropic format: time to first token and
        server CPU per event relayed (named events, usage in two of them)."""
        call = load.Call(target.messages_url, ANTHROPIC_STREAM, self.headers, True)
        cpu = cpu_seconds(target.server.pid)
        paced = await load.closed_loop(call, 1, self.profile.stream, self.profile.max_requests)
        cpu = cpu_seconds(target.server.pid) - cpu
        return Streams(
            Latency.of(paced, paced.first_tokens),
            Latency.of(paced),
            cpu / max(paced.count * ANTHROPIC_EVENTS, 1),
        )

    async def large(self, target: Target) -> Latency:
        return Latency.of(await self._closed_loop(target, LARGE, 1, self.profile.large))

    async def parse_cost(self, target: Target, repeat: int = 15) -> float:
        """Median seconds `json.loads` takes on the 1 MB answer (the proxy parses it whole)."""
        async with (
            aiohttp.ClientSession() as client,
            client.post(target.url, data=LARGE, headers=self.headers) as response,
        ):
            answer = await response.read()
        runs = []
        for _ in range(repeat):
            tick = time.perf_counter()
            json.loads(answer)
            runs.append(time.perf_counter() - tick)
        return load.percentile(runs, 50)

    async def held_streams(self, target: Target) -> load.HeldStreams:
        profile = self.profile
        hold = profile.held_chunks * profile.held_delay_ms / 1000
        call = self.call(target, held_body(profile.held_chunks, profile.held_delay_ms), True)
        return await load.hold_streams(
            call,
            profile.held_streams,
            within=hold + 60,
            sample_rss_mb=lambda: rss_mb(target.server.pid),
        )

    async def soak(
        self, target: Target, seconds: float, interval: float, rate: float
    ) -> tuple[list[SoakSample], int]:
        """A steady load for `seconds`: small calls at `rate` per second (16 workers) and
        200-chunk streams at 4 per second (2 workers). Every `interval`: the server's RSS, the
        p50 of the small calls finished in that interval, the calls/s, the server's CPU use and
        how much CPU processes outside the benchmark took. Returns the samples and the number of
        failed calls."""
        small, streams = load.Timings(), load.Timings()
        samples: list[SoakSample] = []
        started = time.perf_counter()

        async def sampler() -> None:
            seen = 0
            server, others = cpu_seconds(target.server.pid), self._outside_cpu()
            for tick in range(1, math.floor(seconds / interval) + 1):
                await asyncio.sleep(max(0.0, started + tick * interval - time.perf_counter()))
                window = small.latencies[seen:]
                seen += len(window)
                server_now, others_now = cpu_seconds(target.server.pid), self._outside_cpu()
                samples.append(
                    SoakSample(
                        tick * interval,
                        rss_mb(target.server.pid),
                        load.percentile(window, 50),
                        len(window) / interval,
                        (server_now - server) / interval,
                        (others_now - others) / interval,
                    )
                )
                server, others = server_now, others_now

        await asyncio.gather(
            load.closed_loop(
                self.call(target, SMALL),
                16,
                seconds,
                self.profile.max_requests,
                rate=rate,
                timings=small,
            ),
            load.closed_loop(
                self.call(target, STREAM, True),
                2,
                seconds,
                self.profile.max_requests,
                rate=4,
                timings=streams,
            ),
            sampler(),
        )
        return samples, small.errors + streams.errors

    def _outside_cpu(self) -> float:
        """CPU seconds used so far by processes that are not the benchmark's."""
        ours = time.process_time() + sum(cpu_seconds(s.pid) for s in self.services)
        return machine_busy_seconds() - ours
