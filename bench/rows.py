"""From measured figures to table rows: the issue's targets, stated once, and checked here.

Targets (ratios from the same run):

- throughput >= 0.6x the reference forwarder's, at each saturation concurrency;
- added p50 latency at concurrency 1 <= 1.5x the reference's added latency;
- streaming time to first token adds <= 1 ms at p50 (chat, and DeepSeek's Anthropic format);
- RSS with 1,000 concurrent open streams <= 300 MB;
- RSS and latency flat over a 5-minute soak (here: the last sample within +10% RSS and +25%
  p50 of the first; a soak shorter than 300 s is reported but not judged);
- the ledger keeps up: its write rate exceeds the proxy's saturation rate, and after a
  saturation run every request is in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.load import HeldStreams
from bench.measure import Latency, LedgerCheck, Saturation, SoakSample
from bench.report import NONE, Row, added_ms, mb, ms, rate, ratio, verdict

THROUGHPUT_RATIO = 0.6
ADDED_LATENCY_RATIO = 1.5
TTFT_ADDED = 0.001
RSS_LIMIT_MB = 300.0
SOAK_SECONDS = 300.0
SOAK_RSS_DRIFT = 0.10
SOAK_P50_DRIFT = 0.25


@dataclass
class Results:
    """Everything one run measured, keyed by target name (direct, reference, proxy)."""

    saturation: dict[tuple[str, int], Saturation] = field(default_factory=dict)
    latency_c1: dict[str, Latency] = field(default_factory=dict)
    ttft: dict[str, Latency] = field(default_factory=dict)
    relay: dict[str, Latency] = field(default_factory=dict)
    cpu_per_event: dict[str, float] = field(default_factory=dict)
    anthropic_ttft: dict[str, Latency] = field(default_factory=dict)
    anthropic_cpu_per_event: dict[str, float] = field(default_factory=dict)
    large: dict[str, Latency] = field(default_factory=dict)
    parse_seconds: float = math.nan
    idle_rss: dict[str, float] = field(default_factory=dict)
    held: dict[str, HeldStreams] = field(default_factory=dict)
    ledger_checks: list[LedgerCheck] = field(default_factory=list)
    store_rate: float = math.nan
    writer_rate: float = math.nan
    build_seconds_per_call: float = math.nan
    soak: list[SoakSample] = field(default_factory=list)
    soak_errors: int = 0
    soak_seconds: float = 0.0


def _throughput(results: Results, concurrency: int) -> Row:
    runs = {t: results.saturation[(t, concurrency)] for t in ("direct", "reference", "proxy")}
    text, value = ratio(runs["proxy"].latency.rps, runs["reference"].latency.rps)
    errors = sum(r.latency.errors for r in runs.values())
    return Row(
        f"throughput, small JSON, c={concurrency} (req/s)",
        rate(runs["direct"].latency.rps),
        rate(runs["reference"].latency.rps),
        rate(runs["proxy"].latency.rps),
        ratio=text,
        target=f">= {THROUGHPUT_RATIO}x reference",
        verdict=verdict(value >= THROUGHPUT_RATIO and errors == 0),
        tool=runs["proxy"].latency.tool,
    )


def _cpu_per_call(results: Results, concurrency: int) -> Row:
    """Server CPU per call: what throughput would be on a core of its own, and little moved by
    other processes stealing time (they lower throughput, not the CPU each call costs)."""
    cost = {}
    for t in ("direct", "reference", "proxy"):
        run = results.saturation[(t, concurrency)]
        cost[t] = run.server_cpu * run.seconds / max(run.latency.count, 1)
    text = {t: f"{c * 1e6:.0f} us" for t, c in cost.items()}
    return Row(
        f"server CPU per small call, c={concurrency}",
        text["direct"],
        text["reference"],
        text["proxy"],
        ratio(cost["proxy"], cost["reference"])[0],
        tool="/proc stat",
    )


def _added(
    name: str,
    figures: dict[str, float],
    tool: str,
    *,
    limit_ratio: float | None = None,
    limit_added: float | None = None,
) -> Row:
    """A latency row: direct as measured, the servers as time added over direct."""
    base = figures["direct"]
    ref, proxy = figures["reference"] - base, figures["proxy"] - base
    text, value = ratio(proxy, ref)
    target, ok = NONE, None
    if limit_ratio is not None:
        target, ok = f"<= {limit_ratio}x reference", value <= limit_ratio
    elif limit_added is not None:
        target, ok = f"<= +{limit_added * 1000:g} ms", proxy <= limit_added
    return Row(
        name,
        ms(base),
        added_ms(ref),
        added_ms(proxy),
        text,
        target,
        NONE if ok is None else verdict(ok),
        tool,
    )


def _percentiles(
    name: str,
    runs: dict[str, Latency],
    *,
    p50_ratio: float | None = None,
    p50_added: float | None = None,
) -> list[Row]:
    tool = runs["proxy"].tool
    return [
        _added(
            f"{name} p50",
            {t: r.p50 for t, r in runs.items()},
            tool,
            limit_ratio=p50_ratio,
            limit_added=p50_added,
        ),
        _added(f"{name} p99", {t: r.p99 for t, r in runs.items()}, tool),
    ]


def _memory(results: Results) -> list[Row]:
    ref, proxy = results.held["reference"], results.held["proxy"]
    idle = results.idle_rss
    text, _ = ratio(proxy.peak_rss_mb, ref.peak_rss_mb)
    all_open = proxy.opened == proxy.requested
    held = f"{mb(proxy.peak_rss_mb)} ({proxy.opened}/{proxy.requested} open)"
    return [
        Row(
            "RSS, idle after load",
            NONE,
            mb(idle["reference"]),
            mb(idle["proxy"]),
            ratio(idle["proxy"], idle["reference"])[0],
            tool="/proc VmRSS",
        ),
        Row(
            f"RSS, {proxy.requested:,} open streams",
            NONE,
            f"{mb(ref.peak_rss_mb)} ({ref.opened}/{ref.requested} open)",
            held,
            text,
            f"<= {RSS_LIMIT_MB:g} MB",
            verdict(all_open and proxy.peak_rss_mb <= RSS_LIMIT_MB),
            "builtin + /proc",
        ),
        Row(
            f"time to open {proxy.requested:,} streams",
            NONE,
            f"{ref.open_seconds:.2f} s",
            f"{proxy.open_seconds:.2f} s",
            ratio(proxy.open_seconds, ref.open_seconds)[0],
            tool="builtin",
        ),
    ]


def _ledger(results: Results) -> list[Row]:
    peak = max(results.saturation[("proxy", c)].latency.rps for c in (32, 256))
    rows = []
    for name, value in (
        ("ledger: SQLiteLedger.write, batches of 200 (rows/s)", results.store_rate),
        ("ledger: via LedgerWriter, 2 records/call (calls/s)", results.writer_rate),
    ):
        text, value_ratio = ratio(value, peak)
        rows.append(
            Row(
                name,
                proxy=rate(value),
                ratio=f"{text} of peak",
                target=">= proxy peak req/s",
                verdict=verdict(value_ratio >= 1),
                tool="in-process",
            )
        )
    checks = results.ledger_checks
    requests = sum(c.requests for c in checks)
    written = sum(c.rows for c in checks)
    lag = max((c.lag_rows for c in checks), default=0)
    drain = max((c.drain_seconds for c in checks), default=math.nan)
    rows.append(
        Row(
            "ledger rows after saturation runs / requests",
            proxy=f"{written:,} / {requests:,} (lag {lag} rows, drained {drain:.2f} s)",
            ratio=ratio(written, requests)[0],
            target="every request recorded",
            verdict=verdict(written >= requests),
            tool="sqlite3 count",
        )
    )
    rows.append(
        Row(
            "record build + price per call",
            proxy=f"{results.build_seconds_per_call * 1e6:.1f} us",
            tool="in-process",
        )
    )
    return rows


def _soak(results: Results) -> list[Row]:
    samples = results.soak
    if len(samples) < 2:
        return [Row("soak", proxy="too short for two samples", verdict="n/a", tool="builtin")]
    first, last = samples[0], samples[-1]
    judged = results.soak_seconds >= SOAK_SECONDS and results.soak_errors == 0
    length = f"{results.soak_seconds:.0f} s, {len(samples)} samples"
    rss_drift = (last.rss_mb - first.rss_mb) / first.rss_mb
    p50_drift = (last.p50 - first.p50) / first.p50
    cpu_drift = (last.server_cpu - first.server_cpu) / first.server_cpu
    return [
        Row(
            f"soak RSS first -> last ({length})",
            proxy=f"{mb(first.rss_mb)} -> {mb(last.rss_mb)} ({rss_drift:+.1%})",
            target=f"flat (<= +{SOAK_RSS_DRIFT:.0%}) over {SOAK_SECONDS:.0f} s",
            verdict=verdict(rss_drift <= SOAK_RSS_DRIFT) if judged else "n/a",
            tool="builtin + /proc",
        ),
        Row(
            f"soak p50 first -> last (errors {results.soak_errors})",
            proxy=f"{ms(first.p50)} -> {ms(last.p50)} ({p50_drift:+.1%})",
            target=f"flat (<= +{SOAK_P50_DRIFT:.0%}) over {SOAK_SECONDS:.0f} s",
            verdict=verdict(p50_drift <= SOAK_P50_DRIFT) if judged else "n/a",
            tool="builtin",
        ),
        Row(
            "soak proxy CPU use first -> last (same offered load)",
            proxy=f"{first.server_cpu:.0%} -> {last.server_cpu:.0%} ({cpu_drift:+.1%})",
            tool="/proc stat",
        ),
    ]


def build(results: Results) -> list[Row]:
    """Every row of the table, in the issue's order."""
    c32 = {t: results.saturation[(t, 32)].latency for t in ("direct", "reference", "proxy")}
    rows = [_throughput(results, 32), _throughput(results, 256), _cpu_per_call(results, 32)]
    rows += _percentiles("added latency, c=1", results.latency_c1, p50_ratio=ADDED_LATENCY_RATIO)
    rows += _percentiles("added latency, c=32", c32)
    rows += _percentiles(
        "stream, 200 chunks: added time to first token", results.ttft, p50_added=TTFT_ADDED
    )
    rows += _percentiles("stream, 200 chunks in one burst: added total time", results.relay)
    rows.append(_per_event("stream relay: server CPU per event", results.cpu_per_event))
    if results.anthropic_ttft:
        rows += _percentiles(
            "Anthropic-format stream, 200 deltas: added time to first token",
            results.anthropic_ttft,
            p50_added=TTFT_ADDED,
        )
        rows.append(
            _per_event(
                "Anthropic-format stream: server CPU per event", results.anthropic_cpu_per_event
            )
        )
    rows += _memory(results)
    rows += _percentiles("1 MB JSON response: added latency", results.large)
    rows.append(
        Row(
            "1 MB JSON parse (json.loads, what the proxy pays)",
            proxy=ms(results.parse_seconds),
            tool="in-process",
        )
    )
    rows += _ledger(results)
    rows += _soak(results)
    return rows


