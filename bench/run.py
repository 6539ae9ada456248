"""The benchmark, in one command: ``python -m bench.run [--quick] [--soak SECONDS]``.

Starts a fake DeepSeek (`bench.upstream`), the reference forwarder (`bench.reference`) and the
proxy (``python -m proxy serve``, full metering) on free 127.0.0.1 ports, drives the same load
at each of them and at the upstream directly, then prints the machine and one table. Every
process it started is stopped on the way out, whether the run ended, failed or was interrupted
(Ctrl-C or SIGTERM). Progress goes to stderr, the results to stdout. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import measure, pyspy, rows, services, source, wrk
from bench.load import Call, closed_loop
from bench.measure import FULL, QUICK, Bench, BenchError, Latency, Profile, Saturation, Target
from bench.procs import (
    ROOT,
    Placement,
    Processes,
    StartError,
    machine_busy_seconds,
    own_cpu_seconds,
    rss_mb,
)
from bench.report import machine, render

MESSAGES_PATH = "/anthropic/v1/messages"
"""DeepSeek's Anthropic-format route, the same path on the upstream, reference and proxy."""
SOAK_LOAD = 0.5
"""The soak offers half the proxy's saturation rate: steady, with headroom, so its latency
reflects the proxy's own state rather than queueing behind a saturated core."""


class Progress:
    """Timestamped progress lines on stderr, so stdout holds only the results."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {message}", file=sys.stderr, flush=True)

    def prefixed(self, prefix: str) -> Callable[[str], None]:
        return lambda message: self(f"{prefix}, {message}")


async def ledger_rates(results: rows.Results, proxy_root: Path, calls: int) -> None:
    """`bench.ledger_rate` in a child process that imports the measured checkout's proxy."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.ledger_rate",
        "--calls",
        str(calls),
        "--book",
        str(proxy_root / "config" / "pricing"),
        cwd=proxy_root,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(300):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise BenchError(f"ledger rate measurement failed: {err.decode()[-500:]}")
    figures = json.loads(out)
    results.build_seconds_per_call = figures["build_seconds_per_call"]
    results.store_rate = figures["store_rate"]
    results.writer_rate = figures["writer_rate"]


async def measure_all(
    bench: Bench, targets: list[Target], ledger: Path, proxy_root: Path, soak: float, say: Progress
) -> rows.Results:
    """Every measurement, one target at a time, in the table's order."""
    profile: Profile = bench.profile
    results = rows.Results()
    by_name = {t.name: t for t in targets}
    for target in targets:
        say(f"checking answers and warming up: {target.name}")
        await bench.smoke(target)
        await bench.warm_up(target)
    for concurrency in (32, 256):

        async def saturate(target: Target, concurrency: int = concurrency) -> Saturation:
            if target.name == "proxy":
                return await bench.saturation_with_ledger(target, concurrency, ledger)
            return await bench.saturation(target, concurrency)

        runs = await bench.in_rounds(targets, saturate, say.prefixed(f"saturation c={concurrency}"))
        for name, rounds in runs.items():
            results.saturation[(name, concurrency)] = Saturation.median(rounds)
    latency = await bench.in_rounds(
        targets, lambda t: bench.latency(t, 1), say.prefixed("latency c=1")
    )
    results.latency_c1 = {name: Latency.median(r) for name, r in latency.items()}
    streams = await bench.in_rounds(
        targets, bench.streams, say.prefixed(f"streams of {measure.STREAM_CHUNKS} chunks")
    )
    results.ttft = {name: Latency.median([s.first_token for s in r]) for name, r in streams.items()}
    results.relay = {name: Latency.median([s.total for s in r]) for name, r in streams.items()}
    results.cpu_per_event = {
        name: statistics.median(s.cpu_per_event for s in r) for name, r in streams.items()
    }
    anthropic = await bench.in_rounds(
        targets,
        bench.anthropic_streams,
        say.prefixed(f"Anthropic-format streams of {measure.STREAM_CHUNKS} deltas"),
    )
    results.anthropic_ttft = {
        name: Latency.median([s.first_token for s in r]) for name, r in anthropic.items()
    }
    results.anthropic_cpu_per_event = {
        name: statistics.median(s.cpu_per_event for s in r) for name, r in anthropic.items()
    }
    large = await bench.in_rounds(targets, bench.large, say.prefixed("1 MB responses"))
    results.large = {name: Latency.median(r) for name, r in large.items()}
    results.parse_seconds = await bench.parse_cost(by_name["direct"])
    for name in ("reference", "proxy"):
        target = by_name[name]
        results.idle_rss[name] = rss_mb(target.server.pid)
        say(f"{profile.held_streams:,} open streams: {name}")
        results.held[name] = await bench.held_streams(target)
    results.ledger_checks = bench.ledger_checks
    say(f"ledger write rates, in a child process ({profile.ledger_calls:,} calls)")
    await ledger_rates(results, proxy_root, profile.ledger_calls)
    if soak > 0:
        interval = min(profile.soak_interval, soak / 2)
        rate = SOAK_LOAD * results.saturation[("proxy", 32)].latency.rps
        say(
            f"soak: {soak:.0f} s on the proxy at {rate:.0f} small calls/s + 4 streams/s, "
            f"sampling every {interval:.0f} s"
        )
        results.soak, results.soak_errors = await bench.soak(by_name["proxy"], soak, interval, rate)
        results.soak_seconds = soak
    return results


