"""``python -m proxy demo``: watch a call go through the proxy and onto the books, with no key.

In order, the command:

1. starts the simulated DeepSeek (`proxy.demo.simulated_deepseek`: no model runs, nothing is
   billed) with a random fake key;
2. starts the real proxy (`proxy.app.create_app`) in front of it, with three teams that get fresh
   keys, the price book shipped in ``config/pricing/deepseek.yaml`` and a real SQLite ledger;
3. sends a fixed script of calls with httpx, one at a time: mixed teams and models, streamed and
   not, a repeated prompt (cache hits), a thinking call, a FIM call;
4. prints each call, then a spend report by team and model read from the ledger with SQL, a
   sample of the Prometheus metrics, and how to call the proxy yourself;
5. keeps serving until Ctrl-C (or SIGTERM), unless ``--exit``.

Why a simulated clock: the price depends on the instant (peak hours, weekends, holidays), so a
demo priced at the real time would show different tiers on every run. The proxy takes its clock
as an argument; the demo's clock reads an instant the demo itself sets before each call. It is
never taken from the request: a client that could choose its billing instant could choose the
cheap tier. The report is therefore the same on every run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from proxy.app import create_app
from proxy.auth import ClientKey, hash_key, key_id_of, new_key
from proxy.config import DEFAULT_FLUSH_INTERVAL, Limits, ProxyConfig, Timeouts
from proxy.demo.simulated_deepseek import SimulatedDeepSeek
from proxy.ledger.store import SQLiteLedger, connect
from proxy.ledger.writer import LedgerWriter
from proxy.listener import ListenError, ProxySite, make_runner
from proxy.pricing import PriceBook, PriceBookError, load_price_book
from proxy.usage import DEFAULT_TOOL_FIELDS

PRICE_BOOK = Path(__file__).resolve().parents[2] / "config" / "pricing" / "deepseek.yaml"
"""Only the shipped file, so the demo's figures do not change with local additions."""
TEAMS = ("search", "support", "research")
BEIJING = ZoneInfo("Asia/Shanghai")
FLASH, PRO = "deepseek-flash", "deepseek-v4-pro"
REPORT_HEADING = "Spend by team and model (exact decimals, read from the ledger with SQL):"
FREE_PLAY = datetime(2026, 11, 2, 10, 0, tzinfo=BEIJING)
"""The instant (plus real time elapsed) at which calls made after the script are priced."""

_SEARCH_SYSTEM = (
    "You are the ranking assistant of the search team. You receive a shopper's query and up to "
    "twenty product results, each with a title, a short description, a price in CNY, a rating "
    "and a stock level. Rank the results from most to least useful for the query. Prefer "
    "products that match every attribute the shopper named (colour, size, material, brand); "
    "then products in stock; then better-rated products; then cheaper ones. Never invent a "
    "product, never change a price, and answer with the product ids in order, one per line, "
    "followed by one sentence explaining the first choice."
)
_SUPPORT_SYSTEM = (
    "You answer customers for the support team. Be brief and polite. Refunds: an unopened item "
    "can be returned within 30 days for a full refund; an opened item within 14 days, minus a "
    "10% restocking fee; electronics must be returned with every accessory. Refunds go back to "
    "the original payment method within 5 working days of the item reaching the warehouse. "
    "Never promise anything this policy does not say; offer to hand over to a person when the "
    "customer asks for one or is unhappy twice in a row."
)


@dataclass(frozen=True, slots=True)
class Call:
    """One scripted call: who sends what, where, and at which (simulated) instant."""

    team: str
    at: datetime
    body: dict[str, Any]
    note: str
    path: str = "/chat/completions"


def _chat(
    model: str, question: str, system: str = "", *, stream: bool = False, thinking: bool = False
) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    # Thinking is DeepSeek's default in 2026; plain calls turn it off, as a team would.
    return {
        "model": model,
        "messages": messages,
        "stream": stream,
        "thinking": {"type": "enabled" if thinking else "disabled"},
    }


