"""``python -m proxy report``: the ledger's spend and tokens, grouped, in a table, CSV or JSON.

Registered by `proxy.ledger.commands` beside the other ledger commands; it shares their
arguments and failures (`proxy.ledger.command_support`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from contextlib import closing

from proxy.ledger.command_support import (
    EXIT_USAGE,
    CommandFailed,
    common_arguments,
    guarded,
    open_ledger,
    read_config,
    time_range,
    warn_on_timezone,
)
from proxy.ledger.report import DEFAULT_GROUPS, GROUP_COLUMNS, build_report, ledger_currencies
from proxy.ledger.report_render import render


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser("report", help="spend and tokens from the ledger")
    common_arguments(report)
    report.add_argument(
        "--by",
        type=_groups,
        default=DEFAULT_GROUPS,
        metavar="KEYS",
        help="comma list of team, model, day (default: team,model)",
    )
    report.add_argument("--currency", help="one currency (default: all in the ledger)")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.set_defaults(handler=guarded(_report))


def _groups(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in GROUP_COLUMNS]
    if not keys or unknown or len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(
            f"expected distinct keys among {', '.join(GROUP_COLUMNS)}, got {text!r}"
        )
    return keys


def _report(args: argparse.Namespace) -> int:
    config = read_config(args)
    span = time_range(args, config)
    with closing(open_ledger(config)) as queries:
        warn_on_timezone(queries, config)
        currencies = _report_currencies(ledger_currencies(queries), args.currency)
        report = build_report(queries, span, args.by, currencies)
    print(render(report, args.format))
    return 0


def _report_currencies(known: Sequence[str], asked: str | None) -> tuple[str, ...]:
    if asked is None:
        return tuple(known)
    if asked.upper() not in known:
        held = ", ".join(known) if known else "no costs yet"
        raise CommandFailed(f"unknown currency {asked!r}; the ledger has {held}", EXIT_USAGE)
    return (asked.upper(),)
