"""The printed output: the machine line and one table, rows = measurements.

The table is a Markdown pipe table padded to line up, so the same text reads in a terminal and
pastes into ``bench/RESULTS.md`` unchanged.
"""

from __future__ import annotations

import math
import os
import platform
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

COLUMNS = ("measurement", "direct", "reference", "proxy", "ratio", "target", "pass", "tool")
NONE = "-"


@dataclass(frozen=True, slots=True)
class Row:
    measurement: str
    direct: str = NONE
    reference: str = NONE
    proxy: str = NONE
    ratio: str = NONE
    target: str = NONE
    verdict: str = NONE
    """``pass``, ``FAIL``, ``n/a`` (target not measurable in this run) or ``-`` (no target)."""
    tool: str = NONE

    def cells(self) -> tuple[str, ...]:
        return (
            self.measurement,
            self.direct,
            self.reference,
            self.proxy,
            self.ratio,
            self.target,
            self.verdict,
            self.tool,
        )


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def render(rows: list[Row]) -> str:
    table = [COLUMNS, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(COLUMNS), rule, *(line(row.cells()) for row in rows)])


def ms(seconds: float) -> str:
    return NONE if math.isnan(seconds) else f"{seconds * 1000:.3f} ms"


def added_ms(seconds: float) -> str:
    return NONE if math.isnan(seconds) else f"{seconds * 1000:+.3f} ms"


def rate(value: float, unit: str = "/s") -> str:
    return f"{value:,.0f}{unit}"


def mb(value: float) -> str:
    return f"{value:.1f} MB"


def ratio(numerator: float, denominator: float) -> tuple[str, float]:
    """Text and value of a ratio; NaN when the denominator is not positive."""
    if denominator <= 0 or math.isnan(numerator) or math.isnan(denominator):
        return NONE, math.nan
    value = numerator / denominator
    return f"{value:.2f}x", value


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan


def machine(wrk_version: str | None, placement: str) -> str:
    """One paragraph: when, where, and with which versions the figures were taken."""
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}; {os.cpu_count()} cores ({_cpu_model()}), "
        f"{_memory_gb():.1f} GB RAM, Linux {platform.release()}; "
        f"Python {platform.python_version()}, aiohttp {metadata.version('aiohttp')}, "
        f"SQLite {sqlite3.sqlite_version}, load: {wrk_version or 'wrk not installed'} + "
        f"built-in aiohttp generator; {placement}"
    )
