"""What ``headers.budget_remaining`` adds to a metered call, in instructions and in time.

With the option on, a call of a team with hard budgets gets one more header: its text made
from the standings the budget hold already read (`proxy.budgets.decide.remaining_text`: per
hard budget, a subtraction and the amount written exactly), one more entry in the response's
headers, and one more line for aiohttp to write. No read of its own. This measures exactly
that work: a loop that builds and writes a response's headers with the header, against the
same loop without it; the difference per iteration is the header's cost per call. With the
option off, what remains on the request path is two attribute tests per call.

    python -m bench.budget_header              # microseconds per call (best of 7 rounds)
    python -m bench.budget_header --callgrind  # instructions per call (Debian's valgrind)

Compare with a whole call: ``python -m bench.instructions`` counts about 1,100k instructions
per non-streaming call, 280-370 us of CPU (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import timeit
from datetime import date
from decimal import Decimal
from pathlib import Path

from aiohttp.http_writer import _serialize_headers  # what aiohttp writes a response with
from multidict import CIMultiDict

from proxy.budgets.decide import Standing, remaining_text
from proxy.config import Budget

HEADER = "x-proxy-budget-remaining"
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)
STANDINGS = {
    1: [
        Standing(
            Budget("search", "month", Decimal(500), "CNY", (), True),
            date(2026, 12, 1),
            Decimal("212.5371234"),
            Decimal("0.2412"),
        )
    ],
    2: [
        Standing(
            Budget("search", "month", Decimal(500), "CNY", (), True),
            date(2026, 12, 1),
            Decimal("212.5371234"),
            Decimal("0.2412"),
        ),
        Standing(
            Budget("search", "day", Decimal(40), "CNY", (), True),
            date(2026, 12, 3),
            Decimal("12.0461588"),
            Decimal("0.2412"),
        ),
    ],
}
"""One and two hard budgets, with amounts as the ledger holds them (seven decimals)."""
_RELAYED = {
    "Content-Type": "application/json",
    "x-ds-trace-id": "0f3c9a7e5b2d4c1a8e6f0b9d7c5a3e1f",
    "x-request-id": "chatcmpl-proxy-6a1f0c2e9b7d4f3a8c5e1d0b",
    "Content-Length": "612",
    "Date": "Thu, 03 Dec 2026 16:30:00 GMT",
    "Server": "Python/3.11 aiohttp/3.14.5",
}
"""A relayed answer's headers, as the proxy sends them."""


def respond(standings: list[Standing] | None) -> bytes:
    """One response's headers made and written; with the header if `standings` is given."""
    headers = CIMultiDict(_RELAYED)
    if standings is not None:
        headers[HEADER] = remaining_text(standings)
    return _serialize_headers("HTTP/1.1 200 OK", headers)


def loop(count: int, standings: list[Standing] | None) -> None:
    for _ in range(count):
        respond(standings)


def microseconds(budgets: int, count: int = 20_000, rounds: int = 7) -> float:
    """Best-of-`rounds` microseconds the header adds per call."""
    standings = STANDINGS[budgets]
    with_header = min(timeit.repeat(lambda: loop(count, standings), number=1, repeat=rounds))
    without = min(timeit.repeat(lambda: loop(count, None), number=1, repeat=rounds))
    return (with_header - without) / count * 1e6


def instructions(budgets: int, count: int) -> float:
    """Instructions the header adds per call: the loop under callgrind with and without it."""
    totals = []
    with tempfile.TemporaryDirectory(prefix="bench-budget-header-") as folder:
        for kind in ("with", "without"):
            out = Path(folder) / f"callgrind.{kind}.out"
            subprocess.run(  # noqa: S603 - argv is built here
                [
                    "/usr/bin/valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}",
                    sys.executable,
                    "-m",
                    "bench.budget_header",
                    "--inner",
                    kind,
                    "--budgets",
                    str(budgets),
                    "--count",
                    str(count),
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
            totals.append(int(_TOTALS.findall(out.read_text(errors="replace"))[-1]))
    return (totals[0] - totals[1]) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--budgets", type=int, choices=sorted(STANDINGS), default=None)
    parser.add_argument("--inner", choices=("with", "without"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:  # the loop that runs under callgrind
        loop(args.count, STANDINGS[args.budgets] if args.inner == "with" else None)
        return
    for budgets in [args.budgets] if args.budgets else sorted(STANDINGS):
        example = remaining_text(STANDINGS[budgets])
        if args.callgrind:
            figure = f"{instructions(budgets, args.count) / 1000:,.1f}k instructions"
        else:
            figure = f"{microseconds(budgets, args.count):.2f} us"
        print(f"{budgets} hard budget(s) ({HEADER}: {example}): {figure} per call")


if __name__ == "__main__":
    main()
