"""The spend API (``GET /v1/spend``) and ``x-proxy-budget-remaining``, on both ledgers: the
figures a team gets are exactly what ``python -m proxy report`` (`build_report`) says for it
over the same day, week and month in the billing timezone (Asia/Shanghai)."""

from __future__ import annotations

import asyncio
import re
import signal
from contextlib import closing
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.config import Budget
from proxy.formats import decimal_text
from proxy.ledger.pg_queries import open_postgres
from proxy.ledger.queries import Queries, open_sqlite
from proxy.ledger.report import TimeRange, build_report
from proxy.pricing import PriceBook
from tests.support.fake_deepseek import FakeDeepSeek, running_fake
from tests.support.fake_deepseek_shapes import Reply
from tests.support.ledger_backends import BEIJING, LedgerBackend
from tests.support.proxy_harness import TEAM_KEYS, RunningProxy, StartProxy
from tests.support.requests import (
    AUTH,
    BETA_AUTH,
    BOUNDED_CALL_COST,
    BOUNDED_CHAT,
    BOUNDED_USAGE,
    JSON_AUTH,
)
from tests.support.serve_process import (
    ServeProcess,
    eventually,
    ledger,
    serve_process,
    write_config,
)

HEADER = "x-proxy-budget-remaining"
MONTH = Budget("alpha", "month", Decimal("0.01"), "CNY", (Decimal(10), Decimal(50)), True)
DAY_USD = Budget("alpha", "day", Decimal("0.0001"), "USD", (Decimal(50),), False)
BETA_WEEK = Budget("beta", "week", Decimal("1"), "CNY", (Decimal(80),), False)


def worst_bounded_chat() -> Decimal:
    """`BOUNDED_CHAT`'s worst case at deepseek-flash's peak price (README, "Budgets"): its
    bytes plus the template's 1,032 tokens at 2 CNY/M of cache miss, 100 output at 8 CNY/M."""
    return ((len(orjson.dumps(BOUNDED_CHAT)) + 1032) * 2 + 100 * 8) / Decimal(1_000_000)


def report_costs(
    backend: LedgerBackend | Path, since: datetime, until: datetime, currencies: tuple[str, ...]
) -> dict[str, dict[str, str]]:
    """Each team's cost per currency over ``[since, until)`` as the report gives it, written
    as the spend API writes amounts; a team without calls is absent. `backend`: a ledger
    backend, or a SQLite ledger's file."""
    queries: Queries
    if isinstance(backend, Path):
        queries = open_sqlite(backend)
    elif backend.url is not None:
        queries = open_postgres(backend.url)
    else:
        assert backend.path is not None
        queries = open_sqlite(backend.path)
    with closing(queries):
        report = build_report(queries, TimeRange(since, until), ["team"], currencies, BEIJING)
    return {
        str(line.keys[0]): {c: decimal_text(amount) for c, amount in line.costs.items()}
        for line in report.lines
    }


async def assert_matches_report(
    answer: dict[str, Any], backend: LedgerBackend | Path, book: PriceBook
) -> None:
    """Every period of `answer` spends what the report says for its team over that period,
    and each budget spends what its period does in its currency."""
    zero = dict.fromkeys(book.currencies, "0")
    assert answer["currencies"] == list(book.currencies)
    for name, period in answer["periods"].items():
        since = datetime.fromisoformat(period["start"])
        until = datetime.fromisoformat(period["end"])
        costs = await asyncio.to_thread(report_costs, backend, since, until, book.currencies)
        assert period["spent"] == costs.get(answer["team"], zero), name
    for budget in answer["budgets"]:
        assert budget["spent"] == answer["periods"][budget["period"]]["spent"][budget["currency"]]


async def settled(proxy: RunningProxy, backend: LedgerBackend, calls: int) -> None:
    """Wait until the proxy has recorded `calls` calls and the ledger has committed them."""
    await proxy.sink.wait_for(calls)
    assert await asyncio.to_thread(backend.writer.flush, 10)


