"""What every ledger command shares: its arguments (``--config``, ``--since``, ``--until``),
the configuration and ledger it opens, and how a failure ends it (a message and an exit code).

Exit codes: 0 success; 1 the ledger stops the command (`LEDGER_ERRORS`) or the price book has
problems; 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

from proxy.config import DEFAULT_CONFIG, ConfigError, ProxyConfig, load_config
from proxy.ledger import pg_schema, schema
from proxy.ledger.pg_copy import NotALedger
from proxy.ledger.pg_queries import open_postgres
from proxy.ledger.queries import LedgerUnusable, NoLedger, Queries, open_sqlite
from proxy.ledger.report import TimeRange, bound_instant, parse_bound
from proxy.pricing import PriceBook, PriceBookError, load_price_book

EXIT_FAILED = 1
EXIT_USAGE = 2
LEDGER_ERRORS = (
    NoLedger,
    NotALedger,
    LedgerUnusable,
    schema.SchemaTooNew,
    pg_schema.SchemaTooNew,
)
"""What stops a command at the ledger, each one line saying where and why (exit code 1)."""

Handler = Callable[[argparse.Namespace], int]


class CommandFailed(Exception):
    """Ends a command with a message on stderr and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )


def common_arguments(parser: argparse.ArgumentParser) -> None:
    config_argument(parser)
    parser.add_argument(
        "--since",
        type=_bound,
        metavar="T",
        help="calls started at or after T: an ISO date (00:00 in the billing "
        "timezone) or an ISO instant with offset",
    )
    parser.add_argument(
        "--until", type=_bound, metavar="T", help="calls started before T (same forms as --since)"
    )


def _bound(text: str) -> date:
    try:
        return parse_bound(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date or an ISO instant with offset, got {text!r}: {exc}"
        ) from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def guarded(run: Handler) -> Handler:
    """Turn `CommandFailed` into its message on stderr and its exit code, and a ledger that
    stops the command (`LEDGER_ERRORS`) into its message and exit code 1."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except CommandFailed as exc:
            print(exc, file=sys.stderr)
            return exc.code
        except LEDGER_ERRORS as exc:
            print(exc, file=sys.stderr)
            return EXIT_FAILED

    return handler


def read_config(args: argparse.Namespace) -> ProxyConfig:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CommandFailed(str(exc), EXIT_USAGE) from exc


def time_range(args: argparse.Namespace, config: ProxyConfig) -> TimeRange:
    tz = config.billing_timezone
    since = None if args.since is None else bound_instant(args.since, tz)
    until = None if args.until is None else bound_instant(args.until, tz)
    if since is not None and until is not None and since >= until:
        raise CommandFailed(
            f"--since ({since.isoformat()}) must be before --until ({until.isoformat()})",
            EXIT_USAGE,
        )
    return TimeRange(since, until)


def open_ledger(config: ProxyConfig) -> Queries:
    """The configured ledger, which must exist: these commands never create one."""
    if config.ledger_url is None:
        return open_sqlite(config.ledger_path)
    return open_postgres(config.ledger_url)


def warn_on_timezone(queries: Queries, config: ProxyConfig) -> None:
    """Billing days are stored; if the config's timezone changed since, say they are stale."""
    rows = queries.execute("SELECT value FROM meta WHERE key = 'billing_timezone'")
    configured = str(config.billing_timezone.key)
    if rows and rows[0][0] != configured:
        print(
            f"warning: the ledger's billing days are in {rows[0][0]}, the config says "
            f"{configured}; they are re-derived when the proxy next starts",
            file=sys.stderr,
        )


def read_book(config: ProxyConfig) -> PriceBook:
    try:
        return load_price_book(config.price_book_files)
    except PriceBookError as exc:
        raise CommandFailed("\n".join(str(p) for p in exc.problems), EXIT_FAILED) from exc