def _per_event(name: str, cpu: dict[str, float]) -> Row:
    text = {t: f"{seconds * 1e6:.1f} us" for t, seconds in cpu.items()}
    return Row(
        name,
        text["direct"],
        text["reference"],
        text["proxy"],
        ratio(cpu["proxy"], cpu["reference"])[0],
        tool="builtin + /proc",
    )


def soak_lines(results: Results) -> list[str]:
    """The soak's samples, so a drift can be told from outside load."""
    lines = ["     t      RSS       p50   calls/s  proxy CPU  other processes' CPU"]
    lines += [
        f"  {s.at:4.0f} s {s.rss_mb:6.1f} MB {s.p50 * 1000:6.2f} ms {s.rps:7.0f} "
        f"{s.server_cpu:9.0%}  {s.outside_cpu:6.0%}"
        for s in results.soak
    ]
    return lines


def cpu_lines(results: Results) -> list[str]:
    """Where the CPU went in each saturation run (fractions of one core)."""
    lines = []
    for (target, concurrency), run in results.saturation.items():
        server = "" if target == "direct" else f"{target} {run.server_cpu:.0%}, "
        lines.append(
            f"  {target:>9} c={concurrency:<3}: {server}upstream {run.upstream_cpu:.0%}, "
            f"{run.latency.tool} {run.generator_cpu:.0%}; "
            f"{run.latency.count:,} requests, {run.latency.errors} errors"
        )
    return lines