async def spend(proxy: RunningProxy, headers: dict[str, str]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=proxy.url, headers=headers) as http:
        response = await http.get("/v1/spend")
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    answer: dict[str, Any] = response.json()
    return answer


async def test_spend_api_matches_the_report(
    fake: FakeDeepSeek, book: PriceBook, start_proxy: StartProxy, ledger_backend: LedgerBackend
) -> None:
    fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(5)])
    proxy = await start_proxy(budgets=(MONTH, DAY_USD, BETA_WEEK))
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        for headers in (JSON_AUTH, JSON_AUTH, BETA_AUTH, JSON_AUTH, BETA_AUTH):
            response = await http.post("/chat/completions", json=BOUNDED_CHAT, headers=headers)
            assert response.status_code == 200
            assert HEADER not in response.headers  # headers.budget_remaining is off by default
        await settled(proxy, ledger_backend, 5)
        short = (await http.get("/spend", headers=AUTH)).json()
    alpha = await spend(proxy, AUTH)
    beta = await spend(proxy, BETA_AUTH)
    assert short == alpha
    await assert_matches_report(alpha, ledger_backend, book)
    await assert_matches_report(beta, ledger_backend, book)

    spent = 3 * BOUNDED_CALL_COST  # 0.00108 CNY: alpha's three calls, none of beta's
    usd = Decimal(alpha["periods"]["day"]["spent"]["USD"])
    assert usd > 0 and alpha["periods"]["day"]["spent"]["CNY"] == str(spent)
    nothing = {"CNY": "0", "USD": "0"}
    month = {
        "start": "2026-11-01T00:00:00+08:00",
        "end": "2026-12-01T00:00:00+08:00",
        "spent": {"CNY": str(spent), "USD": str(usd)},
        "held": nothing,  # no call running; alpha's calls are held (it has a hard budget)
    }
    assert alpha == {
        "object": "spend",
        "team": "alpha",
        "billing_timezone": "Asia/Shanghai",
        "as_of": "2026-11-02T09:30:00+08:00",  # the harness's clock: Monday, peak
        "currencies": ["CNY", "USD"],
        "periods": {
            "day": {
                **month,
                "start": "2026-11-02T00:00:00+08:00",
                "end": "2026-11-03T00:00:00+08:00",
            },
            "week": {
                **month,
                "start": "2026-11-02T00:00:00+08:00",
                "end": "2026-11-09T00:00:00+08:00",
            },
            "month": month,
        },
        "budgets": [
            {
                "period": "month",
                "currency": "CNY",
                "amount": "0.01",
                "hard": True,
                "spent": "0.00108",
                "held": "0",
                "remaining": "0.00892",
                "soft": [
                    {"percent": "10", "at": "0.001", "crossed": True},
                    {"percent": "50", "at": "0.005", "crossed": False},
                ],
                "refusing": False,
                "resets_at": "2026-12-01T00:00:00+08:00",
            },
            {
                "period": "day",
                "currency": "USD",
                "amount": "0.0001",
                "hard": False,
                "spent": str(usd),
                "held": "0",
                "remaining": decimal_text(Decimal("0.0001") - usd),
                "soft": [{"percent": "50", "at": "0.00005", "crossed": usd >= Decimal("0.00005")}],
                "refusing": False,
                "resets_at": "2026-11-03T00:00:00+08:00",
            },
        ],
    }
    # Beta sees its own two calls and nothing of alpha's; its calls hold nothing (no hard
    # budget), so what running ones may add is not known: null, not 0.
    assert beta["team"] == "beta"
    assert beta["periods"]["week"]["spent"]["CNY"] == str(2 * BOUNDED_CALL_COST)
    assert [p["held"] for p in beta["periods"].values()] == [None, None, None]
    [week] = beta["budgets"]
    assert (week["period"], week["held"], week["remaining"]) == ("week", None, "0.99928")
    assert week["soft"] == [{"percent": "80", "at": "0.8", "crossed": False}]


