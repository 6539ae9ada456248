"""What the demo prints: each call with what the ledger recorded, the spend report read from
the ledger with SQL, a sample of the metrics, and how to call the proxy yourself."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from proxy.demo.script import FLASH, TEAMS, Call
from proxy.formats import ZERO, decimal_text
from proxy.ledger.connection import connect

REPORT_HEADING = "Spend by team and model (exact decimals, read from the ledger with SQL):"


@dataclass(slots=True)
class Result:
    """What the client saw for one call."""

    call: Call
    status: int
    request_id: str | None
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


_RECORDED = """
    SELECT u.request_id, u.priced, u.tier, c.amount, u.cache_hit_tokens, u.cache_miss_tokens,
           u.output_tokens, u.reasoning_tokens, u.model_requested, u.billed_model
    FROM usage u LEFT JOIN usage_cost c ON c.request_id = u.request_id AND c.currency = 'CNY'"""


def print_calls(results: Sequence[Result], ledger: Path) -> int:
    """One line per call: its status, and the tokens, tier and cost the ledger recorded (the
    same columns whatever the call's format: that is what the proxy meters)."""
    with contextlib.closing(connect(ledger)) as db:
        recorded = {row[0]: row[1:] for row in db.execute(_RECORDED)}
    rows = []
    problems = 0
    for number, result in enumerate(results, 1):
        call = result.call
        found = recorded.get(result.request_id or "")
        priced, tier, cny, *tokens, requested, billed = found or (0, None, None, *[None] * 6)
        if result.status != 200 or not priced:
            problems += 1
        note = result.error[:200] or call.note
        if billed is not None and billed != requested:
            note += f" [billed as {billed}]"
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
                *("-" if count is None else str(count) for count in tokens),
                decimal_text(Decimal(cny)) if cny is not None else "-",
                note,
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


def print_report(ledger: Path, currencies: Sequence[str]) -> int:
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
            *(decimal_text(line.costs.get(c, ZERO)) for c in currencies),
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


def print_metrics(url: str, metrics: str) -> None:
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


def print_try_it(url: str, team_keys: dict[str, str]) -> None:
    team = TEAMS[0]
    key = team_keys[team]
    messages = [{"role": "user", "content": "Hello"}]
    chat = {"model": FLASH, "thinking": {"type": "disabled"}, "messages": messages}
    anthropic = {"model": FLASH, "max_tokens": 256, "messages": messages}
    responses = {"model": FLASH, "input": "Hello"}
    json_type = "-H 'Content-Type: application/json'"
    print(f"\nTry it: the proxy is {url}; the key of team {team} is {key}")
    print(
        f"  curl {url}/chat/completions -H 'Authorization: Bearer {key}' {json_type} "
        f"-d '{json.dumps(chat)}'"
    )
    print(
        f"  curl {url}/anthropic/v1/messages -H 'x-api-key: {key}' {json_type} "
        f"-d '{json.dumps(anthropic)}'"
    )
    print(
        f"  curl {url}/responses -H 'Authorization: Bearer {key}' {json_type} "
        f"-d '{json.dumps(responses)}'"
    )
    print(
        f"  Claude Code: ANTHROPIC_BASE_URL={url}/anthropic ANTHROPIC_AUTH_TOKEN={key} "
        f"ANTHROPIC_MODEL={FLASH} claude"
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