def _bj(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=BEIJING)


SCRIPT: tuple[Call, ...] = (
    Call(
        "research",
        _bj(10, 1, 10),
        _chat(PRO, "Summarise last quarter's search logs."),
        "National Day holiday: off-peak all day",
    ),
    Call(
        "support",
        _bj(10, 1, 15),
        _chat(PRO, "Draft a holiday delivery notice.", stream=True),
        "holiday; /beta route",
        "/beta/chat/completions",
    ),
    Call(
        "search",
        _bj(11, 2, 10),
        _chat(FLASH, "Query: red running shoes", _SEARCH_SYSTEM),
        "Monday peak; long system prompt, first seen",
    ),
    Call(
        "search",
        _bj(11, 2, 10, 5),
        _chat(FLASH, "Query: waterproof jacket", _SEARCH_SYSTEM, stream=True),
        "same system prompt: cache hit",
    ),
    Call(
        "search",
        _bj(11, 2, 20),
        _chat(FLASH, "Query: red running shoes", _SEARCH_SYSTEM),
        "evening off-peak; repeat of call 3",
    ),
    Call(
        "support", _bj(11, 2, 21, 30), _chat(FLASH, "Where is my parcel?", stream=True), "off-peak"
    ),
    Call(
        "research",
        _bj(11, 3, 9, 30),
        {
            "model": FLASH,
            "prompt": "def median(values):\n    ",
            "suffix": "\n    return mid\n",
            "max_tokens": 64,
        },
        "fill-in-the-middle (FIM)",
        "/beta/completions",
    ),
    Call(
        "research",
        _bj(11, 3, 15),
        _chat(PRO, "Is 9.11 larger than 9.8?", thinking=True),
        "thinking: reasoning billed as output",
    ),
    Call(
        "research",
        _bj(11, 3, 23),
        _chat(PRO, "Plan an A/B test of the ranking.", stream=True, thinking=True),
        "thinking, streamed reasoning",
    ),
    Call(
        "search",
        _bj(11, 4, 14, 30),
        _chat(FLASH, "Query: wool socks", _SEARCH_SYSTEM),
        "Wednesday peak; cache hit; /v1 route",
        "/v1/chat/completions",
    ),
    Call(
        "support",
        _bj(11, 7, 11),
        _chat(FLASH, "Can I return opened headphones?", _SUPPORT_SYSTEM),
        "Saturday: off-peak all day",
    ),
    Call(
        "support",
        _bj(11, 7, 11, 10),
        _chat(FLASH, "Can I return opened headphones?", _SUPPORT_SYSTEM, stream=True),
        "repeat, streamed: cache hit",
    ),
)


class SimulatedClock:
    """The proxy's clock in the demo: the instant last `set`, plus real time elapsed since.

    Elapsed time is added so that durations and time-to-first-token stay real in the metrics.
    """

    def __init__(self, instant: datetime) -> None:
        self._instant = instant
        self._set_at = time.monotonic()

    def set(self, instant: datetime) -> None:
        self._instant = instant
        self._set_at = time.monotonic()

    def __call__(self) -> datetime:
        return self._instant + timedelta(seconds=time.monotonic() - self._set_at)


@dataclass(slots=True)
class Result:
    """What the client saw for one call."""

    call: Call
    status: int
    request_id: str | None
    usage: dict[str, Any] | None
    error: str = ""


