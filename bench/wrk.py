"""Saturation runs with wrk (the Debian ``wrk`` package), when it is installed.

wrk is a C load generator: at saturation it spends a fraction of the CPU a Python client would,
which matters when the generator shares two cores with the server under test. A generated Lua
script sets the POST body and headers, and its ``done`` hook prints one JSON line with the
counts and latency percentiles, so nothing depends on wrk's human-readable output.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_MARK = "WRK_JSON "
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,"socket_errors":%d,' ..
    '"status_errors":%d}\\n', MARK, summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout,
    e.status))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    p50: float
    p99: float
    """Latency percentiles in seconds."""
    errors: int
    cpu_seconds: float
    """CPU time wrk itself used."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def available() -> str | None:
    """Path of the wrk binary, or None."""
    return shutil.which("wrk")


async def version(binary: str) -> str:
    process = await asyncio.create_subprocess_exec(
        binary, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    return out.decode(errors="replace").split(" Copyright")[0].strip()


def _lua_string(text: str) -> str:
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def write_script(path: Path, body: bytes, headers: Mapping[str, str]) -> Path:
    """A wrk script that POSTs `body` with `headers` and reports as JSON."""
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {_lua_string(body.decode())}",
        f"MARK = {_lua_string(_MARK)}",
    ]
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n" + _DONE, encoding="utf-8")
    return path


async def run(binary: str, url: str, script: Path, connections: int, seconds: float) -> WrkResult:
    """One wrk run (one thread, `connections` keep-alive connections, `seconds` long)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = await asyncio.create_subprocess_exec(
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(seconds + 30):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                p50=data["p50_us"] / 1e6,
                p99=data["p99_us"] / 1e6,
                errors=data["socket_errors"] + data["status_errors"],
                cpu_seconds=cpu,
            )
    raise RuntimeError(
        f"wrk printed no summary (exit {process.returncode}): {err.decode(errors='replace')[-500:]}"
    )