async def test_spend_api_needs_the_team_key(fake: FakeDeepSeek, proxy: RunningProxy) -> None:
    """The openai SDK reaches the API from its ``base_url`` (``.../v1``) with the team's key;
    without a known key, a 401 in OpenAI's shape."""
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=TEAM_KEYS["beta"], max_retries=0
    ) as api:
        answer = await api.get("/spend", cast_to=object)
        stranger = api.with_options(api_key="sk-proxy-nobody")
        with pytest.raises(openai.AuthenticationError):
            await stranger.get("/spend", cast_to=object)
    assert isinstance(answer, dict) and answer["team"] == "beta"
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        missing = await http.get("/v1/spend")
        unknown = await http.get("/spend", headers={"Authorization": "Bearer sk-proxy-nobody"})
        posted = await http.post("/v1/spend", headers=AUTH)
    for response in (missing, unknown):
        assert response.status_code == 401
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert posted.status_code == 405 and posted.headers["Allow"] == "GET, HEAD"
    assert fake.requests == []


async def test_running_calls_are_held_and_an_exhausted_budget_refuses(
    fake: FakeDeepSeek, book: PriceBook, start_proxy: StartProxy, ledger_backend: LedgerBackend
) -> None:
    """A call still running holds its worst case: with a hard budget of exactly one worst
    case, nothing remains while it runs (refusing, and the next call gets 402); once it ends,
    its real cost replaces the hold."""
    worst = worst_bounded_chat()
    budget = Budget("alpha", "day", worst, "CNY", (), True)
    fake.gate = asyncio.Event()
    fake.enqueue(Reply(usage=BOUNDED_USAGE))
    proxy = await start_proxy(budgets=(budget,))
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH, timeout=30) as http:
        running = asyncio.create_task(http.post("/chat/completions", json=BOUNDED_CHAT))
        await fake.wait_for(lambda: len(fake.requests) == 1)  # admitted, held, dispatched
        during = await spend(proxy, AUTH)
        refused = await http.post("/chat/completions", json=BOUNDED_CHAT)
        fake.gate.set()
        assert (await running).status_code == 200
        await settled(proxy, ledger_backend, 1)
        after = await spend(proxy, AUTH)
    assert refused.status_code == 402 and len(fake.requests) == 1
    [held] = during["budgets"]
    assert (held["spent"], held["held"], held["remaining"]) == ("0", str(worst), "0")
    assert held["refusing"] is True
    assert during["periods"]["day"]["held"] == {"CNY": str(worst), "USD": "0"}
    [ended] = after["budgets"]
    assert (ended["spent"], ended["held"]) == (str(BOUNDED_CALL_COST), "0")
    assert ended["remaining"] == decimal_text(worst - BOUNDED_CALL_COST)
    assert ended["refusing"] is False
    await assert_matches_report(after, ledger_backend, book)


async def test_periods_turn_at_midnight_in_beijing(
    fake: FakeDeepSeek, book: PriceBook, start_proxy: StartProxy, ledger_backend: LedgerBackend
) -> None:
    """Calls at 23:59 and 00:01 Beijing fall on either side of each boundary: Sunday 29 to
    Monday 30 November (day and week), Monday 30 November to Tuesday 1 December (day and
    month)."""
    instants = [
        datetime(2026, 11, 29, 15, 59, tzinfo=UTC),  # Sun 29 Nov 23:59 Beijing
        datetime(2026, 11, 29, 16, 1, tzinfo=UTC),  # Mon 30 Nov 00:01
        datetime(2026, 11, 30, 15, 59, tzinfo=UTC),  # Mon 30 Nov 23:59
        datetime(2026, 11, 30, 16, 1, tzinfo=UTC),  # Tue 1 Dec 00:01
    ]
    # Which calls (by index) each period holds after each call.
    expected = [
        {"day": [0], "week": [0], "month": [0]},
        {"day": [1], "week": [1], "month": [0, 1]},
        {"day": [1, 2], "week": [1, 2], "month": [0, 1, 2]},
        {"day": [3], "week": [1, 2, 3], "month": [3]},
    ]
    now = [instants[0]]
    day = Budget("alpha", "day", Decimal(1), "CNY", (), True)
    fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in instants])
    proxy = await start_proxy(budgets=(day,), clock=lambda: now[0])
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        for index, instant in enumerate(instants):
            now[0] = instant
            assert (await http.post("/chat/completions", json=BOUNDED_CHAT)).status_code == 200
            records = await proxy.sink.wait_for(index + 1)
            assert await asyncio.to_thread(ledger_backend.writer.flush, 10)
            answer = await spend(proxy, AUTH)
            await assert_matches_report(answer, ledger_backend, book)
            for period, calls in expected[index].items():
                cost = sum((records[i].costs["CNY"] for i in calls), Decimal(0))
                assert answer["periods"][period]["spent"]["CNY"] == decimal_text(cost), (
                    index,
                    period,
                )
    assert answer["periods"]["day"]["start"] == "2026-12-01T00:00:00+08:00"
    assert answer["periods"]["week"]["start"] == "2026-11-30T00:00:00+08:00"
    assert answer["budgets"][0]["resets_at"] == "2026-12-02T00:00:00+08:00"


