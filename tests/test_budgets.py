"""Hard budgets: refused before dispatch, atomically, within the stated overshoot bound."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from proxy.budgets import BudgetGuard
from proxy.config import Budget, ConfigError, load_config
from proxy.ledger.store import SpendRow
from proxy.pricing import PriceBook
from tests.fake_deepseek import FakeDeepSeek
from tests.fake_deepseek_shapes import Reply
from tests.proxy_harness import PEAK, TEAM_KEYS, running_proxy

SHANGHAI = "Asia/Shanghai"
AUTH = {"Authorization": f"Bearer {TEAM_KEYS['alpha']}"}
USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "prompt_cache_hit_tokens": 0,
         "prompt_cache_miss_tokens": 100, "total_tokens": 120}
# At peak on deepseek-flash: 100 x 2 + 20 x 8 per million = 0.00036 CNY per call.
CALL_COST = Decimal("0.00036")
CHAT = {"model": "deepseek-flash", "max_tokens": 100,
        "messages": [{"role": "user", "content": "x" * 92}]}
# Worst case: (92 bytes + 8 per message) x 2 + 100 x 8 per million, at the dearest tier (peak).
WORST = Decimal("0.001")
MONTH = Budget("alpha", "month", Decimal("0.01"), "CNY", (Decimal(50), Decimal(80)), True)


def spent_before(amount: str) -> object:
    def read(since: date, until: date) -> list[SpendRow]:
        return [SpendRow("alpha", date(2026, 11, 1), "CNY", Decimal(amount))]
    return read


def test_worst_case_is_an_upper_bound(book: PriceBook) -> None:
    guard = BudgetGuard([MONTH], book, None, __import__("zoneinfo").ZoneInfo(SHANGHAI), 393216)
    assert guard.worst_case(CHAT, "CNY", PEAK) == WORST
    no_limit = guard.worst_case({**CHAT, "max_tokens": None}, "CNY", PEAK)
    assert no_limit == Decimal("0.0002") + 393216 * Decimal(8) / 10**6


async def test_concurrent_calls_cannot_overshoot(fake: FakeDeepSeek, book: PriceBook) -> None:
    """100 concurrent calls against a budget with 0.0045 CNY left: at most 4 worst cases fit
    at once; as calls settle to their real cost (0.00036), more are admitted, and the spend
    never passes the budget."""
    fake.enqueue(*[Reply(usage=USAGE, chunk_interval=0.02, content=["a", "b", "c"])
                   for _ in range(100)])
    async with running_proxy(fake.base_url, book, budgets=(MONTH,),
                             spend=spent_before("0.0055")) as proxy, \
            httpx.AsyncClient(base_url=proxy.url, headers=AUTH, timeout=30,
                              limits=httpx.Limits(max_connections=100)) as http:
        responses = await asyncio.gather(*(
            http.post("/chat/completions", json={**CHAT, "stream": True}) for _ in range(100)))
        records = proxy.sink.records
        refusals = proxy.registry.get_sample_value("llm_budget_refusals_total",
                                                   {"team": "alpha"})
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    assert len(admitted) + len(refused) == 100
    assert len(records) == len(admitted) == len(fake.requests)
    spent = Decimal("0.0055") + sum((r.costs["CNY"] for r in records), Decimal(0))
    assert spent <= MONTH.amount  # overshoot bound: no tool fees here, so zero
    assert len(admitted) >= 4
    assert refusals == len(refused)
    body = refused[0].json()["error"]
    assert refused[0].headers["x-should-retry"] == "false"
    assert body["code"] == "budget_exceeded" and body["type"] == "insufficient_quota"
    assert body["budget"]["team"] == "alpha" and body["budget"]["period"] == "month"
    assert body["budget"]["budget"] == "0.01" and body["budget"]["currency"] == "CNY"
    assert body["budget"]["resets_at"] == "2026-12-01T00:00:00+08:00"
    assert "team 'alpha' has spent" in body["message"]


async def test_failed_calls_release_their_reservation(fake: FakeDeepSeek, book: PriceBook
                                                     ) -> None:
    budget = Budget("alpha", "day", Decimal("0.0015"), "CNY", (), True)
    fake.enqueue(Reply(status=500), Reply(status=500), Reply(usage=USAGE))
    async with running_proxy(fake.base_url, book, budgets=(budget,)) as proxy, \
            httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        statuses = [(await http.post("/chat/completions", json=CHAT)).status_code
                    for _ in range(4)]
    # Each call needs 0.001 held; errors give it back, the success keeps 0.00036, and the
    # fourth (0.00036 + 0.001 <= 0.0015) still fits.
    assert statuses == [500, 500, 200, 200]
    assert len(proxy.sink.records) == 4


async def test_unpriced_model_is_refused_for_a_hard_budget(fake: FakeDeepSeek, book: PriceBook
                                                           ) -> None:
    async with running_proxy(fake.base_url, book, budgets=(MONTH,)) as proxy, \
            httpx.AsyncClient(base_url=proxy.url) as http:
        refused = await http.post("/chat/completions", json={**CHAT, "model": "gpt-4o"},
                                  headers=AUTH)
        other_team = await http.post(
            "/chat/completions", json={**CHAT, "model": "gpt-4o"},
            headers={"Authorization": f"Bearer {TEAM_KEYS['beta']}"})
    assert refused.status_code == 402
    assert "has no price" in refused.json()["error"]["message"]
    assert other_team.status_code == 200  # beta has no hard budget
    assert len(fake.requests) == 1


async def test_budget_state_unreadable_fails_closed(fake: FakeDeepSeek, book: PriceBook) -> None:
    def broken(since: date, until: date) -> list[SpendRow]:
        raise OSError("disk gone")

    async with running_proxy(fake.base_url, book, budgets=(MONTH,), spend=broken) as proxy, \
            httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        response = await http.post("/chat/completions", json=CHAT)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "budget_unavailable"
    assert fake.requests == []


async def test_new_period_starts_from_the_ledger(fake: FakeDeepSeek, book: PriceBook) -> None:
    now = [datetime(2026, 11, 30, 15, 59, tzinfo=UTC)]  # 23:59 on Nov 30 in Beijing
    reads: list[tuple[date, date]] = []

    def ledger(since: date, until: date) -> list[SpendRow]:
        reads.append((since, until))
        return [SpendRow("alpha", since, "CNY", Decimal("0.0095"))] if since.month == 11 else []

    async with running_proxy(fake.base_url, book, budgets=(MONTH,), spend=ledger,
                             clock=lambda: now[0]) as proxy, \
            httpx.AsyncClient(base_url=proxy.url, headers=AUTH) as http:
        late = await http.post("/chat/completions", json=CHAT)
        now[0] = datetime(2026, 11, 30, 16, 0, tzinfo=UTC)  # December in Beijing
        early = await http.post("/chat/completions", json=CHAT)
    assert (late.status_code, early.status_code) == (402, 200)
    assert late.json()["error"]["budget"]["resets_at"] == "2026-12-01T00:00:00+08:00"
    assert (date(2026, 12, 1), date(2026, 12, 1)) in reads


async def test_budget_metrics(fake: FakeDeepSeek, book: PriceBook) -> None:
    soft = Budget("beta", "week", Decimal("70"), "USD", (Decimal("50"), Decimal("87.5")), False)
    async with running_proxy(fake.base_url, book, budgets=(MONTH, soft)) as proxy:
        get = proxy.registry.get_sample_value
        assert get("llm_team_budget", {"team": "alpha", "period": "month",
                                       "currency": "CNY"}) == 0.01
        assert get("llm_team_budget_threshold", {"team": "alpha", "period": "month",
                                                 "currency": "CNY", "threshold": "80"}) == 0.008
        assert get("llm_team_budget_threshold", {"team": "beta", "period": "week",
                                                 "currency": "USD",
                                                 "threshold": "87.5"}) == 61.25
        assert get("llm_holiday_calendar_missing", {"schedule": "peak-hours"}) == 0
        assert get("llm_holiday_calendar_missing", {"schedule": "night-discount"}) == 0


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("budgets: {gamma: [{period: day, amount: 1, currency: CNY}]}", "budgets.gamma",
     "not a team defined under 'teams'"),
    ("budgets: {a: [{period: year, amount: 1, currency: CNY}]}", "budgets.a[0].period",
     "expected day, week or month, got 'year'"),
    ("budgets: {a: [{period: day, amount: -1, currency: CNY}]}", "budgets.a[0].amount",
     "must be positive"),
    ("budgets: {a: [{period: day, amount: 1, currency: CNY, soft: [120]}]}",
     "budgets.a[0].soft", "percentages must lie between 0 and 100"),
    ("budgets: {a: [{period: day, amount: 1, currency: CNY, hard: yes please}]}",
     "budgets.a[0].hard", "expected true or false"),
    ("budgets: {a: [{period: day, amount: 1, currency: CNY}, {period: day, amount: 2, "
     "currency: USD}]}", "budgets.a[1].period", "already has a day budget"),
])
def test_budget_config_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("pricing: {book: [book.yaml]}\nteams:\n  a:\n    keys: ['sha256:"
                    + "ab" * 32 + "']\n" + text + "\n", encoding="utf-8")
    (tmp_path / "book.yaml").write_text("currencies: [CNY]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.key, reason in info.value.reason) == (key, True)


def test_budget_config_parses(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("pricing: {book: [book.yaml]}\nteams:\n  a:\n    keys: ['sha256:"
                    + "ab" * 32 + "']\nbudgets:\n  a:\n    - {period: month, amount: 500.50, "
                    "currency: cny, soft: [80, 50], hard: true}\n", encoding="utf-8")
    (tmp_path / "book.yaml").write_text("currencies: [CNY]\n")
    [budget] = load_config(path).budgets
    assert budget == Budget("a", "month", Decimal("500.50"), "CNY",
                            (Decimal(50), Decimal(80)), True)
    assert json.dumps(str(budget.amount)) == '"500.50"'
