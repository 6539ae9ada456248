"""``python -m proxy demo``: the whole path runs with no key, every call is priced, the report
adds up exactly and is the same on every run; and the simulated DeepSeek it uses keeps
DeepSeek's shapes.

The command is driven in-process through its own `register` (the lead wires it into
``proxy.cli``), twice, each run with its own ledger.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from proxy.demo import report, run, script
from proxy.demo.simulated_deepseek import CACHE_UNIT_TOKENS, SimulatedDeepSeek, count_tokens

CALL_LINE = re.compile(
    r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(yes|no)\s+"
    r"\w{3} \d\d-\d\d \d\d:\d\d\s+(\d{3})\s+(\S+)\s"
)


def _demo(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    run.register(parser.add_subparsers())
    args = parser.parse_args(["demo", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code: int = args.handler(args)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path]]:
    """Two complete demo runs, each with its own fresh ledger."""
    results = []
    for name in ("first", "second"):
        ledger = tmp_path_factory.mktemp(name) / "l.sqlite3"
        code, out = _demo("--exit", "--ledger", str(ledger))
        assert code == 0, out
        results.append((out, ledger))
    return results


def _section(out: str, heading: str) -> list[str]:
    """The lines after `heading` up to the next blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].strip())
    return lines[start + 1 : end]


def _report(out: str) -> tuple[list[str], list[list[str]], list[str]]:
    """The report's header, rows and total row, split into cells."""
    lines = [line.split() for line in _section(out, report.REPORT_HEADING)]
    header = lines[0]
    total = next(line for line in lines if line[0] == "total")
    return header, lines[1 : lines.index(total)], total


def test_every_scripted_call_succeeds(runs: list[tuple[str, Path]]) -> None:
    out, _ = runs[0]
    calls = [CALL_LINE.match(line) for line in _section(out, "Calls")[1:]]
    assert len(calls) == len(script.SCRIPT) >= 12
    assert all(match is not None and match.group(6) == "200" for match in calls), out
    tiers = {match.group(7) for match in calls if match is not None}
    assert tiers == {"peak", "off_peak"}


def test_report_total_is_the_exact_sum_of_its_rows(runs: list[tuple[str, Path]]) -> None:
    header, rows, total = _report(runs[0][0])
    assert header[:7] == ["team", "model", "requests", "hit", "miss", "output", "reasoning"]
    assert header[7:] == ["CNY", "USD"]
    assert {(row[0], row[1]) for row in rows} >= {
        ("search", "deepseek-flash"),
        ("research", "deepseek-v4-pro"),
    }
    for column in range(2, 7):
        assert sum(int(row[column]) for row in rows) == int(total[column])
    for column in (7, 8):
        amounts = [Decimal(row[column]) for row in rows]
        assert all(amount > 0 for amount in amounts)
        assert sum(amounts, Decimal(0)) == Decimal(total[column])
    assert int(total[2]) == len(script.SCRIPT)


def test_ledger_has_every_call_priced_in_both_tiers(runs: list[tuple[str, Path]]) -> None:
    with contextlib.closing(sqlite3.connect(runs[0][1])) as db:
        rows = db.execute(
            "SELECT state, outcome, usage_source, priced, tier, endpoint, "
            "cache_hit_tokens, reasoning_tokens FROM usage"
        ).fetchall()
        costs = db.execute("SELECT COUNT(*) FROM usage_cost").fetchone()[0]
    assert len(rows) == len(script.SCRIPT)
    assert {row[:4] for row in rows} == {("final", "complete", "reported", 1)}
    assert {row[4] for row in rows} == {"peak", "off_peak"}
    assert costs == 2 * len(rows)  # CNY and USD for every call
    assert {row[5] for row in rows} == {"chat", "fim", "messages", "responses"}
    assert any(row[6] > 0 for row in rows), "the repeated prompt should hit the cache"
    assert any(row[7] > 0 for row in rows), "the thinking calls should report reasoning"
    for endpoint in ("messages", "responses"):  # each other format hits the cache too
        assert any(row[5] == endpoint and row[6] > 0 for row in rows), endpoint
    assert any(row[5] == "responses" and row[7] > 0 for row in rows)


def test_the_other_formats_are_metered_exactly(runs: list[tuple[str, Path]]) -> None:
    """The Anthropic-format calls: a claude name billed as deepseek-flash at Monday's peak rates
    (CNY 0.04 / 2 / 8 per million); the Responses call: reasoning inside output, billed once."""
    with contextlib.closing(sqlite3.connect(runs[0][1])) as db:
        rows = db.execute(
            "SELECT u.model_requested, u.billed_model, u.tier, u.cache_hit_tokens, "
            "u.cache_miss_tokens, u.output_tokens, u.reasoning_tokens, c.amount FROM usage u "
            "JOIN usage_cost c ON c.request_id = u.request_id AND c.currency = 'CNY' "
            "WHERE u.endpoint = ? ORDER BY u.started_at",
            ("messages",),
        ).fetchall()
    assert len(rows) == 2
    for requested, billed, tier, hit, miss, output, reasoning, cny in rows:
        assert (requested, billed, tier, reasoning) == (
            "claude-sonnet-4-5",
            "deepseek-flash",
            "peak",
            0,
        )
        expected = (Decimal("0.04") * hit + 2 * miss + 8 * output) / 1_000_000
        assert Decimal(cny) == expected
    assert rows[0][3] == 0 and rows[1][3] > 0  # the second call hits the first one's prefix