async def test_budget_remaining_header(
    fake: FakeDeepSeek, start_proxy: StartProxy, ledger_backend: LedgerBackend
) -> None:
    """With ``headers.budget_remaining``, each metered call of a team with hard budgets says
    what every one had left when it was admitted (before its own hold): what the spend API's
    ``remaining`` said just before it."""
    day = Budget("alpha", "day", Decimal("0.005"), "CNY", (), True)
    fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(4)])
    proxy = await start_proxy(budgets=(MONTH, day), budget_remaining_header=True)
    headers = []
    remaining = []
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        for index, payload in enumerate((BOUNDED_CHAT, {**BOUNDED_CHAT, "stream": True})):
            answer = await spend(proxy, AUTH)
            remaining.append([(b["period"], b["remaining"]) for b in answer["budgets"]])
            response = await http.post("/chat/completions", json=payload)
            assert response.status_code == 200
            headers.append(response.headers[HEADER])
            await settled(proxy, ledger_backend, index + 1)
        beta = await http.post("/chat/completions", json=BOUNDED_CHAT, headers=BETA_AUTH)
    assert headers == ["month=0.01 CNY, day=0.005 CNY", "month=0.00964 CNY, day=0.00464 CNY"]
    assert [", ".join(f"{p}={r} CNY" for p, r in pairs) for pairs in remaining] == headers
    assert beta.status_code == 200 and HEADER not in beta.headers  # beta: no hard budget


async def test_every_worker_answers_alike(tmp_path: Path, book: PriceBook) -> None:
    """``serve --workers 2``: the workers share the SQLite ledger and its holds, so whichever
    worker a connection reaches answers the same figures, the report's; the header reads the
    shared holds (`proxy.budgets.LedgerHolds`)."""
    month = (
        "budgets:\n  alpha:\n"
        "    - {period: month, amount: '0.02', currency: CNY, soft: [1], hard: true}\n"
        "headers: {budget_remaining: true}\n"
    )
    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(6)])
        async with serve_process(tmp_path, fake.base_url, workers=2, extra_config=month) as serve:
            headers = []
            for _ in range(6):  # a new connection each: the kernel spreads them over workers
                async with httpx.AsyncClient(base_url=serve.url, headers=AUTH) as http:
                    response = await http.post("/chat/completions", json=BOUNDED_CHAT)
                assert response.status_code == 200
                headers.append(response.headers[HEADER])

            async def committed() -> bool:
                final = "SELECT count(*) FROM usage WHERE state = 'final'"
                rows = await asyncio.to_thread(ledger, serve.ledger, final)
                holds = await asyncio.to_thread(
                    ledger, serve.ledger, "SELECT count(*) FROM budget_holds"
                )
                return rows == [(6,)] and holds == [(0,)]

            await eventually(committed, "six calls committed and their holds dropped")
            costs = await asyncio.to_thread(
                ledger, serve.ledger, "SELECT amount FROM usage_cost WHERE currency = 'CNY'"
            )
            answers = []
            for _ in range(8):
                async with httpx.AsyncClient(base_url=serve.url, headers=AUTH) as http:
                    answers.append((await http.get("/v1/spend")).json())
    for answer in answers:
        answer.pop("as_of")  # the only figure that moves with the clock
        assert answer == answers[0]
    await assert_matches_report(answers[0], serve.ledger, book)
    [cost] = {Decimal(str(amount)) for (amount,) in costs}  # the clock is real: peak or not
    [budget] = answers[0]["budgets"]
    assert (budget["spent"], budget["held"]) == (decimal_text(6 * cost), "0")
    assert budget["remaining"] == decimal_text(Decimal("0.02") - 6 * cost)
    assert budget["soft"] == [{"percent": "1", "at": "0.0002", "crossed": True}]
    # Before call i, the i calls before it count at their cost (settled) or at their worst
    # case (still held: the client may reach the other worker before the first settles).
    for index, header in enumerate(headers):
        match = re.fullmatch(r"month=(-?[0-9.]+) CNY", header)
        assert match is not None, header
        left = Decimal(match[1])
        assert Decimal("0.02") - index * worst_bounded_chat() <= left
        assert left <= Decimal("0.02") - index * cost
    assert headers[0] == "month=0.02 CNY"


