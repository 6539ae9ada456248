"""The proxy with its ledger on PostgreSQL against SQLite and the reference forwarder (issue 13).

``python -m bench.replicas [--quick]`` starts a real PostgreSQL (``tests.support.postgres``,
with PostgreSQL's own durable settings: fsync on), the bench upstream, the reference forwarder
and two proxies, one on a SQLite ledger and one on the PostgreSQL ledger, and measures in the
same run, one target at a time, in alternating rounds (`bench.measure`):

- throughput and latency of small calls at c=32 (wrk when installed): requests/s, p50, p99;
- latency at c=1, and what each server adds to calling the upstream directly;
- a hard-budget admission on PostgreSQL: the same proxy, a team with a hard budget (so every
  call takes a per-team advisory lock, reads the standings and inserts its hold in one
  transaction, and settles after) against a team without; the difference at c=1 is the
  admission's cost (p50, p99);
- ledger write throughput on PostgreSQL: final rows/s through `PostgresLedger.write` in
  batches of 100 (the writer's batch), and calls/s through the `LedgerWriter` thread.

Targets: with PostgreSQL the proxy keeps >= 0.5x the reference forwarder's throughput, and a
hard-budget admission adds <= 1 ms p50 on loopback. The PostgreSQL server is not pinned: it
runs where the OS puts it, as a database on the same host would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import wrk
from bench.ledger_rate import load_book, synthetic_calls
from bench.measure import FULL, QUICK, Bench, Latency, Saturation, Target
from bench.procs import ROOT, Placement, Processes, Service, free_port
from bench.services import MAX_INFLIGHT, UPSTREAM_KEY_ENV, start_reference, start_upstream
from proxy.auth import hash_key, new_key
from proxy.ledger.pg_store import PostgresLedger
from proxy.ledger.writer import LedgerWriter
from tests.support.ledger_backends import BEIJING
from tests.support.postgres import Postgres, running_postgres

BUDGETED = "budgeted"
"""The team with a hard budget (large enough never to refuse)."""


@dataclass(frozen=True, slots=True)
class Keys:
    free: str
    budgeted: str


def write_config(folder: Path, port: int, upstream: str, ledger: str, keys: Keys) -> Path:
    """A proxy config with two teams, one under a hard budget; `ledger` is the ledger's YAML
    flow mapping body (``path: ...`` or ``url: ...``)."""
    book = ROOT / "config" / "pricing"
    path = folder / "proxy.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"upstream: {{base_url: {json.dumps(upstream)}, api_key_env: {UPSTREAM_KEY_ENV}}}\n"
        f"pricing: {{book: [{json.dumps(str(book))}]}}\n"
        f"teams:\n  bench:\n    keys: ['sha256:{hash_key(keys.free)}']\n"
        f"  {BUDGETED}:\n    keys: ['sha256:{hash_key(keys.budgeted)}']\n"
        f"budgets:\n  {BUDGETED}:\n"
        "    - {period: month, amount: 1000000000, currency: CNY, hard: true}\n"
        f"ledger: {{{ledger}, flush_interval: 0.1}}\n"
        f"limits: {{max_inflight: {MAX_INFLIGHT}, max_inflight_per_team: {MAX_INFLIGHT}}}\n",
        encoding="utf-8",
    )
    return path


def start_proxy(
    processes: Processes, name: str, folder: Path, upstream: str, ledger: str, keys: Keys
) -> Service:
    folder.mkdir()
    port = free_port()
    config = write_config(folder, port, upstream, ledger, keys)
    return processes.start(
        name,
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--log-level", "WARNING"],
        f"http://127.0.0.1:{port}",
        under_test=True,
        env={UPSTREAM_KEY_ENV: "sk-bench-upstream-not-a-real-key"},
    )


def ledger_rates(url: str, calls: int) -> tuple[float, float]:
    """(final rows/s through `PostgresLedger.write` in batches of 100, calls/s through the
    `LedgerWriter`), each on a fresh database of the server at `url`."""
    synthetic = synthetic_calls(load_book(ROOT / "config" / "pricing"), calls)
    store = PostgresLedger(url, BEIJING)
    try:
        tick = time.perf_counter()
        for i in range(0, calls, 100):
            store.write([], synthetic.final[i : i + 100])
        rows = calls / (time.perf_counter() - tick)
    finally:
        store.close()
    again = synthetic_calls(load_book(ROOT / "config" / "pricing"), calls)
    writer = LedgerWriter(PostgresLedger(url, BEIJING))
    try:
        tick = time.perf_counter()
        for pending, final in zip(again.in_flight, again.final, strict=True):
            writer.dispatched(pending)
            writer.submit(final)
        flushed = writer.flush(300)
        through_writer = calls / (time.perf_counter() - tick) if flushed else 0.0
    finally:
        writer.close()
    return rows, through_writer


def headers(key: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


def line(name: str, figures: Latency, direct: Latency | None = None) -> str:
    added = ""
    if direct is not None:
        p50, p99 = (figures.p50 - direct.p50) * 1000, (figures.p99 - direct.p99) * 1000
        added = f" | {p50:+.3f} | {p99:+.3f}"
    return (
        f"| {name} | {figures.rps:,.0f} | {figures.p50 * 1000:.3f} | {figures.p99 * 1000:.3f}"
        f"{added} | {figures.errors} |"
    )


async def main(args: argparse.Namespace) -> int:
    profile = QUICK if args.quick else FULL
    placement = Placement.choose(pin=True)
    if placement is not None:
        os.sched_setaffinity(0, placement.others)
    wrk_binary = wrk.available()
    keys = Keys(new_key(), new_key())
    with (
        running_postgres(durable=True) as postgres,
        tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp,
        Processes(Path(tmp), placement) as processes,
    ):
        folder = Path(tmp)
        upstream = start_upstream(processes)
        upstream_url = upstream.url
        reference = start_reference(processes, upstream_url)
        ledger_url = postgres.new_database()
        sqlite = start_proxy(
            processes,
            "proxy-sqlite",
            folder / "sqlite",
            upstream_url,
            f"path: {json.dumps(str(folder / 'ledger.sqlite3'))}",
            keys,
        )
        pg = start_proxy(
            processes, "proxy-postgresql", folder / "pg", upstream_url, f"url: '{ledger_url}'", keys
        )
        for service in (upstream, reference, sqlite, pg):
            await processes.wait_ready(service)
        targets = [
            Target("direct", upstream.url + "/chat/completions", upstream),
            Target("reference", reference.url + "/chat/completions", reference),
            Target("proxy (SQLite)", sqlite.url + "/chat/completions", sqlite),
            Target("proxy (PostgreSQL)", pg.url + "/chat/completions", pg),
        ]
        bench = Bench(
            profile, headers(keys.free), [upstream], processes.services, wrk_binary, folder
        )
        budgeted = Bench(
            profile, headers(keys.budgeted), [upstream], processes.services, wrk_binary, folder
        )
        for target in targets:
            print(f"warming up {target.name}", file=sys.stderr)
            await bench.smoke(target)
            await bench.warm_up(target)
        for target in targets[2:]:
            await budgeted.warm_up(target)
        print("saturation c=32", file=sys.stderr)
        saturation = await bench.in_rounds(targets, lambda t: bench.saturation(t, 32))
        print("latency c=1", file=sys.stderr)
        latency = await bench.in_rounds(targets, lambda t: bench.latency(t, 1))
        print("hard-budget admission, c=1", file=sys.stderr)
        admission: dict[tuple[str, str], list[Latency]] = {}
        for index in range(profile.rounds * 2):
            combos = [
                (target, team, runner)
                for target in (targets[2], targets[3])
                for team, runner in (("no budget", bench), ("hard budget", budgeted))
            ]
            for target, team, runner in combos if index % 2 == 0 else reversed(combos):
                admission.setdefault((target.name, team), []).append(
                    await runner.latency(target, 1)
                )
        budget_rows = await asyncio.to_thread(
            postgres.psql, "SELECT count(*) FROM budget_holds", ledger_url.rsplit("/", 1)[1]
        )
        print("ledger write rates on PostgreSQL", file=sys.stderr)
        rates = await asyncio.to_thread(ledger_rates, postgres.new_database(), profile.ledger_calls)
    report(saturation, latency, admission, rates, postgres, wrk_binary, placement)
    print(f"\nholds left after the admission runs: {budget_rows} (each call settled)")
    return 0


def report(
    saturation: dict[str, list[Saturation]],
    latency: dict[str, list[Latency]],
    admission: dict[tuple[str, str], list[Latency]],
    rates: tuple[float, float],
    postgres: Postgres,
    wrk_binary: str | None,
    placement: Placement | None,
) -> None:
    print(
        f"machine: {os.cpu_count()} CPUs; load generator: {'wrk' if wrk_binary else 'builtin'}; "
        f"{placement.describe() if placement else 'no pinning'}; PostgreSQL from "
        f"{postgres.bindir} (fsync on), not pinned\n"
    )
    sat = {name: Saturation.median(r) for name, r in saturation.items()}
    print("Small calls at c=32 (median of rounds):\n")
    print("| target | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
    for name, run in sat.items():
        print(line(name, run.latency))
    ref = sat["reference"].latency.rps
    for name in ("proxy (SQLite)", "proxy (PostgreSQL)"):
        print(f"\n{name}: {sat[name].latency.rps / ref:.2f}x the reference's throughput", end="")
    print("\n\nLatency at c=1, and what each server adds to calling the upstream directly:\n")
    print(
        "| target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |\n"
        "|---|---|---|---|---|---|---|"
    )
    c1 = {name: Latency.median(r) for name, r in latency.items()}
    for name, figures in c1.items():
        print(line(name, figures, c1["direct"]))
    print(
        "\nHard-budget admission (same proxy, c=1, alternating rounds): holds in the process "
        "with SQLite, in PostgreSQL otherwise; 'added' is against the same proxy's team "
        "without a budget:\n"
    )
    print(
        "| proxy, team | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name in ("proxy (SQLite)", "proxy (PostgreSQL)"):
        without = Latency.median(admission[(name, "no budget")])
        with_budget = Latency.median(admission[(name, "hard budget")])
        print(line(f"{name}, no budget", without))
        print(line(f"{name}, hard budget", with_budget, without))
    print(
        f"\nLedger writes on PostgreSQL: {rates[0]:,.0f} final rows/s through "
        f"PostgresLedger.write (batches of 100); {rates[1]:,.0f} calls/s through the "
        "LedgerWriter (in-flight and final record per call)"
    )


def run() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replicas", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run, about a minute")
    return asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(run())
