"""``python -m proxy demo``: watch a call go through the proxy and onto the books, with no key.

In order, the command:

1. starts the simulated DeepSeek (`proxy.demo.simulated_deepseek`: no model runs, nothing is
   billed) with a random fake key;
2. starts the real proxy (`proxy.app.create_app`) in front of it, with three teams that get fresh
   keys, the price book shipped in ``config/pricing/deepseek.yaml`` and a real SQLite ledger;
3. sends a fixed script of calls with httpx, one at a time: mixed teams and models, streamed and
   not, a repeated prompt (cache hits), a thinking call, a FIM call, and calls in DeepSeek's
   Anthropic format (with a claude name, as Claude Code sends) and the OpenAI Responses API;
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
import secrets
import signal
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType

import httpx

from proxy.app import create_app
from proxy.auth import ClientKey, hash_key, key_id_of, new_key
from proxy.config import DEFAULT_FLUSH_INTERVAL, Limits, ProxyConfig, Timeouts
from proxy.demo.report import Result, print_calls, print_metrics, print_report, print_try_it
from proxy.demo.script import BEIJING, FREE_PLAY, SCRIPT, TEAMS, Call
from proxy.demo.simulated_deepseek import SimulatedDeepSeek
from proxy.ledger.store import SQLiteLedger
from proxy.ledger.writer import LedgerWriter
from proxy.listener import ListenError, ProxySite, make_runner
from proxy.pricing import PriceBook, PriceBookError, load_price_book
from proxy.usage import DEFAULT_TOOL_FIELDS

PRICE_BOOK_FILE = Path(__file__).resolve().parents[2] / "config" / "pricing" / "deepseek.yaml"
"""Only the shipped file, so the demo's figures do not change with local additions."""


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
    if not PRICE_BOOK_FILE.is_file():
        print(
            f"cannot run the demo: the shipped price book {PRICE_BOOK_FILE} is missing; the demo "
            "runs from a source checkout (git clone, then pip install -e .)",
            file=sys.stderr,
        )
        return 2
    try:
        book = load_price_book([PRICE_BOOK_FILE])
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
                team_spend=store.team_spend,
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
        problems = print_calls(results, ledger)
        problems += print_report(ledger, book.currencies)
        print_metrics(url, metrics)
        print_try_it(url, team_keys)
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
        price_book_files=(PRICE_BOOK_FILE,),
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
    """Send one call at its instant, with the key where the format's SDK puts it, and read the
    whole answer (a stream to its end, as a client does)."""
    clock.set(call.at)
    headers = (
        {"x-api-key": key, "anthropic-version": "2023-06-01"}
        if call.path.startswith("/anthropic/")
        else {"Authorization": f"Bearer {key}"}
    )
    try:
        async with client.stream("POST", call.path, json=call.body, headers=headers) as reply:
            request_id = reply.headers.get("x-request-id")
            body = await reply.aread()
            if reply.status_code != 200:
                return Result(call, reply.status_code, request_id, body.decode(errors="replace"))
    except httpx.HTTPError as exc:
        return Result(call, 0, None, f"{type(exc).__name__}: {exc}")
    return Result(call, 200, request_id)


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
