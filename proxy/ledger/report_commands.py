"""``python -m proxy report`` and ``python -m proxy statement``: the ledger's spend, for
operators and scripts (a table, CSV, JSON) and for a team's month (text, an HTML page).

Registered by `proxy.ledger.commands` beside the other ledger commands; they share their
arguments and failures (`proxy.ledger.command_support`). Both read the price book, whose
currencies are always columns (`proxy.ledger.report.report_currencies`): a book with problems
stops them (exit 1), as it stops the proxy.

``statement`` is a command of its own rather than a mode of ``report``, so ``report``'s
arguments keep their meaning: ``--month`` and ``--team`` name a whole statement, which is
several reports of one team and month (`proxy.ledger.statement`). ``report reconcile``
(`proxy.reconcile.report`) compares DeepSeek's balance with the ledger's cost.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from contextlib import closing
from datetime import date

from proxy.ledger.command_support import (
    EXIT_USAGE,
    CommandFailed,
    common_arguments,
    config_argument,
    guarded,
    open_ledger,
    positive,
    read_book,
    read_config,
    time_range,
    warn_on_timezone,
)
from proxy.ledger.queries import Queries
from proxy.ledger.report import build_report, ledger_currencies, report_currencies
from proxy.ledger.report_groups import DEFAULT_GROUPS, GROUPS, known
from proxy.ledger.report_render import render
from proxy.ledger.statement import TOP_KEYS, build_statement
from proxy.ledger.statement_html import render_html
from proxy.ledger.statement_text import render_text
from proxy.reconcile import report as reconcile_report


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser("report", help="spend and tokens from the ledger")
    common_arguments(report)
    report.add_argument(
        "--by",
        type=_groups,
        default=DEFAULT_GROUPS,
        metavar="KEYS",
        help=f"comma list of {', '.join(GROUPS)}, tag:NAME (default: "
        f"{','.join(DEFAULT_GROUPS)}); days, weeks (from Monday) and months are billing days",
    )
    report.add_argument("--team", help="only this team's calls")
    report.add_argument("--currency", help="one currency (default: every one of the price book)")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.add_argument(
        "--total",
        action="store_true",
        help="end CSV with a TOTAL row (the table always has one; JSON has 'total')",
    )
    report.set_defaults(handler=guarded(_report))
    reconcile_report.register(report)

    statement = commands.add_parser(
        "statement",
        help="a team's monthly statement, as text or an HTML page",
        description="One team's spend in one month of the billing timezone: totals in every "
        "currency of the price book, cache savings, peak and off-peak, by model, top keys, "
        "spend per day, and the calls that are unpriced or estimated, with why.",
    )
    config_argument(statement)
    statement.add_argument("--team", required=True)
    statement.add_argument("--month", required=True, type=_month, metavar="YYYY-MM")
    statement.add_argument(
        "--top",
        type=positive,
        default=TOP_KEYS,
        metavar="N",
        help=f"keys shown by name, the most spent first (default: {TOP_KEYS})",
    )
    statement.add_argument("--format", choices=("text", "html"), default="text")
    statement.set_defaults(handler=guarded(_statement))


def _groups(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if not known(k)]
    if not keys or unknown or len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(
            f"expected distinct keys among {', '.join(GROUPS)}, tag:NAME, got {text!r}"
        )
    return keys


def _month(text: str) -> date:
    try:
        if len(text) != 7:
            raise ValueError
        return date.fromisoformat(text + "-01")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a month as YYYY-MM, got {text!r}") from None


def _report(args: argparse.Namespace) -> int:
    config = read_config(args)
    span = time_range(args, config)
    book = read_book(config)
    with closing(open_ledger(config)) as queries:
        warn_on_timezone(queries, config)
        known_currencies = report_currencies(book.currencies, ledger_currencies(queries))
        currencies = _one_currency(known_currencies, args.currency)
        report = build_report(
            queries, span, args.by, currencies, config.billing_timezone, args.team
        )
    print(render(report, args.format, csv_total=args.total))
    return 0


def _one_currency(known: Sequence[str], asked: str | None) -> tuple[str, ...]:
    if asked is None:
        return tuple(known)
    if asked.upper() not in known:
        raise CommandFailed(
            f"unknown currency {asked!r}; the price book and ledger have {', '.join(known)}",
            EXIT_USAGE,
        )
    return (asked.upper(),)


def _statement(args: argparse.Namespace) -> int:
    config = read_config(args)
    book = read_book(config)
    tz = config.billing_timezone
    with closing(open_ledger(config)) as queries:
        warn_on_timezone(queries, config)
        if args.team not in config.teams and not _in_ledger(queries, args.team):
            raise CommandFailed(
                f"unknown team {args.team!r}: not in {args.config} and not in the ledger",
                EXIT_USAGE,
            )
        currencies = report_currencies(book.currencies, ledger_currencies(queries))
        statement = build_statement(queries, args.team, args.month, tz, currencies, args.top)
    print(render_html(statement) if args.format == "html" else render_text(statement))
    return 0


def _in_ledger(queries: Queries, team: str) -> bool:
    return bool(queries.execute("SELECT 1 FROM usage WHERE team = ? LIMIT 1", (team,)))