@dataclass(slots=True)
class SpendLine:
    """One row of the spend report (or its total)."""

    team: str
    model: str
    requests: int
    hit: int
    miss: int
    output: int
    reasoning: int
    priced: int
    costs: dict[str, Decimal] = field(default_factory=dict)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command to the top-level parser."""
    demo = commands.add_parser(
        "demo", help="run the proxy against a simulated DeepSeek and show what it records"
    )
    demo.add_argument(
        "--port",
        type=_port,
        default=0,
        help="port for the proxy on 127.0.0.1 (default: a free one)",
    )
    demo.add_argument(
        "--exit", action="store_true", help="exit after the report instead of serving until Ctrl-C"
    )
    demo.add_argument(
        "--ledger",
        type=Path,
        metavar="PATH",
        help="ledger file to create (default: a temporary one, deleted at exit)",
    )
    demo.set_defaults(handler=_demo)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return port


def _demo(args: argparse.Namespace) -> int:
    if not PRICE_BOOK.is_file():
        print(
            f"cannot run the demo: the shipped price book {PRICE_BOOK} is missing; the demo "
            "runs from a source checkout (git clone, then pip install -e .)",
            file=sys.stderr,
        )
        return 2
    try:
        book = load_price_book([PRICE_BOOK])
    except PriceBookError as exc:
        print(f"cannot run the demo: {exc}", file=sys.stderr)
        return 2
    if args.ledger is not None and args.ledger.exists():
        # Demo rows are fake spend: never mix them into an existing (perhaps real) ledger.
        print(
            f"cannot run the demo: {args.ledger} exists; the demo writes a new ledger",
            file=sys.stderr,
        )
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="proxy-demo-") as folder:
            ledger = args.ledger or Path(folder) / "ledger.sqlite3"
            return asyncio.run(
                _run(book, ledger, args.port, serve=not args.exit, temporary=args.ledger is None)
            )
    except KeyboardInterrupt:  # where signal handlers cannot be installed (Windows)
        print("stopped")
        return 0


async def _run(book: PriceBook, ledger: Path, port: int, *, serve: bool, temporary: bool) -> int:
    async with contextlib.AsyncExitStack() as stack:
        upstream_key = "sk-simulated-" + secrets.token_hex(16)
        simulated = SimulatedDeepSeek(upstream_key)
        stack.push_async_callback(simulated.close)
        upstream_url = await simulated.start()
        try:
            store = SQLiteLedger(ledger, BEIJING)
        except (OSError, sqlite3.Error) as exc:
            print(f"cannot run the demo: cannot open the ledger {ledger}: {exc}", file=sys.stderr)
            return 2
        writer = LedgerWriter(store, DEFAULT_FLUSH_INTERVAL)
        stack.push_async_callback(asyncio.to_thread, writer.close)
        team_keys = {team: new_key() for team in TEAMS}
        config = _config(upstream_url, ledger, port, team_keys)
        clock = SimulatedClock(FREE_PLAY)
        runner = make_runner(
            create_app(
                config,
                book,
                upstream_key,
                writer,
                spend=store.spend,
                clock=clock,
                ledger=writer,
                ledger_status=writer.status,
            ),
            config,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)  # runs first: calls end before the writer
        try:
            await ProxySite(
                runner,
                "127.0.0.1",
                port,
                reuse_port=False,
                keepalive_timeout=config.timeouts.client_header,
            ).start()
        except ListenError as exc:
            print(f"cannot run the demo: {exc}", file=sys.stderr)
            return 2
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        print(f"Simulated DeepSeek (no model, no billing) at {upstream_url}; proxy at {url}")
        print(f"Ledger: {ledger}{' (temporary, deleted at exit)' if temporary else ''}")
        async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
            results = [await _send(client, call, team_keys[call.team], clock) for call in SCRIPT]
            clock.set(FREE_PLAY)
            if not await asyncio.to_thread(writer.flush, 30):
                print("the ledger did not commit in time", file=sys.stderr)
                return 1
            metrics = (await client.get("/metrics")).text
        problems = _print_calls(results, ledger)
        problems += _print_report(ledger, book.currencies)
        _print_metrics(url, metrics)
        _print_try_it(url, team_keys)
        if problems:
            print(f"\n{problems} problem(s): see above", file=sys.stderr)
            return 1
        if serve:
            print(
                f"\nServing until Ctrl-C. Calls you make now are priced as if made at "
                f"{FREE_PLAY:%a %Y-%m-%d %H:%M} Beijing (plus the time elapsed)."
            )
            await _until_stopped()
            print("stopping")
    return 0


def _config(upstream_url: str, ledger: Path, port: int, team_keys: dict[str, str]) -> ProxyConfig:
    keys = {
        hash_key(key): ClientKey(team, key_id_of(hash_key(key))) for team, key in team_keys.items()
    }
    return ProxyConfig(
        path=Path("(demo: built in code)"),
        host="127.0.0.1",
        port=port,
        upstream_base_url=upstream_url,
        upstream_key_env="(demo: generated key)",
        price_book_files=(PRICE_BOOK,),
        price_at="request_start",
        keys=MappingProxyType(keys),
        teams=TEAMS,
        timeouts=Timeouts(),
        limits=Limits(),
        tool_fields=DEFAULT_TOOL_FIELDS,
        ledger_path=ledger,
        flush_interval=DEFAULT_FLUSH_INTERVAL,
        billing_timezone=BEIJING,
    )


async def _send(client: httpx.AsyncClient, call: Call, key: str, clock: SimulatedClock) -> Result:
    """Send one call at its instant; read the usage the way a client would."""
    clock.set(call.at)
    headers = {"Authorization": f"Bearer {key}"}
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", call.path, json=call.body, headers=headers) as reply:
            request_id = reply.headers.get("x-request-id")
            if reply.status_code != 200:
                body = (await reply.aread()).decode(errors="replace")
                return Result(call, reply.status_code, request_id, None, body[:200])
            if call.body.get("stream"):
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line.removeprefix("data: ")).get("usage") or usage
            else:
                usage = json.loads(await reply.aread()).get("usage")
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: a body that is not JSON
        return Result(call, 0, None, None, f"{type(exc).__name__}: {exc}")
    return Result(call, 200, request_id, usage)


def _print_calls(results: Sequence[Result], ledger: Path) -> int:
    """One line per call: what the client saw, with the tier and cost the ledger recorded."""
    with contextlib.closing(connect(ledger)) as db:
        recorded = {
            request_id: (priced, tier, cny)
            for request_id, priced, tier, cny in db.execute(
                "SELECT u.request_id, u.priced, u.tier, c.amount FROM usage u "
                "LEFT JOIN usage_cost c ON c.request_id = u.request_id AND c.currency = 'CNY'"
            )
        }
    rows = []
    problems = 0
    for number, result in enumerate(results, 1):
        call, usage = result.call, result.usage or {}
        priced, tier, cny = recorded.get(result.request_id or "", (0, None, None))
        if result.status != 200 or not priced:
            problems += 1
        details = usage.get("completion_tokens_details") or {}
        rows.append(
            [
                str(number),
                call.team,
                call.body["model"],
                call.path,
                "yes" if call.body.get("stream") else "no",
                f"{call.at:%a %m-%d %H:%M}",
                str(result.status),
                tier or "-",
                *(
                    str(usage.get(name, "-"))
                    for name in (
                        "prompt_cache_hit_tokens",
                        "prompt_cache_miss_tokens",
                        "completion_tokens",
                    )
                ),
                str(details.get("reasoning_tokens", "-")),
                format(Decimal(cny), "f") if cny is not None else "-",
                result.error or call.note,
            ]
        )
    print("\nCalls (sent one at a time; the demo sets the proxy's clock to each instant):")
    _table(
        [
            "#",
            "team",
            "model",
            "path",
            "stream",
            "Beijing time",
            "status",
            "tier",
            "hit",
            "miss",
            "output",
            "reasoning",
            "CNY",
            "note",
        ],
        rows,
        left={1, 2, 3, 4, 5, 7, 13},
    )
    return problems


def _print_report(ledger: Path, currencies: Sequence[str]) -> int:
    """The ledger grouped by team and model, and its total from a separate query."""
    groups, total = _spend(ledger)
    print(f"\n{REPORT_HEADING}")
    rows = [
        [
            line.team,
            line.model,
            str(line.requests),
            str(line.hit),
            str(line.miss),
            str(line.output),
            str(line.reasoning),
            *(format(line.costs.get(c, Decimal(0)), "f") for c in currencies),
        ]
        for line in [*groups, total]
    ]
    _table(
        ["team", "model", "requests", "hit", "miss", "output", "reasoning", *currencies],
        rows,
        left={0, 1},
    )
    unpriced = total.requests - total.priced
    if unpriced:
        print(f"{unpriced} call(s) could not be priced (see unpriced_reason in the ledger)")
    print(
        "hit/miss: prompt tokens read from / not in DeepSeek's context cache; reasoning tokens "
        "are inside output."
    )
    return unpriced


_BY_TEAM_MODEL = """
    SELECT team, model_requested, COUNT(*), COALESCE(SUM(cache_hit_tokens), 0),
           COALESCE(SUM(cache_miss_tokens), 0), COALESCE(SUM(output_tokens), 0),
           COALESCE(SUM(reasoning_tokens), 0), COALESCE(SUM(priced), 0)
    FROM usage GROUP BY team, model_requested ORDER BY team, model_requested"""
_COST_BY_TEAM_MODEL = """
    SELECT u.team, u.model_requested, c.currency, decimal_sum(c.amount)
    FROM usage u JOIN usage_cost c USING (request_id)
    GROUP BY u.team, u.model_requested, c.currency"""
# The total is its own query, not the sum of the rows printed, so the two check each other.
_TOTAL = """
    SELECT COUNT(*), COALESCE(SUM(cache_hit_tokens), 0), COALESCE(SUM(cache_miss_tokens), 0),
           COALESCE(SUM(output_tokens), 0), COALESCE(SUM(reasoning_tokens), 0),
           COALESCE(SUM(priced), 0)
    FROM usage"""
_COST_TOTAL = "SELECT currency, decimal_sum(amount) FROM usage_cost GROUP BY currency"


def _spend(ledger: Path) -> tuple[list[SpendLine], SpendLine]:
    """Report rows and total, money summed exactly by the ledger's `decimal_sum` aggregate."""
    with contextlib.closing(connect(ledger)) as db:
        groups = {
            (team, model): SpendLine(team, model, *sums)
            for team, model, *sums in db.execute(_BY_TEAM_MODEL)
        }
        for team, model, currency, amount in db.execute(_COST_BY_TEAM_MODEL):
            groups[(team, model)].costs[currency] = Decimal(amount)
        total = SpendLine("total", "(all)", *db.execute(_TOTAL).fetchone())
        total.costs = {currency: Decimal(amount) for currency, amount in db.execute(_COST_TOTAL)}
    return list(groups.values()), total


