"""Hard budgets: refused before dispatch, atomically, within the stated overshoot bound, and
still useful when many calls run at once (`default_max_tokens`, ``lower_max_tokens``)."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, date, datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import httpx
import orjson

from proxy.budgets import MIN_LOWERED_OUTPUT
from proxy.config import Budget, TeamPolicy
from proxy.ledger.store import SpendRow
from proxy.pricing import PriceBook
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import Reply
from tests.support.proxy_harness import TEAM_KEYS, RunningProxy, StartProxy
from tests.support.requests import BOUNDED_CALL_COST, BOUNDED_CHAT, BOUNDED_USAGE, JSON_AUTH

TEMPLATE = 1024 + 8  # the bound's per-call headroom and one message (proxy/bounds.py)
# Peak prices per million tokens (config/pricing/deepseek.yaml): cache miss, output.
FLASH = (Decimal(2), Decimal(8))
PRO = (Decimal(9), Decimal(27))
MAX_OUTPUT = 393_216
MONTH = Budget("alpha", "month", Decimal("0.01"), "CNY", (Decimal(50), Decimal(80)), True)


def body(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload)


def worst(payload: dict[str, Any], rates: tuple[Decimal, Decimal], output: int) -> Decimal:
    """The README's worst case, computed here from its words: every byte of the body plus the
    template's tokens at the cache-miss price, and `output` tokens at the output price."""
    return ((len(body(payload)) + TEMPLATE) * rates[0] + output * rates[1]) / 1_000_000


def spent_before(amount: str) -> Any:
    def read(since: date, until: date) -> list[SpendRow]:
        return [SpendRow("alpha", date(2026, 11, 1), "CNY", Decimal(amount))]

    return read


async def post_all(
    proxy: RunningProxy, payload: dict[str, Any], count: int
) -> list[httpx.Response]:
    """`count` identical calls at once, each on its own connection."""
    async with httpx.AsyncClient(
        base_url=proxy.url,
        headers=JSON_AUTH,
        timeout=60,
        limits=httpx.Limits(max_connections=count),
    ) as http:
        return await asyncio.gather(
            *(http.post("/chat/completions", content=body(payload)) for _ in range(count))
        )


