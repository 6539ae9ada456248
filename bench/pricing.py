"""Microseconds per priced call, on the shipped price book.

Every proxied request pays this once, through the app's `Pricer` (the engine with its memo of
lookups), so the target is <= 20 us on the project's 2-core machine.
Run: ``python -m bench.pricing`` (prints one line per case and the mix).
"""

from __future__ import annotations

import functools
import platform
import statistics
import sys
import timeit
from datetime import datetime
from pathlib import Path

from proxy.pricing import Pricer, load_price_book
from proxy.usage import TokenUsage

BOOK = Path(__file__).resolve().parent.parent / "config" / "pricing" / "deepseek.yaml"
TARGET_US = 20.0

CASES = [
    ("flat version", "deepseek-chat", "2025-10-15T12:00:00+00:00"),
    ("tiered, weekday peak", "deepseek-flash", "2026-11-02T01:30:00+00:00"),
    ("tiered, holiday", "deepseek-v4-pro", "2026-10-01T02:00:00+00:00"),
    ("alias chain -> tiered", "deepseek-v4-flash-vision-exp", "2026-11-27T07:00:00+00:00"),
    ("name pattern -> tiered", "claude-opus-4-1", "2026-11-27T07:00:00+00:00"),
    ("unknown model", "gpt-4o", "2026-11-27T07:00:00+00:00"),
]


def main() -> int:
    pricer = Pricer(load_price_book([BOOK]))
    usage = TokenUsage(
        cache_hit=48_213, cache_miss=1_877, output=912, reasoning=400, tool_calls={"search": 2}
    )
    print(
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{platform.processor() or 'cpu'}; target <= {TARGET_US} us per priced call"
    )
    worst = 0.0
    for label, model, instant in CASES:
        when = datetime.fromisoformat(instant)
        timer = timeit.Timer(functools.partial(pricer.price, model, usage, when))
        loops, _ = timer.autorange()
        runs = timer.repeat(repeat=7, number=loops)
        best = min(runs) / loops * 1e6
        median = statistics.median(runs) / loops * 1e6
        worst = max(worst, median)
        print(f"{label:<24} best {best:6.2f} us   median {median:6.2f} us")
    verdict = "ok" if worst <= TARGET_US else "OVER TARGET"
    print(f"worst median {worst:.2f} us: {verdict}")
    return 0 if worst <= TARGET_US else 1


if __name__ == "__main__":
    sys.exit(main())