def _print_metrics(url: str, metrics: str) -> None:
    cost = [
        line
        for line in metrics.splitlines()
        if line.startswith("llm_cost_total{") and 'currency="CNY"' in line
    ]
    print(f"\nPrometheus metrics: curl {url}/metrics")
    print("  e.g. llm_cost_total (CNY; floats only here, for Prometheus):")
    for line in cost[:6]:
        print(f"  {line}")
    if len(cost) > 6:
        print(f"  ... and {len(cost) - 6} more")


def _print_try_it(url: str, team_keys: dict[str, str]) -> None:
    team = TEAMS[0]
    body = json.dumps(
        {
            "model": FLASH,
            "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": "Hello"}],
        }
    )
    print(f"\nTry it: the proxy is {url}; the key of team {team} is {team_keys[team]}")
    print(
        f"  curl {url}/chat/completions -H 'Authorization: Bearer {team_keys[team]}' "
        f"-H 'Content-Type: application/json' -d '{body}'"
    )


def _table(header: list[str], rows: list[list[str]], left: set[int]) -> None:
    """Print columns padded to their widest cell; text left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  " + "  ".join(cells).rstrip())


async def _until_stopped() -> None:
    """Wait for SIGINT or SIGTERM; the caller's exit stack then closes everything in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):  # Windows; or not the main thread
            pass
    try:
        await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