@pytest.mark.slow
async def test_a_reload_below_the_spend_shows_the_overshoot(tmp_path: Path) -> None:
    """A hard budget lowered by a reload below what was spent: ``remaining`` goes negative and
    says by how much (never clamped), the budget is ``refusing`` and the next call gets 402;
    the reload also turns the header on, which the next admitted call carries."""

    def config(amount: str, header: str) -> str:
        line = f"{{period: month, amount: '{amount}', currency: CNY, hard: true}}"
        return f"budgets:\n  alpha:\n    - {line}\nheaders: {{budget_remaining: {header}}}\n"

    async def reload(serve: ServeProcess, url: str, count: int, extra: str) -> None:
        keys = {team: [key] for team, key in TEAM_KEYS.items()}
        write_config(tmp_path, url, serve.port, extra=extra, keys=keys)
        serve.process.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return serve.log.read_text().count("reloaded ") >= count

        await eventually(reloaded, f"reload {count} in the log", timeout=15)

    async with running_fake() as fake:
        fake.enqueue(*[Reply(usage=BOUNDED_USAGE) for _ in range(2)])
        extra = config("100", "false")
        async with serve_process(tmp_path, fake.base_url, extra_config=extra) as serve:
            async with httpx.AsyncClient(base_url=serve.url, headers=AUTH) as http:
                first = await http.post("/chat/completions", json=BOUNDED_CHAT)

                async def committed() -> bool:
                    final = "SELECT count(*) FROM usage WHERE state = 'final'"
                    return await asyncio.to_thread(ledger, serve.ledger, final) == [(1,)]

                await eventually(committed, "the first call committed")
                await reload(serve, fake.base_url, 1, config("0.0001", "true"))
                [budget] = (await http.get("/v1/spend")).json()["budgets"]
                refused = await http.post("/chat/completions", json=BOUNDED_CHAT)
                await reload(serve, fake.base_url, 2, config("100", "true"))
                admitted = await http.post("/chat/completions", json=BOUNDED_CHAT)
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0
    [(cost,)] = ledger(
        serve.ledger,
        "SELECT amount FROM usage_cost WHERE request_id = ? AND currency = 'CNY'",
        first.headers["x-request-id"],
    )
    assert ledger(serve.ledger, "SELECT count(*) FROM usage") == [(2,)]
    spent = Decimal(str(cost))
    assert first.status_code == 200 and HEADER not in first.headers
    assert budget["remaining"] == decimal_text(Decimal("0.0001") - spent)
    assert budget["remaining"].startswith("-") and budget["refusing"] is True
    assert refused.status_code == 402
    assert admitted.status_code == 200
    assert admitted.headers[HEADER] == f"month={decimal_text(100 - spent)} CNY"
