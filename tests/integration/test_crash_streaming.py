"""kill -9 of the real `serve` process at random moments while streams are running.

Three rounds on one ledger. Each round starts `python -m proxy serve` (which turns the previous
round's ``in_flight`` rows into ``interrupted``), drives concurrent slow streams through it,
kills it with SIGKILL at a seeded random instant, and the next start checks what the ledger kept:

- exactly one row per request the fake DeepSeek saw, except requests that arrived within the
  stated durability window before the kill (flush interval + commit allowance, as in
  `tests.integration.test_serve_durability`), and never a row for a request DeepSeek did not see;
- no call reached DeepSeek twice (every call carries a tag header the proxy forwards);
- every response the client saw finish (``[DONE]``) before the window has a final ``complete``
  row, priced from the reported usage;
- every stream the fake had not finished sending when the proxy died is ``interrupted``, with
  unknown usage and no price at all (never a zero cost).

The fake DeepSeek runs in the test process, so which requests it saw and when (`ArrivalLog`),
and which streams it had finished at the kill, are known exactly; the proxy's request id links a
call to its row through the ``x-request-id`` header the client received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx

from proxy.config import DEFAULT_FLUSH_INTERVAL
from tests.support.fake_deepseek import FakeDeepSeek, running_fake
from tests.support.fake_deepseek_shapes import RecordedRequest, Reply
from tests.support.requests import AUTH, STREAM, USAGE
from tests.support.serve_process import ServeProcess, serve_process

SEED = 20261102
ROUNDS = 3
WORKERS = 8
LONG = 2  # of the workers, those whose stream outlives the round (in flight at every kill)
WINDOW = DEFAULT_FLUSH_INTERVAL + 1.0  # the stated window plus a commit allowance (CI machines)
TAG = "X-Test-Call"


class ArrivalLog(list[RecordedRequest]):
    """`FakeDeepSeek.requests` that also notes when each request arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[float] = []

    def append(self, request: RecordedRequest) -> None:
        self.arrived.append(time.monotonic())
        super().append(request)


@dataclass
class Call:
    """One client call, as the client saw it."""

    tag: str
    request_id: str | None = None
    done_at: float | None = None
    """When the client read ``data: [DONE]``; None if the stream broke off."""


@dataclass
class Round:
    number: int
    calls: dict[str, Call] = field(default_factory=dict)
    seen: ArrivalLog = field(default_factory=ArrivalLog)
    finished_at_kill: set[str] = field(default_factory=set)
    """Completion ids of the streams the fake had sent whole when the proxy was killed."""
    kill_at: float = 0.0


@dataclass(frozen=True)
class Row:
    state: str
    outcome: str
    usage_source: str
    priced: int
    output_tokens: int | None
    costs: tuple[tuple[str, Decimal], ...]
    """(currency, amount) of its usage_cost rows."""


def read_ledger(path: Path) -> dict[str, Row]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        costs: dict[str, list[tuple[str, Decimal]]] = {}
        for request_id, currency, amount in conn.execute(
            "SELECT request_id, currency, amount FROM usage_cost ORDER BY currency"
        ):
            costs.setdefault(request_id, []).append((currency, Decimal(amount)))
        return {
            request_id: Row(
                state, outcome, source, priced, output, tuple(costs.get(request_id, ()))
            )
            for request_id, state, outcome, source, priced, output in conn.execute(
                "SELECT request_id, state, outcome, usage_source, priced, output_tokens FROM usage"
            )
        }


def tag_of(request: RecordedRequest) -> str:
    [tag] = [v for k, v in request.headers.items() if k.lower() == TAG.lower()]
    return tag


async def stream_calls(http: httpx.AsyncClient, r: Round, worker: int, stop: asyncio.Event) -> None:
    """Streams one after another until the proxy dies under one of them."""
    while not stop.is_set():
        call = Call(f"r{r.number}-w{worker}-{len(r.calls)}")
        r.calls[call.tag] = call
        try:
            async with http.stream(
                "POST", "/chat/completions", json=STREAM, headers={TAG: call.tag}
            ) as response:
                call.request_id = response.headers.get("x-request-id")
                body = b"".join([part async for part in response.aiter_raw()])
        except httpx.HTTPError:
            return  # killed mid-call (or refused once dead)
        assert response.status_code == 200, body
        if body.endswith(b"data: [DONE]\n\n"):
            call.done_at = time.monotonic()


def reply(rng: random.Random, pieces: int | None = None) -> Reply:
    count = pieces if pieces is not None else rng.randint(3, 60)  # 0.06 to 1.2 s
    return Reply(content=[f"w{i}" for i in range(count)], usage=USAGE, chunk_interval=0.02)


