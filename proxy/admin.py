"""The commands an operator runs to change what a proxy serves: ``keys new``, ``keys list`` and
``config check``.

Keys and teams live in the config file, which is the record of who may call (kept in version
control, reviewed like code): the proxy never writes it. Changing them is an edit, a check and
a reload: ``keys new`` prints a key once and the line to add; ``config check`` reads the file
and its price book exactly as ``serve`` and a reload do (so CI can refuse a bad change before it
reaches a proxy); ``kill -HUP`` applies it (`proxy.reload`). To rotate a key, add the new one
beside the old, reload, move the team's clients over, delete the old line and reload again; to
revoke one, delete its line (``keys list`` tells which line is which key id) and reload: it is
refused from the next request on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proxy.auth import TEAM_NAME, TEAM_NAME_RULE, hash_key, key_id_of, new_key
from proxy.config import DEFAULT_CONFIG, ProxyConfig
from proxy.pricing import PriceBook
from proxy.reload import ReloadRefused, read


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="client keys")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    new = sub.add_parser("new", help="print a new client key once, and its config line")
    new.add_argument("--team", required=True)
    new.set_defaults(handler=_new)
    listing = sub.add_parser("list", help="the teams and the ids of their keys in a config")
    _config_argument(listing)
    listing.set_defaults(handler=_list)
    config = commands.add_parser("config", help="the proxy's configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_sub.add_parser(
        "check", help="check the config and its price book as serve and a reload do"
    )
    _config_argument(check)
    check.set_defaults(handler=_check)


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )


def _new(args: argparse.Namespace) -> int:
    if not TEAM_NAME.fullmatch(args.team):
        print(f"keys new: --team {args.team!r}: {TEAM_NAME_RULE}", file=sys.stderr)
        return 2
    key = new_key()
    digest = hash_key(key)
    print(
        f"New key for team {args.team!r} (shown once; give it to the team, store it nowhere else):"
    )
    print(f"  {key}")
    print("Add this line under the team's keys in the proxy config, then reload (kill -HUP):")
    print(f"teams:\n  {args.team}:\n    keys:\n      - sha256:{digest}   # {key_id_of(digest)}")
    return 0


def _read(path: Path) -> tuple[ProxyConfig, PriceBook] | None:
    """The config at `path` and its book, checked as a reload checks them; None (the reason
    printed) if they would be refused."""
    try:
        return read(path)
    except ReloadRefused as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return None


def _list(args: argparse.Namespace) -> int:
    if (found := _read(args.config)) is None:
        return 2
    config, _ = found
    for team in config.teams:
        ids = sorted(
            f"{client.key_id}  (sha256:{digest[:16]}...)"
            for digest, client in config.keys.items()
            if client.team == team
        )
        print(f"{team}:")
        for line in ids:
            print(f"  {line}")
    return 0


def _check(args: argparse.Namespace) -> int:
    if (found := _read(args.config)) is None:
        return 2
    config, book = found
    print(
        f"{config.path}: valid: {len(config.teams)} team(s), {len(config.keys)} key(s), "
        f"{len(config.budgets)} budget(s); price book {book.digest[:12]} "
        f"({len(book.files)} file(s))"
    )
    return 0
