"""``python -m proxy report|reprice|ledger-replay|ledger-copy``: the ledger from the command line.

All read the proxy's configuration for the ledger (``ledger.path``, or a PostgreSQL
``ledger.url``), the billing timezone (a date bound such as ``2026-11-01`` means 00:00 of that
day there) and, for ``reprice``, the current price book. ``report``, ``reprice`` and
``ledger-replay`` work the same on either ledger, with the same output for the same records:
one implementation, querying through `proxy.ledger.queries`. They may run while the proxy is
serving: ``report`` only reads, and ``reprice --apply`` and ``ledger-replay`` write in
transactions that the proxy's writes wait for or commute with.

``ledger-replay FILE...`` puts back the records a stopping proxy could not write (its spill
files, or a log holding them; `proxy.ledger.spill`). Named for what it writes into, beside
``report`` and ``reprice``, rather than a bare ``replay``, which could be taken for replaying
calls to DeepSeek.

``ledger-copy --from FILE`` copies an existing SQLite ledger into the configured PostgreSQL
ledger (`proxy.ledger.pg_copy`): idempotent, in batches that an interrupted copy resumes from.

Exit codes: 0 success; 1 no ledger where the config points (a missing file, a database without
the ledger's tables: nothing is created), a ledger that cannot be reached or read (one line
naming it and why) or that a newer proxy wrote, a price book with problems (each printed as
``file: entry: reason``), or a file that cannot be read or holds a line that is not a record
(``file:line: reason``; nothing is written then); 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from datetime import UTC, date, datetime
from pathlib import Path

from proxy.config import DEFAULT_CONFIG, ConfigError, ProxyConfig, load_config
from proxy.ledger import pg_queries, pg_schema, schema
from proxy.ledger.pg_copy import BATCH, NotALedger, copy_rows, open_source, source_timezone
from proxy.ledger.pg_queries import PostgresQueries, open_postgres
from proxy.ledger.pg_store import PostgresLedger
from proxy.ledger.queries import LedgerUnusable, NoLedger, Queries, open_sqlite
from proxy.ledger.report import (
    DEFAULT_GROUPS,
    GROUP_COLUMNS,
    TimeRange,
    bound_instant,
    build_report,
    ledger_currencies,
    parse_bound,
    render,
)
from proxy.ledger.reprice import apply_plan, plan_reprice, render_plan
from proxy.ledger.spill import SpillError, read_records, replay
from proxy.ledger.store import SQLiteLedger
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


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ledger commands to the top-level parser."""
    report = commands.add_parser("report", help="spend and tokens from the ledger")
    _common_arguments(report)
    report.add_argument(
        "--by",
        type=_groups,
        default=DEFAULT_GROUPS,
        metavar="KEYS",
        help="comma list of team, model, day (default: team,model)",
    )
    report.add_argument("--currency", help="one currency (default: all in the ledger)")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.set_defaults(handler=_guarded(_report))

    reprice = commands.add_parser(
        "reprice", help="price stored rows again with the current price book"
    )
    _common_arguments(reprice)
    reprice.add_argument(
        "--apply",
        action="store_true",
        help="write the new prices (default: only show the difference)",
    )
    reprice.set_defaults(handler=_guarded(_reprice))

    replay_ = commands.add_parser(
        "ledger-replay", help="write records a stopping proxy could not write into the ledger"
    )
    replay_.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )
    replay_.add_argument(
        "files",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="spill files (<ledger>.unwritten-*.jsonl), or a log holding "
        "'unwritten ledger record:' lines",
    )
    replay_.set_defaults(handler=_guarded(_replay))

    copy = commands.add_parser(
        "ledger-copy",
        help="copy a SQLite ledger into the configured PostgreSQL ledger",
        description="Copy every final row of a SQLite ledger (costs, cache savings, flags, "
        "cost_history) into the PostgreSQL ledger that the config's ledger.url names, adding "
        "their costs to its daily spend. Idempotent: rows already there are left alone, so "
        "running it again, or after an interrupted copy, copies only what is missing. Rows "
        "still in flight are not copied: stop the proxy using the file first.",
    )
    copy.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"configuration file naming the PostgreSQL ledger (default: {DEFAULT_CONFIG})",
    )
    copy.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        metavar="SQLITE_FILE",
        help="the SQLite ledger to copy (opened read-only: never changed)",
    )
    copy.add_argument(
        "--batch",
        type=_positive,
        default=BATCH,
        metavar="ROWS",
        help=f"rows per transaction (default: {BATCH})",
    )
    copy.set_defaults(handler=_guarded(_copy))


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _groups(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in GROUP_COLUMNS]
    if not keys or unknown or len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(
            f"expected distinct keys among {', '.join(GROUP_COLUMNS)}, got {text!r}"
        )
    return keys


def _guarded(run: Handler) -> Handler:
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


def _config(args: argparse.Namespace) -> ProxyConfig:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CommandFailed(str(exc), EXIT_USAGE) from exc


def _time_range(args: argparse.Namespace, config: ProxyConfig) -> TimeRange:
    tz = config.billing_timezone
    since = None if args.since is None else bound_instant(args.since, tz)
    until = None if args.until is None else bound_instant(args.until, tz)
    if since is not None and until is not None and since >= until:
        raise CommandFailed(
            f"--since ({since.isoformat()}) must be before --until ({until.isoformat()})",
            EXIT_USAGE,
        )
    return TimeRange(since, until)


