"""``python -m proxy serve``: load everything, fail fast on bad input, run the server.

This is the only module that reads the environment (for the DeepSeek key, under the name the
config gives). Start-up fails with a one-line reason naming the file and key at fault.

SIGTERM and SIGINT stop the server gracefully (aiohttp stops accepting, lets running calls
finish, then runs the cleanups): the ledger writer is closed last, after every call's record was
submitted, so a graceful stop loses nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from proxy.app import create_app
from proxy.config import DEFAULT_CONFIG, ConfigError, load_config
from proxy.ledger.store import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.pricing import PriceBookError, load_price_book
from proxy.records import FanOut, LogSink

log = logging.getLogger("proxy")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"configuration file (default: {DEFAULT_CONFIG})")
    serve.add_argument("--log-level", default="INFO",
                       choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = load_config(args.config)
        book = load_price_book(config.price_book)
    except ConfigError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    except PriceBookError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    api_key = os.environ.get(config.upstream_key_env, "").strip()
    if not api_key:
        print(f"cannot start: {config.path}: upstream.api_key_env: environment variable "
              f"{config.upstream_key_env} is not set (it must hold the DeepSeek API key)",
              file=sys.stderr)
        return 2
    try:
        store = SQLiteLedger(config.ledger_path, config.billing_timezone)
    except (OSError, sqlite3.Error) as exc:
        print(f"cannot start: {config.path}: ledger.path: cannot open {config.ledger_path}: "
              f"{exc}", file=sys.stderr)
        return 2
    if store.interrupted:
        log.warning("%d call(s) were still in flight when the proxy last stopped; they are "
                    "recorded as 'interrupted' with unknown usage", store.interrupted)
    writer = LedgerWriter(store, config.flush_interval)
    app = create_app(config, book, api_key, FanOut(writer, LogSink()), spend=store.spend)

    async def close_ledger(app: web.Application) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(writer.close)  # after in-flight calls finished: nothing lost

    app.cleanup_ctx.insert(0, close_ledger)
    log.info("proxy for %s on http://%s:%d, %d team(s), price book %s, ledger %s",
             config.upstream_base_url, config.host, config.port, len(config.teams),
             book.digest[:12], config.ledger_path)
    try:
        web.run_app(app, host=config.host, port=config.port, print=None, access_log=None)
    finally:
        writer.close()
    return 0
