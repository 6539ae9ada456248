"""``python -m proxy serve``: load everything, fail fast on bad input, run the server.

This is the only module that reads the environment (for the DeepSeek key, under the name the
config gives). Start-up fails with a one-line reason naming the file and key at fault.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from proxy.app import create_app
from proxy.config import DEFAULT_CONFIG, ConfigError, load_config
from proxy.pricing import PriceBookError, load_price_book
from proxy.records import LogSink

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
    app = create_app(config, book, api_key, LogSink())
    log.info("proxy for %s on http://%s:%d, %d team(s), price book %s", config.upstream_base_url,
             config.host, config.port, len(config.teams), book.digest[:12])
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None)
    return 0
