"""Profiling the proxy under load with py-spy (``pip install py-spy``), summarised as text.

py-spy samples the running process from outside, so the proxy runs unmodified (``--nonblocking``:
it is never paused). It writes a speedscope file (open it at https://www.speedscope.app) and the
benchmark prints where the samples fell: per thread, per module and per function by *self* time
(that code itself was running), and the proxy's own functions by *total* time (anywhere on the
stack).

Only the thread holding the GIL is sampled (``--gil``). Without it, py-spy counts a thread
waiting for the GIL as busy and charges the wait to whatever line it waits on (``uuid4``,
``transport.write``...), which hides the real cost: the event loop and the ledger writer thread
take turns on one GIL, so what matters is who holds it. Time in C code that released the GIL
(SQLite steps, socket calls) is therefore not in the figures.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections import Counter
from pathlib import Path

_STDLIB = re.compile(r"/lib/python3\.\d+/(?:site-packages/)?([A-Za-z_][\w]*)")
_PROXY = re.compile(r"/(proxy/[\w/]+)\.py$")
_ENTRY = frozenset({"proxy.__main__", "proxy.cli", "proxy.serve"})
"""Entry-point frames under every sample of the main thread: no information in their totals."""


def available() -> str | None:
    return shutil.which("py-spy")


async def record(binary: str, pid: int, seconds: int, out: Path) -> None:
    """Sample `pid`'s GIL holder for `seconds` at 250 Hz without pausing it."""
    process = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        "250",
        "--nonblocking",
        "--gil",
        "--format",
        "speedscope",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(seconds + 30):
            _, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"py-spy failed ({process.returncode}): {err.decode()[-300:]}")


def module_of(file: str) -> str:
    """``proxy.ledger.store``, ``aiohttp``, ``asyncio``, ``json``... for a frame's file."""
    proxy = _PROXY.search(file)
    if proxy:
        return proxy.group(1).replace("/", ".")
    stdlib = _STDLIB.search(file)
    return stdlib.group(1) if stdlib else file


def summarise(path: Path, top: int = 12) -> list[str]:
    """Per thread, per module, per function: shares of all sampled (busy) time."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    functions = [f"{f['name']} ({module_of(str(f.get('file', '?')))})" for f in frames]
    modules = [module_of(str(f.get("file", "?"))) for f in frames]
    threads: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for profile in data["profiles"]:
        thread = str(profile["name"]).split('"')[1] if '"' in profile["name"] else profile["name"]
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            threads[thread] += weight
            by_module[modules[stack[-1]]] += weight
            own[functions[stack[-1]]] += weight
            for name in {
                functions[i]
                for i in stack
                if modules[i].startswith("proxy.") and modules[i] not in _ENTRY
            }:
                total[name] += weight
    busy = sum(threads.values())
    if not busy:
        return ["    (no samples)"]

    def block(title: str, counts: Counter[str]) -> list[str]:
        return [
            f"    {title}:",
            *(f"      {n / busy:6.1%}  {name}" for name, n in counts.most_common(top)),
        ]

    lines = [
        "    seconds holding the GIL, per thread: "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in threads.most_common())
    ]
    lines += block("self time by module", by_module)
    lines += block("self time by function", own)
    lines += block("proxy functions by total time (on the stack)", total)
    return lines
