"""How fast the ledger can take records, measured in-process, and what the proxy's ledger holds.

At saturation every proxied call produces two ledger writes (its ``in_flight`` row at dispatch
and its final row), so the ledger keeps up only if its rows/s exceed the proxy's requests/s.
Two rates are measured on synthetic but fully priced records (`proxy.metering.build_record` on
the shipped price book), each in a fresh SQLite file:

- `store_rate`: `SQLiteLedger.write` called directly with batches of final records, the
  storage ceiling;
- `writer_rate`: through `LedgerWriter`, as the proxy uses it (`dispatched` then `submit` for
  every call, then `flush`), which adds the queue and the writer thread.

`count_final_rows` reads the running proxy's ledger, to compare with the requests sent.

``python -m bench.ledger_rate --calls N --book DIR`` prints the rates as JSON: the benchmark
runs it as a child with the measured checkout first on the path, so the ledger code timed is
the proxy's being served, not necessarily the one next to this file.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4
from zoneinfo import ZoneInfo

from proxy.attribution import NO_TAGS
from proxy.config import Limits
from proxy.ledger.store import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.metering import CallMeter, build_record
from proxy.pricing import PriceBook, Pricer, load_price_book
from proxy.records import UsageRecord
from proxy.usage import DEFAULT_TOOL_FIELDS

_TZ = ZoneInfo("Asia/Shanghai")

LIMITS = Limits()


def load_book(directory: Path) -> PriceBook:
    return load_price_book(sorted(directory.glob("*.yaml")))


@dataclass(frozen=True, slots=True)
class Synthetic:
    """Records of `count` calls, and what building and pricing each one cost."""

    in_flight: list[UsageRecord]
    final: list[UsageRecord]
    build_seconds_per_call: float


def synthetic_calls(book: PriceBook, count: int) -> Synthetic:
    """Calls shaped like the benchmark's (deepseek-flash, reported usage, complete)."""
    start = datetime.now(UTC)
    pricer = Pricer(book)
    in_flight: list[UsageRecord] = []
    final: list[UsageRecord] = []
    elapsed = 0.0
    for i in range(count):
        at = start + timedelta(microseconds=i)
        tick = time.perf_counter()
        meter = CallMeter(
            request_id=uuid4().hex,
            team="bench",
            key_id="k_00000000",
            endpoint="chat",
            stream=False,
            model_requested="deepseek-flash",
            tags=NO_TAGS,
            end_user=None,
            payload={},
            started_at=at,
            prompt_bound=LIMITS.max_context_tokens,
            output_bound=LIMITS.max_output_tokens,
            first_byte_at=at,
            model_served="deepseek-flash",
            upstream_status=200,
            trace_id="bench-trace",
        )
        meter.take_usage(
            {
                "prompt_tokens": 100,
                "completion_tokens": 2,
                "prompt_cache_hit_tokens": 64,
                "prompt_cache_miss_tokens": 36,
            },
            DEFAULT_TOOL_FIELDS,
        )
        final.append(build_record(meter, at, pricer, "request_start", LIMITS))
        elapsed += time.perf_counter() - tick
        in_flight.append(UsageRecord.in_flight(meter, meter.started_at, book.digest))
    return Synthetic(in_flight, final, elapsed / max(count, 1))


def store_rate(calls: Synthetic, batch: int) -> float:
    """Final rows/s through `SQLiteLedger.write`, `batch` records per transaction."""
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        store = SQLiteLedger(Path(tmp) / "ledger.sqlite3", _TZ)
        try:
            tick = time.perf_counter()
            for i in range(0, len(calls.final), batch):
                store.write([], calls.final[i : i + batch])
            return len(calls.final) / (time.perf_counter() - tick)
        finally:
            store.close()


def writer_rate(calls: Synthetic, timeout: float) -> float:
    """Calls/s through `LedgerWriter`, each call queued as the proxy does (two records)."""
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        writer = LedgerWriter(SQLiteLedger(Path(tmp) / "ledger.sqlite3", _TZ))
        try:
            tick = time.perf_counter()
            for pending, final in zip(calls.in_flight, calls.final, strict=True):
                writer.dispatched(pending)
                writer.submit(final)
            if not writer.flush(timeout):
                return 0.0
            return len(calls.final) / (time.perf_counter() - tick)
        finally:
            writer.close()


def count_final_rows(path: Path) -> int:
    """Final rows in a ledger another process is writing (WAL: readers never block it)."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM usage WHERE state = 'final'").fetchone()[0])
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="ledger write rates, as JSON")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--book", type=Path, required=True, help="price-book folder")
    args = parser.parse_args()
    calls = synthetic_calls(load_book(args.book), args.calls)
    print(
        json.dumps(
            {
                "build_seconds_per_call": calls.build_seconds_per_call,
                "store_rate": store_rate(calls, batch=200),
                "writer_rate": writer_rate(calls, timeout=120),
            }
        )
    )


if __name__ == "__main__":
    main()
