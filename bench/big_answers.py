"""Peak memory of the proxy relaying huge JSON answers: ``python -m bench.big_answers``.

A broken or hostile upstream can answer 200 with a body of any size. The proxy relays such a
body as it arrives and keeps at most 4 MiB of it for metering (then only its two ends,
`proxy.answer`), so its memory should not grow with the answer. This starts the bench upstream
and the proxy, relays `--count` answers of `--megabytes` MB at once, and prints the proxy's
peak resident set (``VmHWM``) before and after, and whether each answer's usage was still
metered. The first version kept every answer whole: five 100 MB answers took it to 836 MB.

    python -m bench.big_answers                       # this checkout
    python -m bench.big_answers --proxy-root ../old   # another checkout, same harness
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import tempfile
from pathlib import Path

import aiohttp

from bench.procs import ROOT, Processes
from bench.services import start_proxied


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(proxy_root: Path, count: int, megabytes: int) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-big-") as folder,
        Processes(Path(folder), None) as processes,
    ):
        started = await start_proxied(processes, Path(folder), proxy_root)
        proxy, key, ledger = started.proxy, started.client_key, started.ledger
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        url = proxy.url + "/v1/chat/completions"

        async def one(client: aiohttp.ClientSession, size: int) -> int:
            body = json.dumps(
                {
                    "model": "deepseek-flash",
                    "bench_response_bytes": size,
                    "messages": [{"role": "user", "content": "hi"}],
                }
            )
            async with client.post(url, data=body, headers=headers) as response:
                received = 0
                async for chunk in response.content.iter_any():
                    received += len(chunk)
                return received

        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as client:
            await one(client, 1000)  # warm-up: everything imported and allocated once
            before = peak_rss_mb(proxy.pid)
            sizes = await asyncio.gather(*(one(client, megabytes << 20) for _ in range(count)))
            after = peak_rss_mb(proxy.pid)
        proxy.process.terminate()
        await asyncio.to_thread(proxy.process.wait, 60)
        with contextlib.closing(sqlite3.connect(ledger)) as conn:
            metered = conn.execute(
                "SELECT count(*) FROM usage WHERE usage_source = 'reported' AND state = 'final'"
            ).fetchone()[0]
    print(
        f"{proxy_root}: relayed {count} x {min(sizes) / 2**20:.0f} MiB answers at once; "
        f"proxy peak RSS {before:.0f} MB before, {after:.0f} MB after "
        f"(+{after - before:.0f} MB); {metered - 1} of {count} metered from DeepSeek's usage"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy-root", type=Path, default=ROOT)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument(
        "--megabytes",
        type=int,
        default=64,
        help="size of each answer (the bench upstream's limit is 64)",
    )
    args = parser.parse_args()
    asyncio.run(run(args.proxy_root.resolve(), args.count, args.megabytes))


if __name__ == "__main__":
    main()
