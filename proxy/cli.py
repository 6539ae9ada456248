"""``python -m proxy``: the command line. Each command group lives beside the code it drives."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from proxy import admin, serve
from proxy.demo import run as demo
from proxy.ledger import commands as ledger_commands
from proxy.pricing import commands as prices_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy",
        description="Metering proxy for the DeepSeek API: exact, dated prices for every call.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(commands)
    prices_commands.register(commands)
    admin.register(commands)
    demo.register(commands)
    ledger_commands.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


def run() -> None:
    """Console-script entry point (``deepseek-proxy``), same as ``python -m proxy``."""
    raise SystemExit(main())
