"""Which proxy code a run measures, and how to name it in the output.

By default the proxy of this checkout runs as it is on disk. Other people edit that tree while
a benchmark runs, so ``--proxy-rev REV`` exports ``proxy/`` and ``config/`` of a commit into
the run's temporary folder (``git archive``) and measures that: the figures then belong to one
commit, whatever happens to the working tree meanwhile.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path

from bench.procs import ROOT


async def _git(*args: str) -> tuple[int, bytes]:
    process = await asyncio.create_subprocess_exec(
        "git",
        "-C",
        str(ROOT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return (process.returncode or 0), (out if process.returncode == 0 else err)


def _extract(archive: bytes, into: Path) -> None:
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


async def export(rev: str, into: Path) -> tuple[Path, str]:
    """Extract `rev`'s ``proxy`` and ``config`` into `into`; return it and ``<rev> = <sha>``."""
    code, sha = await _git("rev-parse", "--short", f"{rev}^{{commit}}")
    if code != 0:
        raise ValueError(f"not a commit: {rev}: {sha.decode(errors='replace').strip()}")
    code, archive = await _git("archive", "--format=tar", sha.decode().strip(), "proxy", "config")
    if code != 0:
        raise ValueError(f"git archive {rev} failed: {archive.decode(errors='replace')}")
    _extract(archive, into)
    commit = sha.decode().strip()
    named = commit if rev.startswith(commit) else f"{rev} = {commit}"
    return into, f"{named} (exported with git archive)"


async def describe(root: Path) -> str:
    """``git describe --always --dirty`` of a checkout, or its path when it is not one."""
    process = await asyncio.create_subprocess_exec(
        "git",
        "-C",
        str(root),
        "describe",
        "--always",
        "--dirty",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    return f"{out.decode().strip()} at {root}" if process.returncode == 0 else str(root)