def _open_ledger(config: ProxyConfig) -> Queries:
    """The configured ledger, which must exist: these commands never create one."""
    if config.ledger_url is None:
        return open_sqlite(config.ledger_path)
    return open_postgres(config.ledger_url)


def _report(args: argparse.Namespace) -> int:
    config = _config(args)
    time_range = _time_range(args, config)
    with closing(_open_ledger(config)) as queries:
        _warn_on_timezone(queries, config)
        currencies = _report_currencies(ledger_currencies(queries), args.currency)
        report = build_report(queries, time_range, args.by, currencies)
    print(render(report, args.format))
    return 0


def _report_currencies(known: Sequence[str], asked: str | None) -> tuple[str, ...]:
    if asked is None:
        return tuple(known)
    if asked.upper() not in known:
        held = ", ".join(known) if known else "no costs yet"
        raise CommandFailed(f"unknown currency {asked!r}; the ledger has {held}", EXIT_USAGE)
    return (asked.upper(),)


def _warn_on_timezone(queries: Queries, config: ProxyConfig) -> None:
    """Billing days are stored; if the config's timezone changed since, say they are stale."""
    rows = queries.execute("SELECT value FROM meta WHERE key = 'billing_timezone'")
    configured = str(config.billing_timezone.key)
    if rows and rows[0][0] != configured:
        print(
            f"warning: the ledger's billing days are in {rows[0][0]}, the config says "
            f"{configured}; they are re-derived when the proxy next starts",
            file=sys.stderr,
        )


def _book(config: ProxyConfig) -> PriceBook:
    try:
        return load_price_book(config.price_book_files)
    except PriceBookError as exc:
        raise CommandFailed("\n".join(str(p) for p in exc.problems), EXIT_FAILED) from exc


def _reprice(args: argparse.Namespace) -> int:
    config = _config(args)
    time_range = _time_range(args, config)
    with closing(_open_ledger(config)) as queries:
        book = _book(config)
        if args.apply:
            with queries.transaction():
                plan = plan_reprice(queries, book, time_range)
                apply_plan(queries, plan, datetime.now(UTC))
        else:
            plan = plan_reprice(queries, book, time_range)
    print(render_plan(plan))
    if not args.apply:
        print("dry run; nothing changed")
    elif plan.changes:
        print(
            f"applied: {len(plan.changes)} row(s) re-priced; previous amounts kept in cost_history"
        )
    else:
        print("nothing to change")
    return 0


def _replay(args: argparse.Namespace) -> int:
    config = _config(args)
    records = []
    for path in args.files:
        try:
            found = read_records(path)
        except OSError as exc:
            raise CommandFailed(f"cannot read {path}: {exc}", EXIT_FAILED) from exc
        except SpillError as exc:
            raise CommandFailed(f"{exc}; nothing was written", EXIT_FAILED) from exc
        if not found:
            raise CommandFailed(f"{path}: no records in it; nothing was written", EXIT_FAILED)
        records.extend(found)
    # It must exist: replaying into a new, empty one is a mistake.
    with closing(_open_ledger(config)) as queries:
        try:
            store = _store(config)
            try:
                result = replay(queries, store, records)
            finally:
                store.close()
        except (sqlite3.Error, *pg_queries.ERRORS) as exc:
            raise LedgerUnusable(queries.where, exc) from exc
    print(
        f"{len(records)} record(s) read: {result.written} written to {queries.where}, "
        f"{result.present} already there"
    )
    return 0


def _store(config: ProxyConfig) -> SQLiteLedger | PostgresLedger:
    """The configured ledger's store, which ends no running proxy's calls on opening."""
    if config.ledger_url is None:
        return SQLiteLedger(config.ledger_path, config.billing_timezone, recover=False)
    return PostgresLedger(config.ledger_url, config.billing_timezone)


def _copy(args: argparse.Namespace) -> int:
    config = _config(args)
    if config.ledger_url is None:
        raise CommandFailed(
            f"{args.config}: ledger-copy copies into a PostgreSQL ledger, and the config's "
            f"ledger is the SQLite file {config.ledger_path}: set ledger.url to "
            "postgresql://user@host:port/database",
            EXIT_USAGE,
        )
    source_path: Path = args.source
    with closing(open_source(source_path)) as source:
        kept_in = source_timezone(source)
        configured = str(config.billing_timezone.key)
        if kept_in not in (None, configured):
            print(
                f"note: {source_path} keeps billing days in {kept_in}; the copy's are in "
                f"{configured}, the config's ledger.billing_timezone",
                file=sys.stderr,
            )
        with closing(PostgresQueries(config.ledger_url)) as target:
            target.migrate()
            copied = present = in_flight = 0
            try:
                for batch in copy_rows(source, target, config.billing_timezone, args.batch):
                    copied += batch.copied
                    present += batch.present
                    in_flight += batch.in_flight
            except sqlite3.Error as exc:  # the source (the target's errors are translated)
                raise LedgerUnusable(str(source_path), exc) from exc
    print(
        f"{copied + present} final row(s) in {source_path}: {copied} copied to "
        f"{target.where}, {present} already there"
    )
    if in_flight:
        print(
            f"warning: {in_flight} in-flight row(s) not copied: a proxy is still serving from "
            f"{source_path}, or one stopped during those calls. Stop the proxy; its next start "
            "on the file ends them as interrupted; then run ledger-copy again to copy them.",
            file=sys.stderr,
        )
    return 0