async def drive_and_kill(
    r: Round, fake: FakeDeepSeek, serve: ServeProcess, rng: random.Random
) -> None:
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=serve.url, headers=AUTH, timeout=30) as http:
        # The long streams go first, so they take the long replies (the fake answers in order).
        fake.enqueue(*[reply(rng, pieces=400) for _ in range(LONG)])  # 8 s: past any kill
        workers = [
            asyncio.create_task(stream_calls(http, r, w, stop), name=f"stream-{w}")
            for w in range(LONG)
        ]
        await fake.wait_for(lambda: len(fake.requests) == LONG)
        fake.enqueue(*[reply(rng) for _ in range(1000)])
        workers += [
            asyncio.create_task(stream_calls(http, r, w, stop), name=f"stream-{w}")
            for w in range(LONG, WORKERS)
        ]
        # The random instant of the crash (seeded): always past one window, so some of what
        # DeepSeek saw must already be on disk.
        await asyncio.sleep(rng.uniform(WINDOW + 0.2, WINDOW + 1.2))
        os.kill(serve.process.pid, signal.SIGKILL)
        r.kill_at = time.monotonic()
        r.finished_at_kill = set(fake.finished)  # before the fake runs again: exact
        stop.set()
        await asyncio.gather(*workers)
    await serve.process.wait()


def check_round(r: Round, rows: dict[str, Row]) -> None:
    """The previous round's rows, after a restart recovered them (see the module docstring)."""
    cutoff = r.kill_at - WINDOW
    tags = [tag_of(request) for request in r.seen]
    assert len(tags) == len(set(tags)), "a call reached DeepSeek twice"
    by_id = {c.request_id: c for c in r.calls.values() if c.request_id is not None}
    assert len(by_id) == len([c for c in r.calls.values() if c.request_id is not None])
    mine = {request_id: row for request_id, row in rows.items() if request_id in by_id}
    # Rows of calls whose headers never reached the client cannot be named; they still count.
    others = len(rows) - len(mine)

    assert {row.state for row in rows.values()} <= {"final"}, "in_flight left after restart"
    assert {row.outcome for row in rows.values()} <= {"complete", "interrupted"}
    assert {by_id[i].tag for i in mine} <= set(tags), "a row for a call DeepSeek never saw"
    assert len(rows) <= len(r.seen)
    assert others <= len([t for t in tags if r.calls[t].request_id is None])

    interrupted_old = 0
    for request, arrived, tag in zip(r.seen, r.seen.arrived, tags, strict=True):
        call = r.calls[tag]
        if arrived < cutoff:
            assert call.request_id in mine, (
                f"{tag}: DeepSeek saw it {r.kill_at - arrived:.2f}"
                " s before the kill, but the ledger has no row"
            )
        row = mine.get(call.request_id or "")
        if row is None:
            continue
        in_progress = request.id not in r.finished_at_kill
        if call.done_at is not None and call.done_at < cutoff:
            assert (row.outcome, row.usage_source, row.priced, row.output_tokens) == (
                "complete",
                "reported",
                1,
                50,
            ), tag
            assert [c for c, _ in row.costs] == ["CNY", "USD"], tag
            assert all(amount > 0 for _, amount in row.costs), tag
        elif in_progress:
            assert call.done_at is None
            assert (row.outcome, row.usage_source, row.priced, row.output_tokens) == (
                "interrupted",
                "unknown",
                0,
                None,
            ), tag
            interrupted_old += arrived < cutoff
        if row.outcome == "interrupted":
            assert row.costs == () and not row.priced, tag  # unknown: no price, never zero
    assert interrupted_old >= LONG  # the kill did land on streams in progress


async def test_kill_9_at_random_points_during_streams(tmp_path: Path) -> None:
    rng = random.Random(SEED)  # noqa: S311 - a reproducible schedule, not a secret
    previous: tuple[Round, set[str]] | None = None
    async with asyncio.timeout(30):
        for number in range(ROUNDS + 1):
            async with running_fake() as fake:
                current = Round(number)
                fake.requests = current.seen
                async with serve_process(tmp_path, fake.base_url) as serve:
                    rows = read_ledger(serve.ledger)  # recovered at start-up
                    if previous is not None:
                        last, before = previous
                        check_round(last, {i: row for i, row in rows.items() if i not in before})
                    if number == ROUNDS:
                        break
                    await drive_and_kill(current, fake, serve, rng)
            # The fake is closed: every request that reached it before the crash is logged.
            previous = (current, set(rows))
