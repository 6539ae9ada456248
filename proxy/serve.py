"""``python -m proxy serve``: load everything, fail fast on bad input, run the server.

This is the only module that reads the environment (for the DeepSeek key, under the name the
config gives). Start-up fails with a one-line reason naming the file and key at fault.

SIGTERM and SIGINT stop the server gracefully (`_run`): the ledger writer is closed last, after
every call's record was submitted, so a graceful stop loses nothing. If the ledger cannot
commit, the stop still ends: after `ledger.shutdown_timeout` seconds the records it could not
write are saved beside it (`proxy.ledger.spill`) and the exit code is `EXIT_UNWRITTEN`.
SIGHUP reloads the config file and the price book without a restart (`proxy.reload`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.util
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from proxy.admission import SharedAdmission, TeamsFull
from proxy.app import ADMISSION, RELOADER, create_app
from proxy.config import (
    DEFAULT_CONFIG,
    ConfigError,
    ProxyConfig,
    check_references,
    load_config,
)
from proxy.ledger.pg_store import OPEN_ERRORS, PostgresLedger, shown_url
from proxy.ledger.schema import SchemaTooNew
from proxy.ledger.spill import EXIT_UNWRITTEN, spill
from proxy.ledger.store import LedgerStore, SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.listener import ListenError, ProxySite, make_runner
from proxy.pricing import PriceBookError, load_price_book
from proxy.reconcile.live import LiveBook, PostgresSource, SQLiteSource
from proxy.records import FanOut, LogSink, RecordSink
from proxy.workers import (
    MULTIPROC_ENV,
    OWNER_ENV,
    SLOT_ENV,
    listen_problem,
    new_owner,
    supervise,
)

log = logging.getLogger("proxy")

LOOPS = ("uvloop", "asyncio")
DEFAULT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
"""uvloop has no Windows wheels: there, and wherever it is missing, asyncio's own loop."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="worker processes sharing the port (default 1; up to the cores)",
    )
    serve.add_argument(
        "--loop",
        choices=LOOPS,
        default=DEFAULT_LOOP,
        help=f"event loop (default: {DEFAULT_LOOP}; uvloop costs the proxy about "
        "5%% less CPU per call than asyncio's, measured in bench/)",
    )
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(handler=_serve)


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module(
            "uvloop"
        ).new_event_loop
        return factory
    return None  # asyncio's default


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _serve(args: argparse.Namespace) -> int:
    # Until the server takes SIGHUP as "reload", it must not end the process (its default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = load_config(args.config)
        book = load_price_book(config.price_book_files)
        check_references(config, currencies=book.currencies, tools=book.tool_fees)
    except ConfigError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    except PriceBookError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    api_key = os.environ.get(config.upstream_key_env, "").strip()
    if not api_key:
        print(
            f"cannot start: {config.path}: upstream.api_key_env: environment variable "
            f"{config.upstream_key_env} is not set (it must hold the DeepSeek API key)",
            file=sys.stderr,
        )
        return 2
    supervisor = args.workers > 1 and not args.worker
    if supervisor and (problem := listen_problem(config.host, config.port)):
        print(f"cannot start: {config.path}: listen: {problem}", file=sys.stderr)
        return 2
    shared = Path(os.environ[MULTIPROC_ENV]) if args.worker else None
    try:
        admission = (
            SharedAdmission.join(shared, int(os.environ[SLOT_ENV]), config.limits, config.teams)
            if shared
            else None
        )
    except TeamsFull as exc:
        print(f"cannot start: {config.path}: teams: {exc}", file=sys.stderr)
        return 2
    # The owner id marks this process's ledger rows and budget holds (`proxy.workers`).
    owner = os.environ[OWNER_ENV] if args.worker else new_owner()
    try:
        store = _open_ledger(config, owner, worker=args.worker)
    except _CannotOpen as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    log.info(
        "proxy for %s on http://%s:%d, %d team(s), price book %s, ledger %s",
        config.upstream_base_url,
        config.host,
        config.port,
        len(config.teams),
        book.digest[:12],
        config.ledger_shown,
    )
    if supervisor:
        store.close()
        return supervise(config, args.log_level, args.workers, args.loop)
    writer = LedgerWriter(store, config.flush_interval, config.max_queued_records)
    log_sink = LogSink()
    # The log level is fixed at start-up: without DEBUG the log sink would only be skipped,
    # call after call.
    sink: RecordSink = FanOut(writer, log_sink) if log_sink.enabled() else writer
    # DeepSeek's balance, polled by one process of all that share the ledger (`proxy.reconcile`).
    balance = LiveBook(
        SQLiteSource(config.ledger_path)
        if config.ledger_url is None
        else PostgresSource(config.ledger_url),
        config.reconcile_currencies,
    )
    app = create_app(
        config,
        book,
        api_key,
        sink,
        spend=store.spend,
        team_spend=store.team_spend,
        shared_metrics_dir=shared,
        shared_ledger=config.ledger_path if args.worker and config.ledger_url is None else None,
        shared_url=config.ledger_url,
        owner=owner,
        admission=admission,
        ledger=writer,
        ledger_status=writer.status,
        balance=balance,
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            runner.run(_run(app, config, reuse_port=args.worker))
    except ListenError as exc:
        print(f"cannot start: {config.path}: listen: {exc}", file=sys.stderr)
        return 2
    finally:
        balance.close()
        # After every running call ended and was submitted; bounded, so a ledger that cannot
        # commit cannot keep the process from exiting before the orchestrator kills it.
        unwritten = writer.close(config.ledger_shutdown_timeout)
        if unwritten:
            spill(unwritten, config.spill_anchor, config.path, datetime.now(UTC))
    return EXIT_UNWRITTEN if unwritten else 0


class _CannotOpen(Exception):
    """The ledger cannot be opened: the config file, key, ledger and reason."""


def _open_ledger(config: ProxyConfig, owner: str, *, worker: bool) -> LedgerStore:
    """The configured ledger, created or migrated, this process's `owner` on its rows.

    A SQLite ledger is recovered by the first process to open it (a worker joins running
    siblings, whose calls recovering would end). A PostgreSQL ledger is never recovered
    wholesale, since other replicas may be running: this process takes a lease, and the
    replicas release a dead one's calls and holds when its lease runs out
    (`proxy.ledger.leases`).
    """
    if config.ledger_url is not None:
        try:
            return PostgresLedger(
                config.ledger_url, config.billing_timezone, owner=owner, lease=config.ledger_lease
            )
        except OPEN_ERRORS as exc:
            raise _CannotOpen(
                f"{config.path}: ledger.url: cannot open {shown_url(config.ledger_url)}: "
                f"{str(exc) or type(exc).__name__}"
            ) from exc
    try:
        store = SQLiteLedger(
            config.ledger_path, config.billing_timezone, recover=not worker, owner=owner
        )
    except (OSError, sqlite3.Error, SchemaTooNew) as exc:
        raise _CannotOpen(
            f"{config.path}: ledger.path: cannot open {config.ledger_path}: {exc}"
        ) from exc
    if store.interrupted:
        log.warning(
            "%d call(s) were still in flight when the proxy last stopped; they are "
            "recorded as 'interrupted' with unknown usage",
            store.interrupted,
        )
    return store


GC_THRESHOLDS = (50_000, 20, 10)
"""Collect the youngest generation every 50,000 allocations rather than every 700."""


def tune_garbage_collection() -> None:
    """Set the cyclic garbage collector up for serving, once everything long-lived exists.

    A call allocates a few hundred objects that reference counting frees at once; with the
    default thresholds the collector still ran every few calls and, worse, its full
    collections walked everything built at start-up (price book, metrics, libraries), more of
    it the more calls were open: at 256 concurrent calls it took a fifth of the CPU. Freezing
    the start-up objects takes them out of every collection for good, and a high first
    threshold lets most young objects die before a collection looks at them (bench/RESULTS.md
    has the figures). Memory stays bounded: only objects in reference cycles wait for the
    collector, and the first generation is collected every 50,000 allocations.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _run(app: web.Application, config: ProxyConfig, *, reuse_port: bool) -> None:
    """Serve until SIGTERM or SIGINT, then drain, as Envoy drains a listener.

    During the drain the listening socket stays open: ``/readyz`` answers 503 (load balancers
    stop sending), a new call on any connection, new or kept alive, gets 503 with
    ``Retry-After`` and ``Connection: close`` (the SDKs retry it elsewhere), and running calls
    have `timeouts.drain` seconds to finish; the drain ends as soon as the last one does. Then
    the calls still running are cancelled (recorded as ``aborted``; aiohttp gives them at most
    twice `CANCEL_GRACE`) and the connections closed. So SIGTERM ends the server within
    ``timeouts.drain + 2 s``, before the ledger is flushed (`proxy.ledger.writer`).
    """
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    async def reload_when_started() -> bool:
        await started.wait()  # the app's request state exists from start-up on
        return await app[RELOADER].reload()

    def reload() -> None:
        log.info("SIGHUP: reloading %s", config.path)
        task = loop.create_task(reload_when_started())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Before the socket listens: a SIGHUP sent once the proxy answers is never lost.
    loop.add_signal_handler(signal.SIGHUP, reload)
    runner = make_runner(app, config)
    await runner.setup()
    try:
        await ProxySite(
            runner,
            config.host,
            config.port,
            reuse_port=reuse_port,
            keepalive_timeout=config.timeouts.client_header,
        ).start()
        started.set()
        tune_garbage_collection()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("draining: waiting up to %g s for running calls", config.timeouts.drain)
        if await app[ADMISSION].drain(config.timeouts.drain):
            log.info("drained: no calls running")
        else:
            log.warning("drain time over: cancelling the calls still running")
    finally:
        await runner.cleanup()
