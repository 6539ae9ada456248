"""Instructions per proxied call, counted by callgrind: a figure that does not drift.

Wall-clock CPU on a shared VM moves 5-10% from minute to minute, more than most single
changes to the request path. Instructions executed do not: the proxy is run under
``valgrind --tool=callgrind`` twice, serving `--warmup` calls and then `--warmup + --calls`
calls at the same concurrency, and the difference of the two totals divided by `--calls` is
what one call costs (start-up, warm-up and shutdown cancel out). Deterministic to about 1%.

    python -m bench.instructions                     # non-streaming calls, this checkout
    python -m bench.instructions --stream            # streaming calls
    python -m bench.instructions --proxy-root ../old # another checkout of the proxy
    python -m bench.instructions --tags              # every call with two attribution tags

Needs Debian's ``valgrind``. Takes a few minutes (Python under callgrind is about 50x slower).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

from bench.load import Call, closed_loop
from bench.procs import ROOT, Processes, Service
from bench.services import BENCH_TAGS, start_proxied

_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


async def _count(
    proxy_root: Path, calls: int, concurrency: int, stream: bool, directory: Path, tags: bool
) -> int:
    """Instructions the proxy executes serving `calls` calls, start-up to exit."""
    out = directory / f"callgrind.{calls}.out"
    with Processes(directory, None) as processes:
        started = await start_proxied(
            processes,
            directory,
            proxy_root,
            within=300,
            prefix=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"],
        )
        proxy, key = started.proxy, started.client_key
        body = json.dumps(
            {
                "model": "deepseek-flash",
                "stream": stream,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": "hello " * 20}],
            }
        ).encode()
        call = Call(
            proxy.url + "/v1/chat/completions",
            body,
            {
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                **(BENCH_TAGS if tags else {}),
            },
            stream,
        )
        timings = await closed_loop(call, concurrency, 3600, calls)
        if timings.errors or timings.count != calls:
            raise RuntimeError(f"{timings.errors} errors, {timings.count} of {calls} calls")
        await _stop(proxy)
    return int(_TOTALS.findall(out.read_text(errors="replace"))[-1])


async def _stop(proxy: Service) -> None:
    """SIGTERM and wait, so callgrind writes its totals (a SIGKILL would lose them)."""
    proxy.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(proxy.process.wait, 300)


async def measure(
    proxy_root: Path, warmup: int, calls: int, concurrency: int, stream: bool, tags: bool
) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as folder:
        base = Path(folder)
        (base / "a").mkdir()
        (base / "b").mkdir()
        short = await _count(proxy_root, warmup, concurrency, stream, base / "a", tags)
        long = await _count(proxy_root, warmup + calls, concurrency, stream, base / "b", tags)
    return (long - short) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--proxy-root",
        type=Path,
        default=ROOT,
        help="checkout whose proxy is measured (default: this one)",
    )
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stream", action="store_true", help="streaming calls")
    parser.add_argument(
        "--tags", action="store_true", help="every call carries x-proxy-tags (two tags)"
    )
    args = parser.parse_args()
    if not os.access("/usr/bin/valgrind", os.X_OK):
        sys.exit("needs valgrind (Debian: apt-get install valgrind)")
    per_call = asyncio.run(
        measure(
            args.proxy_root.resolve(),
            args.warmup,
            args.calls,
            args.concurrency,
            args.stream,
            args.tags,
        )
    )
    kind = ("streaming" if args.stream else "non-streaming") + (" tagged" if args.tags else "")
    print(
        f"{args.proxy_root.resolve()}: {per_call / 1000:,.0f}k instructions per {kind} call "
        f"(c={args.concurrency}, {args.calls} calls after {args.warmup})"
    )


if __name__ == "__main__":
    main()