async def profile_proxy(
    bench: Bench, proxy: Target, seconds: int, out: Path, say: Progress
) -> list[str]:
    """py-spy on the proxy, once under small calls (c=32) and once under 200-chunk streams."""
    binary = pyspy.available()
    if binary is None:
        return ["  py-spy not installed (pip install py-spy): no profile"]
    lines = []
    phases = (
        ("small calls, c=32", bench.small_load(proxy, 32, seconds + 1)),
        (
            "200-chunk streams, c=8",
            closed_loop(
                Call(proxy.url, measure.STREAM, bench.headers, True),
                8,
                seconds + 1,
                bench.profile.max_requests,
            ),
        ),
    )
    for index, (name, load) in enumerate(phases):
        path = out.with_name(f"{out.stem}-{index + 1}{out.suffix}")
        say(f"profiling the proxy for {seconds} s with py-spy ({name}) -> {path}")
        await asyncio.gather(pyspy.record(binary, proxy.server.pid, seconds, path), load)
        lines += [f"  {name} (speedscope file: {path}):", *pyspy.summarise(path)]
    return lines


async def main(args: argparse.Namespace) -> int:
    say = Progress()
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    profile = QUICK if args.quick else FULL
    soak = profile.soak if args.soak is None else args.soak
    placement = Placement.choose(pin=not args.no_pin)
    if placement is not None:
        os.sched_setaffinity(0, placement.others)  # this process is the built-in generator
    wrk_binary = wrk.available() if args.load == "auto" else None
    wrk_version = await wrk.version(wrk_binary) if wrk_binary else None
    load_before = os.getloadavg()[0]
    busy, own, wall = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bench-run-") as tmp,
        Processes(Path(tmp), placement) as processes,
    ):
        if args.proxy_rev:
            proxy_root, version = await source.export(args.proxy_rev, Path(tmp) / "proxy-src")
        else:
            proxy_root = args.proxy_root.resolve()
            version = await source.describe(proxy_root)
        say(f"starting upstream, reference forwarder and proxy ({version})")
        started = await services.start(processes, Path(tmp), args.upstream_workers, proxy_root)
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {started.client_key}",
            **services.BENCH_TAGS,
        }
        upstream = started.upstreams[0]
        targets = [
            Target(name, service.url + "/chat/completions", service, service.url + MESSAGES_PATH)
            for name, service in (
                ("direct", upstream),
                ("reference", started.reference),
                ("proxy", started.proxy),
            )
        ]
        bench = Bench(
            profile, headers, started.upstreams, processes.services, wrk_binary, Path(tmp)
        )
        try:
            results = await measure_all(bench, targets, started.ledger, proxy_root, soak, say)
            profile_lines = (
                await profile_proxy(bench, targets[2], args.profile, args.profile_out, say)
                if args.profile
                else []
            )
        except (BenchError, StartError):
            for service in processes.services:
                print(f"--- {service.name} log:\n{service.log_tail()}", file=sys.stderr)
            raise
        say("stopping")
    wall = time.monotonic() - wall
    foreign = (machine_busy_seconds() - busy) - (own_cpu_seconds() - own)
    command = " ".join(["python -m bench.run", *sys.argv[1:]])
    print(f"machine: {machine(wrk_version, placement.describe() if placement else 'no pinning')}")
    print(f"command: {command}; proxy: {version}; upstream processes: {args.upstream_workers}\n")
    print(render(rows.build(results)))
    print("\nCPU use during the saturation runs (100% = one core):")
    print("\n".join(rows.cpu_lines(results)))
    if results.soak:
        print("\nSoak samples (proxy):")
        print("\n".join(rows.soak_lines(results)))
    print(
        f"\nOther processes on the machine (not the benchmark's) used {foreign:.0f} CPU-seconds "
        f"in the run's {wall:.0f} s ({foreign / wall:.0%} of one core on average); load "
        f"average at start {load_before:.2f}."
    )
    if profile_lines:
        print("\nproxy profile (py-spy):")
        print("\n".join(profile_lines))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument(
        "--soak",
        type=float,
        default=None,
        metavar="SECONDS",
        help="soak length (default 20 s, --quick 4 s; the target wants 300)",
    )
    parser.add_argument(
        "--load",
        choices=("auto", "builtin"),
        default="auto",
        help="auto: wrk for the non-streaming rows when installed",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the OS place processes instead of pinning the server",
    )
    parser.add_argument(
        "--upstream-workers",
        type=int,
        default=1,
        help="fake upstream processes sharing the port (SO_REUSEPORT)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--proxy-root",
        type=Path,
        default=ROOT,
        help="checkout whose proxy is measured (default: this one)",
    )
    which.add_argument(
        "--proxy-rev",
        metavar="REV",
        help="measure the proxy of this commit (git archive), e.g. HEAD",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="after the table's runs, profile the proxy with py-spy",
    )
    parser.add_argument(
        "--profile-out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench-proxy-profile.json",
        help="where py-spy's speedscope files go (-1, -2 added to the name)",
    )
    return parser.parse_args(argv)


def run() -> int:
    args = parse_args()
    try:
        return asyncio.run(main(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    except (BenchError, StartError, ValueError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
