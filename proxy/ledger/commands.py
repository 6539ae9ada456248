"""``python -m proxy report|statement|reprice|ledger-replay|ledger-copy``: the ledger from the
command line (``report`` and ``statement`` are in `proxy.ledger.report_commands`, what all
share in `proxy.ledger.command_support`).

All read the proxy's configuration for the ledger (``ledger.path``, or a PostgreSQL
``ledger.url``), the billing timezone (a date bound such as ``2026-11-01`` means 00:00 of that
day there) and, but for ``ledger-replay`` and ``ledger-copy``, the current price book (its
currencies, its prices). ``report``, ``statement``, ``reprice`` and ``ledger-replay`` work the
same on either ledger, with the same output for the same records: one implementation, querying
through `proxy.ledger.queries`. They may run while the proxy is serving: ``report`` and
``statement`` only read, and ``reprice --apply`` and ``ledger-replay`` write in transactions
that the proxy's writes wait for or commute with.

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
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from proxy.config import DEFAULT_CONFIG, ProxyConfig
from proxy.ledger import pg_queries, report_commands
from proxy.ledger.command_support import (
    EXIT_FAILED,
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
)
from proxy.ledger.pg_copy import BATCH, copy_rows, open_source, source_timezone
from proxy.ledger.pg_queries import PostgresQueries
from proxy.ledger.pg_store import PostgresLedger
from proxy.ledger.queries import LedgerUnusable
from proxy.ledger.reprice import apply_plan, plan_reprice, render_plan
from proxy.ledger.spill import SpillError, read_records, replay
from proxy.ledger.store import SQLiteLedger


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ledger commands to the top-level parser."""
    report_commands.register(commands)

    reprice = commands.add_parser(
        "reprice", help="price stored rows again with the current price book"
    )
    common_arguments(reprice)
    reprice.add_argument(
        "--apply",
        action="store_true",
        help="write the new prices (default: only show the difference)",
    )
    reprice.set_defaults(handler=guarded(_reprice))

    replay_ = commands.add_parser(
        "ledger-replay", help="write records a stopping proxy could not write into the ledger"
    )
    config_argument(replay_)
    replay_.add_argument(
        "files",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="spill files (<ledger>.unwritten-*.jsonl), or a log holding "
        "'unwritten ledger record:' lines",
    )
    replay_.set_defaults(handler=guarded(_replay))

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
        type=positive,
        default=BATCH,
        metavar="ROWS",
        help=f"rows per transaction (default: {BATCH})",
    )
    copy.set_defaults(handler=guarded(_copy))


def _reprice(args: argparse.Namespace) -> int:
    config = read_config(args)
    span = time_range(args, config)
    with closing(open_ledger(config)) as queries:
        book = read_book(config)
        if args.apply:
            with queries.transaction():
                plan = plan_reprice(queries, book, span)
                apply_plan(queries, plan, datetime.now(UTC))
        else:
            plan = plan_reprice(queries, book, span)
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
    config = read_config(args)
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
    with closing(open_ledger(config)) as queries:
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
    config = read_config(args)
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
