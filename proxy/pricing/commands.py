"""``python -m proxy prices check|quote|show``: the price book from the command line.

Exit codes: 0 success; 1 the book has problems (each printed as ``file: entry: reason``);
2 bad arguments; 3 the quoted call cannot be priced (unknown or retired model, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from proxy.pricing.errors import PriceBookError
from proxy.pricing.loader import load_price_book
from proxy.pricing.model import ENDPOINT_NAMES, PriceBook
from proxy.pricing.pricer import price
from proxy.pricing.render import quote_objects, quote_text, table_in_force
from proxy.usage import TokenUsage

DEFAULT_BOOK = Path("config/pricing")
EXIT_BOOK_PROBLEMS = 1
EXIT_UNPRICED = 3


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``prices`` command group to the top-level parser."""
    prices = commands.add_parser("prices", help="check the price book and quote calls")
    sub = prices.add_subparsers(dest="prices_command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="validate price-book files (exit 1 on any problem)")
    check.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE",
        help=f"files or directories (default: {DEFAULT_BOOK}/*.yaml)",
    )
    check.set_defaults(handler=_check)

    quote = sub.add_parser("quote", help="price one call at an instant")
    _book_argument(quote)
    quote.add_argument("--model", required=True)
    quote.add_argument(
        "--endpoint",
        choices=sorted(ENDPOINT_NAMES),
        default="chat",
        help="the route called (default: chat); a name the book cannot price is billed as "
        "the endpoint's fallback model where the book gives one (messages)",
    )
    quote.add_argument("--at", required=True, type=_instant, help="ISO 8601 with offset")
    quote.add_argument("--hit", type=_count, default=0, help="cache-hit input tokens")
    quote.add_argument("--miss", type=_count, default=0, help="cache-miss input tokens")
    quote.add_argument("--output", type=_count, default=0, help="output tokens (incl. reasoning)")
    quote.add_argument(
        "--reasoning",
        type=_count,
        default=0,
        help="reasoning tokens (already inside --output; never billed twice)",
    )
    quote.add_argument(
        "--tool-calls",
        type=_tool_calls,
        default={},
        help="server tool calls, e.g. search=3,fetch=1",
    )
    quote.add_argument("--currency", help="one currency (default: all in the book)")
    quote.add_argument("--format", choices=("text", "json"), default="text")
    quote.set_defaults(handler=_quote)

    show = sub.add_parser("show", help="the price table in force at an instant")
    _book_argument(show)
    show.add_argument("--at", required=True, type=_instant, help="ISO 8601 with offset")
    show.add_argument("--currency", help="one currency (default: all in the book)")
    show.set_defaults(handler=_show)


def _book_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--book",
        action="append",
        type=Path,
        metavar="PATH",
        help=f"price-book file or directory, repeatable (default: {DEFAULT_BOOK})",
    )


def _instant(text: str) -> datetime:
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 instant: {text!r}") from None
    if instant.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no timezone offset; add Z (UTC) or e.g. +08:00 (Beijing)"
        )
    return instant


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative whole number, got {text!r}")
    return int(text)


def _tool_calls(text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected NAME=COUNT pairs, got {part!r}")
        calls[name.strip()] = calls.get(name.strip(), 0) + int(count)
    return calls


def book_files(paths: list[Path] | None) -> list[Path]:
    """Expand directories to their ``*.yaml`` files (sorted, so the merge order is stable)."""
    files: list[Path] = []
    for path in paths or [DEFAULT_BOOK]:
        files.extend(sorted(path.glob("*.yaml")) if path.is_dir() else [path])
    return files


def _load(paths: list[Path] | None) -> PriceBook | None:
    try:
        return load_price_book(book_files(paths))
    except PriceBookError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _currencies(book: PriceBook, asked: str | None) -> list[str] | None:
    if asked is None:
        return list(book.currencies)
    if asked.upper() not in book.currencies:
        print(
            f"unknown currency {asked!r}; the book has {', '.join(book.currencies)}",
            file=sys.stderr,
        )
        return None
    return [asked.upper()]


def _check(args: argparse.Namespace) -> int:
    files = book_files(args.files)
    book = _load(args.files)
    if book is None:
        return EXIT_BOOK_PROBLEMS
    eras = sum(len(t) for t in book.models.values())
    print(
        f"ok: {len(files)} file(s), {len(book.models)} models, {eras} dated entries, "
        f"{len(book.schedules)} schedules, {len(book.calendars)} calendars, "
        f"{len(book.tool_fees)} tool fees, {len(book.patterns)} name patterns, "
        f"{len(book.fallbacks)} endpoint fallbacks"
    )
    return 0


def _book_and_currencies(args: argparse.Namespace) -> tuple[PriceBook, list[str]] | int:
    """The book and the currencies asked for, or the exit code when either is unusable."""
    book = _load(args.book)
    if book is None:
        return EXIT_BOOK_PROBLEMS
    currencies = _currencies(book, args.currency)
    if currencies is None:
        return 2
    return book, currencies


def _quote(args: argparse.Namespace) -> int:
    found = _book_and_currencies(args)
    if isinstance(found, int):
        return found
    book, currencies = found
    usage = TokenUsage(args.hit, args.miss, args.output, args.reasoning, args.tool_calls)
    pricing = price(book, args.model, usage, args.at, args.endpoint)
    if args.format == "json":
        print(json.dumps(quote_objects(pricing, currencies), indent=2))
    else:
        print(quote_text(pricing, currencies))
    return 0 if pricing.priced else EXIT_UNPRICED


def _show(args: argparse.Namespace) -> int:
    found = _book_and_currencies(args)
    if isinstance(found, int):
        return found
    book, currencies = found
    print(table_in_force(book, args.at, currencies))
    return 0
