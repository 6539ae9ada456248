"""``python -m proxy report reconcile``: DeepSeek's balance against the ledger, window by
window.

One line per window between two balance snapshots and currency: its start and end (in the
billing timezone), the total balance before and after, the top-ups and grants recognized in
it, what the balance fell by apart from them (spend), the ledger's cost of the calls that
ended in it, the drift (spend minus ledger cost) and the drift as a share of the ledger cost;
then a TOTAL line per currency. ``--since``/``--until`` take the windows whose *end* is in
``[since, until)``, so adjacent ranges add up. Every figure is recomputed from the snapshots
and the ledger as they are now (`proxy.reconcile.book.windows`), amounts exact; with no
bounds, a currency's TOTAL drift is what ``llm_deepseek_bill_drift_running`` exports.

A subcommand of ``report`` (``report``'s own arguments keep their meaning without it): it
reports on the same ledger, read only, and while the proxy runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from contextlib import closing
from datetime import date
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from proxy.formats import decimal_text
from proxy.ledger.command_support import (
    EXIT_USAGE,
    CommandFailed,
    config_argument,
    guarded,
    open_ledger,
    read_config,
)
from proxy.ledger.report import TimeRange, bound_instant, parse_bound
from proxy.ledger.report_render import local_instant, table
from proxy.reconcile.book import windows
from proxy.reconcile.drift import Running, Window, ratio

HEADER = (
    "currency",
    "start",
    "end",
    "balance_before",
    "balance_after",
    "top_ups",
    "grants",
    "spend",
    "ledger_cost",
    "drift",
    "drift_ratio",
)
RATIO_PLACES = Decimal("0.000001")
"""The drift ratio is shown to six decimal places (the amounts are exact)."""


def register(report: argparse.ArgumentParser) -> None:
    """Add ``reconcile`` under ``report``."""
    views = report.add_subparsers(dest="view", metavar="VIEW")
    reconcile = views.add_parser(
        "reconcile",
        help="DeepSeek's balance against the ledger's cost, window by window",
        description="For each window between two polls of DeepSeek's balance: the balance "
        "before and after, top-ups and grants, the balance's fall without them (spend), the "
        "ledger's cost of the calls that ended in the window, and the drift between them.",
    )
    config_argument(reconcile)
    reconcile.add_argument(
        "--since",
        type=_bound,
        metavar="T",
        help="windows that ended at or after T: an ISO date (00:00 in the billing timezone) "
        "or an ISO instant with offset",
    )
    reconcile.add_argument(
        "--until", type=_bound, metavar="T", help="windows that ended before T (same forms)"
    )
    reconcile.add_argument("--format", choices=("table", "csv", "json"), default="table")
    reconcile.set_defaults(handler=guarded(_reconcile))


def _bound(text: str) -> date:
    try:
        return parse_bound(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date or an ISO instant with offset, got {text!r}: {exc}"
        ) from None


def _reconcile(args: argparse.Namespace) -> int:
    config = read_config(args)
    tz = config.billing_timezone
    span = TimeRange(
        None if args.since is None else bound_instant(args.since, tz),
        None if args.until is None else bound_instant(args.until, tz),
    )
    if span.since is not None and span.until is not None and span.since >= span.until:
        raise CommandFailed("--since must be before --until", EXIT_USAGE)
    with closing(open_ledger(config)) as queries:
        found = windows(queries, span.since, span.until, config.reconcile_currencies)
    print(render(found, args.format, tz, span))
    return 0


def totals(found: Sequence[Window]) -> dict[str, tuple[Running, Decimal, Decimal]]:
    """Per currency: the running sums, the top-ups and the grants of `found`."""
    sums: dict[str, tuple[Running, Decimal, Decimal]] = {}
    for current in found:
        running, top_ups, grants = sums.get(current.currency, (Running(), Decimal(0), Decimal(0)))
        sums[current.currency] = (
            running.plus(current),
            top_ups + current.top_ups,
            grants + current.grants,
        )
    return sums


def _ratio_text(value: Decimal | None) -> str | None:
    return None if value is None else decimal_text(value.quantize(RATIO_PLACES))


def _row(current: Window, tz: ZoneInfo) -> list[str | None]:
    return [
        current.currency,
        local_instant(current.start, tz),
        local_instant(current.end, tz),
        decimal_text(current.before.balance.total),
        decimal_text(current.after.balance.total),
        decimal_text(current.top_ups),
        decimal_text(current.grants),
        decimal_text(current.spend),
        decimal_text(current.ledger_cost),
        decimal_text(current.drift),
        _ratio_text(current.ratio),
    ]


def _total_rows(found: Sequence[Window]) -> list[list[str | None]]:
    return [
        [
            currency,
            "TOTAL",
            None,
            None,
            None,
            decimal_text(top_ups),
            decimal_text(grants),
            decimal_text(running.spend),
            decimal_text(running.ledger_cost),
            decimal_text(running.drift),
            _ratio_text(ratio(running.drift, running.ledger_cost)),
        ]
        for currency, (running, top_ups, grants) in sorted(totals(found).items())
    ]


def render(found: Sequence[Window], fmt: str, tz: ZoneInfo, span: TimeRange) -> str:
    """The windows as ``table``, ``csv`` (no TOTAL rows: a spreadsheet sums) or ``json``."""
    rows = [_row(current, tz) for current in found]
    if fmt == "json":
        return json.dumps(_json(rows, _total_rows(found), tz, span), indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(["" if cell is None else cell for cell in row] for row in rows)
        return out.getvalue().rstrip("\n")
    since = "the first poll" if span.since is None else local_instant(span.since, tz)
    until = "the last poll" if span.until is None else local_instant(span.until, tz)
    caption = (
        f"Balance windows that ended from {since} until {until} (exclusive); "
        f"billing timezone {tz.key}"
    )
    cells = [["-" if c is None else c for c in row] for row in (*rows, *_total_rows(found))]
    return caption + "\n" + table(HEADER, cells, text_columns=3)


def _json(
    rows: Sequence[Sequence[str | None]],
    total_rows: Sequence[Sequence[str | None]],
    tz: ZoneInfo,
    span: TimeRange,
) -> dict[str, Any]:
    return {
        "since": None if span.since is None else local_instant(span.since, tz),
        "until": None if span.until is None else local_instant(span.until, tz),
        "timezone": tz.key,
        "windows": [dict(zip(HEADER, row, strict=True)) for row in rows],
        "total": [
            {name: row[HEADER.index(name)] for name in (HEADER[0], *HEADER[5:])}
            for row in total_rows
        ],
    }