async def test_concurrent_calls_cannot_overshoot(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """100 concurrent calls against a budget with 0.009 CNY left: only as many worst cases fit
    at once as the budget allows; as calls settle to their real cost (0.00036), more are
    admitted, and the spend never passes the budget."""
    budget = Budget("alpha", "month", Decimal("0.015"), "CNY", (), True)
    fake.enqueue(
        *[
            Reply(usage=BOUNDED_USAGE, chunk_interval=0.02, content=["a", "b", "c"])
            for _ in range(100)
        ]
    )
    payload = {**BOUNDED_CHAT, "stream": True}
    proxy = await start_proxy(budgets=(budget,), spend=spent_before("0.006"))
    responses = await post_all(proxy, payload, 100)
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    records = await proxy.sink.wait_for(len(admitted))
    refusals = proxy.registry.get_sample_value("llm_budget_refusals_total", {"team": "alpha"})
    assert len(admitted) + len(refused) == 100
    assert len(records) == len(admitted) == len(fake.requests)
    spent = Decimal("0.006") + sum((r.costs["CNY"] for r in records), Decimal(0))
    assert spent <= budget.amount  # overshoot bound: no tool fees here, so zero
    at_once = int(Decimal("0.009") / worst(payload, FLASH, 100))
    assert at_once == 2 and len(admitted) >= at_once
    assert refusals == len(refused)
    error = refused[0].json()["error"]
    assert refused[0].headers["x-should-retry"] == "false"
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
    assert error["budget"]["team"] == "alpha" and error["budget"]["period"] == "month"
    assert error["budget"]["budget"] == "0.015" and error["budget"]["currency"] == "CNY"
    assert error["budget"]["resets_at"] == "2026-12-01T00:00:00+08:00"
    assert error["budget"]["call_worst_case"] == str(worst(payload, FLASH, 100))
    assert "team 'alpha' has spent" in error["message"]


async def test_failed_calls_release_their_reservation(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    one = worst(BOUNDED_CHAT, FLASH, 100)
    budget = Budget("alpha", "day", one + BOUNDED_CALL_COST, "CNY", (), True)
    fake.enqueue(Reply(status=500), Reply(status=500), Reply(usage=BOUNDED_USAGE))
    proxy = await start_proxy(budgets=(budget,))
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        statuses = [
            (await http.post("/chat/completions", content=body(BOUNDED_CHAT))).status_code
            for _ in range(5)
        ]
    # Each call needs `one` held; errors give it back, the success keeps 0.00036, and the
    # fourth (0.00036 + one <= budget) still fits; the fifth does not.
    assert statuses == [500, 500, 200, 200, 402]
    assert len(await proxy.sink.wait_for(4)) == 4


async def test_unpriced_model_is_refused_with_403_not_402(
    fake: FakeDeepSeek, book: PriceBook, start_proxy: StartProxy
) -> None:
    """A model the book cannot price is no money matter: 403, saying so."""
    proxy = await start_proxy(budgets=(MONTH,))
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        refused = await http.post(
            "/chat/completions", json={**BOUNDED_CHAT, "model": "gpt-4o"}, headers=JSON_AUTH
        )
        other_team = await http.post(
            "/chat/completions",
            json={**BOUNDED_CHAT, "model": "gpt-4o"},
            headers={"Authorization": f"Bearer {TEAM_KEYS['beta']}"},
        )
    assert refused.status_code == 403
    assert refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert error["code"] == "model_not_priced"
    assert "'gpt-4o' has no price" in error["message"]
    assert other_team.status_code == 200  # beta has no hard budget
    assert len(fake.requests) == 1
    assert proxy.registry.get_sample_value("llm_budget_refusals_total", {"team": "alpha"}) == 0


async def test_budget_state_unreadable_fails_closed(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    def broken(since: date, until: date) -> list[SpendRow]:
        raise OSError("disk gone")

    proxy = await start_proxy(budgets=(MONTH,), spend=broken)
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        response = await http.post("/chat/completions", json=BOUNDED_CHAT)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "budget_unavailable"
    assert fake.requests == []


async def test_new_period_starts_from_the_ledger(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    now = [datetime(2026, 11, 30, 15, 59, tzinfo=UTC)]  # 23:59 on Nov 30 in Beijing
    reads: list[tuple[date, date]] = []

    def ledger(since: date, until: date) -> list[SpendRow]:
        reads.append((since, until))
        return [SpendRow("alpha", since, "CNY", Decimal("0.0095"))] if since.month == 11 else []

    proxy = await start_proxy(budgets=(MONTH,), spend=ledger, clock=lambda: now[0])
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        late = await http.post("/chat/completions", json=BOUNDED_CHAT)
        now[0] = datetime(2026, 11, 30, 16, 0, tzinfo=UTC)  # December in Beijing
        early = await http.post("/chat/completions", json=BOUNDED_CHAT)
    assert (late.status_code, early.status_code) == (402, 200)
    assert late.json()["error"]["budget"]["resets_at"] == "2026-12-01T00:00:00+08:00"
    assert (date(2026, 12, 1), date(2026, 12, 1)) in reads


# --- a hard budget covers the whole prompt --------------------------------------------------


async def test_tool_schemas_count_against_a_hard_budget(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """The attack that spent 92 CNY of a 1 CNY budget: 400 KiB of tool schema per call and
    ``max_tokens: 1``, 100 calls at once. DeepSeek bills the schema as prompt (about 0.1 CNY a
    call here, half of it a cache hit), so the worst case must count it: one call fits at a
    time."""
    schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "description": "d" * 80} for i in range(3350)},
    }
    payload = {
        "model": "deepseek-flash",
        "max_tokens": 1,
        "stream": True,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert len(body(payload)) > 400 * 1024
    budget = Budget("alpha", "month", Decimal(1), "CNY", (), True)
    fake.enqueue(*[Reply(content=["a"], keepalive=1, keepalive_interval=2) for _ in range(100)])
    proxy = await start_proxy(budgets=(budget,))
    responses = await post_all(proxy, payload, 100)
    records = await proxy.sink.wait_for(1)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 1 and statuses.count(402) == 99
    [record] = records
    assert record.prompt_tokens is not None and record.prompt_tokens > 100_000
    assert record.costs["CNY"] > Decimal("0.1")  # what the schema really cost
    assert record.costs["CNY"] <= budget.amount
    # the worst case held: every byte, the template (one message, one tool, the tool
    # preamble), one output token
    held = ((len(body(payload)) + 1024 + 8 * 2 + 256) * FLASH[0] + FLASH[1]) / 1_000_000
    refused = responses[statuses.index(402)].json()["error"]["budget"]
    assert refused["call_worst_case"] == str(held)


# --- hard budgets stay useful under concurrency ---------------------------------------------

PRO_STREAM = {
    "model": "deepseek-v4-pro",
    "stream": True,
    "messages": [{"role": "user", "content": "hello"}],
}
"""No max_tokens: a worst case of DeepSeek's maximum output (10.6 CNY at the peak price)."""
HELD = 2.0  # seconds each call stays in flight, so all 100 overlap


def budget_500() -> Budget:
    return Budget("alpha", "month", Decimal(500), "CNY", (), True)


async def run_100(
    fake: FakeDeepSeek, start_proxy: StartProxy, policy: TeamPolicy, spent: str
) -> tuple[list[httpx.Response], RunningProxy]:
    fake.enqueue(
        *[Reply(content=["a", "b"], keepalive=1, keepalive_interval=HELD) for _ in range(100)]
    )
    proxy = await start_proxy(
        budgets=(budget_500(),), spend=spent_before(spent), policies={"alpha": policy}
    )
    responses = await post_all(proxy, PRO_STREAM, 100)
    await proxy.sink.wait_for(sum(r.status_code == 200 for r in responses))
    spend = Decimal(spent) + sum((r.costs["CNY"] for r in proxy.sink.records), Decimal(0))
    assert spend <= Decimal(500)  # the overshoot bound of every policy: zero without tool fees
    return responses, proxy


async def test_refuse_policy_reserves_the_maximum_output(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """The default keeps the promise at the price of throughput: with nothing spent, only
    floor(500 / 10.6) calls without max_tokens can run at once."""
    responses, _ = await run_100(fake, start_proxy, TeamPolicy(), "0")
    one = worst(PRO_STREAM, PRO, MAX_OUTPUT)
    assert Decimal("10.6") < one < Decimal("10.7")
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == int(Decimal(500) / one) == 47
    assert statuses.count(402) == 53


async def test_default_max_tokens_admits_every_call(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """With default_max_tokens the worst case is real: all 100 run at once, each sent to
    DeepSeek with max_tokens 4096 and told so in a header."""
    responses, _ = await run_100(fake, start_proxy, TeamPolicy(default_max_tokens=4096), "0")
    assert [r.status_code for r in responses] == [200] * 100
    assert {r.headers["x-proxy-max-tokens"] for r in responses} == {"4096"}
    assert {json.loads(r.body)["max_tokens"] for r in fake.requests} == {4096}


async def test_default_max_tokens_near_the_limit(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """1 CNY left: exactly as many 4096-token worst cases as fit run; the rest get 402."""
    responses, _ = await run_100(fake, start_proxy, TeamPolicy(default_max_tokens=4096), "499")
    one = worst(PRO_STREAM, PRO, 4096)  # the client's body: what it asked for is the prompt
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == int(1 / one) == 8


async def test_lower_max_tokens_admits_what_the_budget_can_pay(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """1 CNY left and ``lower_max_tokens``: eight 4096-token calls fit whole; the ninth is
    admitted with max_tokens lowered to what is left; the rest are refused (too few tokens
    would be left to be worth sending)."""
    policy = TeamPolicy(default_max_tokens=4096, over_budget="lower_max_tokens")
    responses, _ = await run_100(fake, start_proxy, policy, "499")
    full = worst(PRO_STREAM, PRO, 4096)
    left = 1 - 8 * full
    prompt = len(body(PRO_STREAM)) + TEMPLATE
    lowered = int(((left * 1_000_000 - PRO[0] * prompt) / PRO[1]).to_integral_value(ROUND_FLOOR))
    assert MIN_LOWERED_OUTPUT <= lowered < 4096
    admitted = sorted(
        int(r.headers["x-proxy-max-tokens"]) for r in responses if r.status_code == 200
    )
    assert admitted == [lowered] + [4096] * 8
    assert sorted(json.loads(r.body)["max_tokens"] for r in fake.requests) == admitted
    assert [r.status_code for r in responses].count(402) == 91


async def test_lower_max_tokens_without_a_default(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    """No default and ``lower_max_tokens``: the first call takes what the budget can pay."""
    responses, _ = await run_100(
        fake, start_proxy, TeamPolicy(over_budget="lower_max_tokens"), "499"
    )
    prompt = len(body(PRO_STREAM)) + TEMPLATE
    lowered = int((1_000_000 - PRO[0] * prompt) / PRO[1])
    assert [r.headers.get("x-proxy-max-tokens") for r in responses if r.status_code == 200] == [
        str(lowered)
    ]


async def test_refusal_names_the_currency_of_every_amount(
    fake: FakeDeepSeek, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(budgets=(budget_500(),), spend=spent_before("499.5"))
    async with httpx.AsyncClient(base_url=proxy.url, headers=JSON_AUTH) as http:
        response = await http.post("/chat/completions", content=body(PRO_STREAM))
    message = response.json()["error"]["message"]
    one = worst(PRO_STREAM, PRO, MAX_OUTPUT)
    assert message == (
        f"team 'alpha' has spent 499.5 CNY of its 500 CNY month budget "
        f"(0 CNY held by running calls; this call could cost up to {one} CNY); "
        "the budget resets at 2026-12-01T00:00:00+08:00"
    )
    amounts = re.sub(r"resets at \S+", "", message)
    assert re.findall(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.]| CNY)", amounts) == []


async def test_budget_metrics(fake: FakeDeepSeek, start_proxy: StartProxy) -> None:
    soft = Budget("beta", "week", Decimal("70"), "USD", (Decimal("50"), Decimal("87.5")), False)
    proxy = await start_proxy(budgets=(MONTH, soft))
    get = proxy.registry.get_sample_value
    assert get("llm_team_budget", {"team": "alpha", "period": "month", "currency": "CNY"}) == 0.01
    assert (
        get(
            "llm_team_budget_threshold",
            {"team": "alpha", "period": "month", "currency": "CNY", "threshold": "80"},
        )
        == 0.008
    )
    assert (
        get(
            "llm_team_budget_threshold",
            {"team": "beta", "period": "week", "currency": "USD", "threshold": "87.5"},
        )
        == 61.25
    )
    assert get("llm_holiday_calendar_missing", {"schedule": "peak-hours"}) == 0
    assert get("llm_holiday_calendar_missing", {"schedule": "night-discount"}) == 0