def test_metrics_sample_is_printed(runs: list[tuple[str, Path]]) -> None:
    out, _ = runs[0]
    assert re.search(r"curl http://127\.0\.0\.1:\d+/metrics", out)
    samples = [line for line in out.splitlines() if line.strip().startswith("llm_cost_total{")]
    assert samples
    assert all(float(line.rsplit(" ", 1)[1]) > 0 for line in samples)
    assert re.search(
        r"curl http://127\.0\.0\.1:\d+/chat/completions -H 'Authorization: "
        r"Bearer sk-proxy-",
        out,
    )


def test_calls_and_report_are_identical_on_two_runs(runs: list[tuple[str, Path]]) -> None:
    (first, _), (second, _) = runs
    for heading in ("Calls", report.REPORT_HEADING):
        assert _section(first, heading) == _section(second, heading)


def test_refuses_an_existing_ledger(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    ledger.write_bytes(b"")
    code, _ = _demo("--exit", "--ledger", str(ledger))
    assert code == 2
    assert ledger.read_bytes() == b""


def test_simulated_cache_hits_come_in_64_token_units() -> None:
    simulated = SimulatedDeepSeek("sk-unused")
    prompt = "x" * 700  # 175 tokens: two whole 64-token units
    first = simulated.usage("deepseek-flash", prompt, "answer", "")
    again = simulated.usage("deepseek-flash", prompt + " and more", "answer", "")
    other_model = simulated.usage("deepseek-v4-pro", prompt, "answer", "")
    assert first["prompt_tokens"] == count_tokens(prompt) == 176
    assert first["prompt_cache_hit_tokens"] == 0
    assert again["prompt_cache_hit_tokens"] == 2 * CACHE_UNIT_TOKENS
    assert again["prompt_tokens_details"]["cached_tokens"] == 2 * CACHE_UNIT_TOKENS
    assert (
        again["prompt_cache_hit_tokens"] + again["prompt_cache_miss_tokens"]
        == again["prompt_tokens"]
    )
    assert other_model["prompt_cache_hit_tokens"] == 0


async def test_simulated_deepseek_checks_the_key_and_streams_like_deepseek() -> None:
    simulated = SimulatedDeepSeek("sk-simulated-right")
    url = await simulated.start()
    body = {
        "model": "deepseek-flash",
        "messages": [{"role": "user", "content": "Why?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            refused = await client.post(
                "/chat/completions", json=body, headers={"Authorization": "Bearer sk-wrong-abcd"}
            )
            answer = await client.post(
                "/chat/completions",
                json=body,
                headers={"Authorization": "Bearer sk-simulated-right"},
            )
    finally:
        await simulated.close()
    assert refused.status_code == 401
    assert "****abcd" in refused.json()["error"]["message"]
    events = answer.text.split("\n\n")
    assert events[0] == ": keep-alive"
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[1:-2]]
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0  # thinking default
    assert any(chunk["choices"][0]["delta"].get("reasoning_content") for chunk in chunks)


async def test_the_simulated_formats_read_in_the_real_sdks() -> None:
    """The simulation's Anthropic and Responses answers, streamed and not, are what the
    ``anthropic`` and ``openai`` SDKs parse: the same usage either way."""
    simulated = SimulatedDeepSeek("sk-simulated-right")
    url = await simulated.start()
    messages: list[Any] = [{"role": "user", "content": "Why is the sky blue?"}]
    try:
        async with anthropic.AsyncAnthropic(
            base_url=url + "/anthropic", api_key="sk-simulated-right", max_retries=0
        ) as claude:
            whole = await claude.messages.create(
                model="claude-sonnet-4-5", max_tokens=64, messages=messages
            )
            async with claude.messages.stream(
                model="claude-sonnet-4-5", max_tokens=64, messages=messages
            ) as stream:
                streamed = await stream.get_final_message()
        async with openai.AsyncOpenAI(
            base_url=url, api_key="sk-simulated-right", max_retries=0
        ) as client:
            response = await client.responses.create(model="deepseek-flash", input="Why?")
            events = await client.responses.create(
                model="deepseek-flash", input="Why?", stream=True
            )
            completed = [e async for e in events if e.type == "response.completed"]
    finally:
        await simulated.close()
    assert whole.content[0].text == streamed.content[0].text  # type: ignore[union-attr]
    assert whole.usage.output_tokens == streamed.usage.output_tokens > 0
    assert streamed.usage.cache_read_input_tokens == 0  # a short prompt: no whole cache unit
    assert response.output_text.startswith("Simulated answer")
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens > 0
    [done] = completed
    assert done.response.usage == response.usage
