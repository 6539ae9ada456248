"""``reprice``: the ledger of `tests.integration.test_report` priced again with a corrected book.

The corrected book is the shipped one plus three entries, all before the rows they touch:

- deepseek-flash, flat from 2026-10-25: CNY 0.01 / 0.5 / 2, USD 0.0015 / 0.075 / 0.3
  (r1: 0.0001 + 0.001 + 0.001 = 0.0021 CNY, 0.000015 + 0.00015 + 0.00015 = 0.000315 USD;
  r2: 0.0005 + 0.002 + 0.01 search = 0.0125 CNY, 0.000075 + 0.0003 + 0.0015 = 0.001875 USD);
- deepseek-next, new, flat: CNY 1 / 2 / 3, USD 0.1 / 0.2 / 0.3
  (r5, unpriced before: 0.0002 + 0.00003 = 0.00023 CNY, 0.00002 + 0.000003 = 0.000023 USD);
- deepseek-v4-pro retired from 2026-11-02T02:30Z: r4 (03:00Z) becomes unpriced, r3 (02:00Z)
  keeps its price.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook, load_price_book
from tests.conftest import SHIPPED_BOOK
from tests.support.ledger_rows import record, report_json, run, write_config

PRO_ANCHOR = (
    "      note: Today's page lists these rates (DeepSeek-V4-Pro-0813); the start "
    "instant is third-party.\n"
)
FLASH_ANCHOR = "      note: Prices as on DeepSeek's page; the launch instant is third-party.\n"
PRO_RETIRED = """\
    - from: 2026-11-02T02:30:00Z
      retired: requests with this name fail upstream
      source: https://example.com/retired
      confidence: unverified
"""
FLASH_CORRECTED = """\
    - from: 2026-10-25T00:00:00Z
      label: corrected flat price
      rates: {CNY: 0.01 / 0.5 / 2, USD: 0.0015 / 0.075 / 0.3}
      source: https://example.com/corrected
      confidence: unverified

  deepseek-next:
    - from: 2026-10-01T00:00:00Z
      label: a model the first book missed
      rates: {CNY: 1 / 2 / 3, USD: 0.1 / 0.2 / 0.3}
      source: https://example.com/next
      confidence: unverified
"""
FLASH_VERSION = "deepseek-flash@2026-09-10T04:00:00Z"
PRO_VERSION = "deepseek-v4-pro@2026-08-16T16:00:00Z"


OPUS_ANCHOR = "  claude*:\n"
OPUS_RETIRED = """\
    - from: 2026-11-02T02:30:00Z
      retired: deepseek-v4-pro, which these names were billed as, is retired
      source: https://example.com/retired
      confidence: unverified
"""
"""The book refuses a name pattern billed as a retired model: the claude-opus* pattern retires
with deepseek-v4-pro (inserted as the last entry of its list, just before ``claude*``)."""


def corrected_text() -> str:
    text = SHIPPED_BOOK.read_text(encoding="utf-8")
    assert text.count(PRO_ANCHOR) == 1 and text.count(FLASH_ANCHOR) == 1
    assert text.count(OPUS_ANCHOR) == 1
    return (
        text.replace(PRO_ANCHOR, PRO_ANCHOR + PRO_RETIRED)
        .replace(FLASH_ANCHOR, FLASH_ANCHOR + FLASH_CORRECTED)
        .replace(OPUS_ANCHOR, OPUS_RETIRED + OPUS_ANCHOR)
    )


@pytest.fixture
def corrected(ledger_config: Path) -> Path:
    """The sample ledger (priced with the shipped book), its config now naming the new book."""
    (ledger_config.parent / "book.yaml").write_text(corrected_text(), encoding="utf-8")
    return ledger_config


@pytest.fixture
def new_book(corrected: Path) -> PriceBook:
    return load_price_book([corrected.parent / "book.yaml"])


def query(ledger_config: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(ledger_config.parent / "ledger.sqlite3")) as conn:
        return conn.execute(sql).fetchall()


def snapshot(ledger_config: Path) -> dict[str, list[tuple[object, ...]]]:
    tables = ("usage", "usage_cost", "cost_history", "spend_daily")
    return {t: query(ledger_config, f"SELECT * FROM {t} ORDER BY 1, 2, 3") for t in tables}  # noqa: S608


def spend(ledger_config: Path) -> list[tuple[object, ...]]:
    return query(ledger_config, "SELECT * FROM spend_daily ORDER BY team, day, currency")


EXPECTED_DIFF = [
    [
        "team",
        "model",
        "rows",
        "changed",
        "now_priced",
        "now_unpriced",
        "old_CNY",
        "new_CNY",
        "delta_CNY",
        "old_USD",
        "new_USD",
        "delta_USD",
    ],
    [
        "alpha",
        "deepseek-flash",
        "2",
        "2",
        "0",
        "0",
        "0.0192",
        "0.0146",
        "-0.0046",
        "0.00288",
        "0.00219",
        "-0.00069",
    ],
    [
        "beta",
        "deepseek-next",
        "1",
        "1",
        "1",
        "0",
        "0",
        "0.00023",
        "+0.00023",
        "0",
        "0.000023",
        "+0.000023",
    ],
    [
        "beta",
        "deepseek-v4-pro",
        "2",
        "1",
        "0",
        "1",
        "0.01704",
        "0.012",
        "-0.00504",
        "0.0024992",
        "0.00176",
        "-0.0007392",
    ],
    [
        "TOTAL",
        "5",
        "4",
        "1",
        "1",
        "0.03624",
        "0.02683",
        "-0.00941",
        "0.0053792",
        "0.003973",
        "-0.0014062",
    ],
]


def diff_cells(out: str) -> list[list[str]]:
    """The diff table's cells (the TOTAL line has no model, so one cell fewer)."""
    return [line.split() for line in out.splitlines()[1:-1]]


def test_dry_run_prints_the_difference_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], corrected: Path, new_book: PriceBook
) -> None:
    before = snapshot(corrected)
    code, out, err = run(capsys, "reprice", "--config", str(corrected))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == (
        f"5 row(s) with usage in range; 4 priced differently by book {new_book.digest[:12]}"
    )
    assert diff_cells(out) == EXPECTED_DIFF
    assert lines[-1] == "dry run; nothing changed"
    assert snapshot(corrected) == before


def test_apply_rewrites_costs_rows_spend_and_history(
    capsys: pytest.CaptureFixture[str], corrected: Path, book: PriceBook, new_book: PriceBook
) -> None:
    assert spend(corrected) == [
        ("alpha", "2026-11-01", "CNY", "0.0042"),
        ("alpha", "2026-11-01", "USD", "0.00063"),
        ("alpha", "2026-11-02", "CNY", "0.015"),
        ("alpha", "2026-11-02", "USD", "0.00225"),
        ("beta", "2026-11-02", "CNY", "0.01704"),
        ("beta", "2026-11-02", "USD", "0.0024992"),
    ]
    code, out, _ = run(capsys, "reprice", "--config", str(corrected), "--apply")
    assert code == 0
    assert diff_cells(out) == EXPECTED_DIFF
    assert out.splitlines()[-1] == (
        "applied: 4 row(s) re-priced; previous amounts kept in cost_history"
    )

    assert query(
        corrected,
        "SELECT request_id, currency, amount, cache_savings FROM usage_cost ORDER BY 1, 2",
    ) == [
        # r1 saves (0.5 - 0.01) x 10,000 / 1M CNY and (0.075 - 0.0015) x 10,000 / 1M USD
        ("r1", "CNY", "0.0021", "0.0049"),
        ("r1", "USD", "0.000315", "0.000735"),
        ("r2", "CNY", "0.0125", "0"),
        ("r2", "USD", "0.001875", "0"),
        ("r3", "CNY", "0.012", "0.0087"),  # unchanged
        ("r3", "USD", "0.00176", "0.001276"),
        ("r5", "CNY", "0.00023", "0"),
        ("r5", "USD", "0.000023", "0"),
    ]
    assert spend(corrected) == [
        ("alpha", "2026-11-01", "CNY", "0.0021"),
        ("alpha", "2026-11-01", "USD", "0.000315"),
        ("alpha", "2026-11-02", "CNY", "0.0125"),
        ("alpha", "2026-11-02", "USD", "0.001875"),
        ("beta", "2026-11-02", "CNY", "0.01223"),  # r3 0.012 + r5 0.00023
        ("beta", "2026-11-02", "USD", "0.001783"),
    ]
    old, new = book.digest, new_book.digest
    history = query(
        corrected,
        "SELECT request_id, currency, amount, price_book, price_version, "
        "replaced_by_book FROM cost_history ORDER BY 1, 2",
    )
    assert history == [
        ("r1", "CNY", "0.0042", old, FLASH_VERSION, new),
        ("r1", "USD", "0.00063", old, FLASH_VERSION, new),
        ("r2", "CNY", "0.015", old, FLASH_VERSION, new),
        ("r2", "USD", "0.00225", old, FLASH_VERSION, new),
        ("r4", "CNY", "0.00504", old, PRO_VERSION, new),
        ("r4", "USD", "0.0007392", old, PRO_VERSION, new),
        ("r5", "CNY", None, old, None, new),  # it had no price
        ("r5", "USD", None, old, None, new),
    ]
    stamps = {
        datetime.fromisoformat(str(s))
        for (s,) in query(corrected, "SELECT replaced_at FROM cost_history")
    }
    assert len(stamps) == 1
    assert abs(datetime.now(UTC) - stamps.pop()) < timedelta(minutes=5)

    assert query(
        corrected,
        "SELECT request_id, priced, unpriced_reason, billed_model, "
        "price_version, schedule_version, tier, price_book FROM usage "
        "WHERE request_id IN ('r1', 'r3', 'r4', 'r5') ORDER BY 1",
    ) == [
        (
            "r1",
            1,
            None,
            "deepseek-flash",
            "deepseek-flash@2026-10-25T00:00:00Z",
            None,
            "standard",
            new,
        ),
        (
            "r3",
            1,
            None,
            "deepseek-v4-pro",
            PRO_VERSION,
            "peak-hours@2026-09-20T16:00:00Z",
            "peak",
            old,
        ),
        (
            "r4",
            0,
            "model 'deepseek-v4-pro' was retired at 2026-11-02T02:30:00Z: requests with "
            "this name fail upstream",
            None,
            None,
            None,
            None,
            new,
        ),
        (
            "r5",
            1,
            None,
            "deepseek-next",
            "deepseek-next@2026-10-01T00:00:00Z",
            None,
            "standard",
            new,
        ),
    ]


def test_report_after_apply_shows_the_new_totals(
    capsys: pytest.CaptureFixture[str], corrected: Path
) -> None:
    assert run(capsys, "reprice", "--config", str(corrected), "--apply")[0] == 0
    report = report_json(capsys, corrected, "--by", "team")
    rows = report["rows"]
    assert isinstance(rows, list)
    assert [(r["team"], r["unpriced"], r["cost"]) for r in rows] == [
        ("alpha", 1, {"CNY": "0.0146", "USD": "0.00219"}),  # r7 in flight stays unpriced
        ("beta", 1, {"CNY": "0.01223", "USD": "0.001783"}),  # r4 now, no longer r5
    ]
    total = report["total"]
    assert isinstance(total, dict)
    assert total["cost"] == {"CNY": "0.02683", "USD": "0.003973"}


def test_a_second_apply_changes_nothing(
    capsys: pytest.CaptureFixture[str], corrected: Path
) -> None:
    run(capsys, "reprice", "--config", str(corrected), "--apply")
    after_first = snapshot(corrected)
    code, out, _ = run(capsys, "reprice", "--config", str(corrected), "--apply")
    assert code == 0
    assert "; 0 priced differently" in out.splitlines()[0]
    assert diff_cells(out)[-1] == [
        "TOTAL",
        "5",
        "0",
        "0",
        "0",
        "0.02683",
        "0.02683",
        "0",
        "0.003973",
        "0.003973",
        "0",
    ]
    assert out.splitlines()[-1] == "nothing to change"
    assert snapshot(corrected) == after_first


def test_the_book_that_priced_the_rows_changes_nothing(
    capsys: pytest.CaptureFixture[str], ledger_config: Path
) -> None:
    before = snapshot(ledger_config)
    code, out, _ = run(capsys, "reprice", "--config", str(ledger_config), "--apply")
    assert code == 0
    assert "; 0 priced differently" in out.splitlines()[0]
    assert snapshot(ledger_config) == before


def test_range_limits_what_is_repriced(capsys: pytest.CaptureFixture[str], corrected: Path) -> None:
    """--since 2026-11-02 (Beijing) leaves r1 (23:59:59 on the 1st) at its old price."""
    code, out, _ = run(
        capsys,
        "reprice",
        "--config",
        str(corrected),
        "--apply",
        "--since",
        "2026-11-02",
        "--until",
        "2026-11-02T03:00:00Z",
    )
    assert code == 0
    assert diff_cells(out) == [
        EXPECTED_DIFF[0],
        [
            "alpha",
            "deepseek-flash",
            "1",
            "1",
            "0",
            "0",
            "0.015",
            "0.0125",
            "-0.0025",
            "0.00225",
            "0.001875",
            "-0.000375",
        ],
        [
            "beta",
            "deepseek-v4-pro",
            "1",
            "0",
            "0",
            "0",
            "0.012",
            "0.012",
            "0",
            "0.00176",
            "0.00176",
            "0",
        ],
        [
            "TOTAL",
            "2",
            "1",
            "0",
            "0",
            "0.027",
            "0.0245",
            "-0.0025",
            "0.00401",
            "0.003635",
            "-0.000375",
        ],
    ]
    assert query(
        corrected, "SELECT request_id, amount FROM usage_cost WHERE currency = 'CNY' ORDER BY 1"
    ) == [
        ("r1", "0.0042"),
        ("r2", "0.0125"),
        ("r3", "0.012"),
        ("r4", "0.00504"),
    ]


def test_a_bad_book_exits_1_with_its_problems(
    capsys: pytest.CaptureFixture[str], ledger_config: Path
) -> None:
    bad = ledger_config.parent / "book.yaml"
    bad.write_text(
        "currencies: [CNY]\nmodels:\n  x:\n    - from: 2026-01-01\n"
        "      rates: {CNY: -1 / 1 / 1}\n      source: https://e.x/\n"
        "      confidence: verified\n",
        encoding="utf-8",
    )
    before = snapshot(ledger_config)
    code, out, err = run(capsys, "reprice", "--config", str(ledger_config), "--apply")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"{bad}: models.x[0].from: instant '2026-01-01' has no timezone offset; add Z or +08:00",
        f"{bad}: models.x[0].rates.CNY.cache_hit: negative rate '-1'",
    ]
    assert snapshot(ledger_config) == before


def test_missing_ledger_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, corrected_text())
    code, out, err = run(capsys, "reprice", "--config", str(config))
    assert (code, out) == (1, "")
    assert err == f"no ledger at {tmp_path / 'ledger.sqlite3'}\n"
    assert not (tmp_path / "ledger.sqlite3").exists()


def test_usage_flags_stay_and_engine_flags_are_recomputed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, book: PriceBook
) -> None:
    """A row's usage flags belong to the call; the engine's flags to the pricing, so a
    re-pricing recomputes only those (once, not appended again)."""
    config = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"))
    row = record(
        book,
        "f1",
        "alpha",
        "deepseek-flash",
        "2026-11-01T15:59:59+00:00",
        miss=10,
        out=1,
        reasoning=5,
    )
    row = replace(row, flags=("prompt_tokens_mismatch", *row.flags))
    assert row.flags == ("prompt_tokens_mismatch", "reasoning_exceeds_output")
    ledger = SQLiteLedger(tmp_path / "ledger.sqlite3", ZoneInfo("Asia/Shanghai"))
    ledger.write([], [row])
    ledger.close()

    out = run(capsys, "reprice", "--config", str(config), "--apply")[1]
    assert "; 0 priced differently" in out.splitlines()[0]
    (tmp_path / "book.yaml").write_text(corrected_text(), encoding="utf-8")
    out = run(capsys, "reprice", "--config", str(config), "--apply")[1]
    assert "; 1 priced differently" in out.splitlines()[0]
    (flags,) = query(config, "SELECT flags FROM usage")[0]
    assert json.loads(str(flags)) == ["prompt_tokens_mismatch", "reasoning_exceeds_output"]


def test_a_new_endpoint_fallback_prices_the_calls_it_covers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Rows stored by a book without ``endpoint_fallbacks``: re-priced with the shipped book,
    the Anthropic-format call to a name DeepSeek served as its fallback model gets that model's
    price and flag (once); the same name on chat stays unpriced."""
    shipped = SHIPPED_BOOK.read_text(encoding="utf-8")
    start, end = shipped.index("endpoint_fallbacks:"), shipped.index("# Server-side tools")
    without = shipped[:start] + shipped[end:]
    config = write_config(tmp_path, without)
    old_book = load_price_book([tmp_path / "book.yaml"])
    when = "2026-11-02T01:30:00+00:00"  # Monday 09:30 Beijing: peak
    rows = [
        record(old_book, m, "alpha", "my-agent-model", when, miss=1000, out=100, endpoint=e)
        for m, e in (("m1", "messages"), ("c1", "chat"))
    ]
    assert not any(r.priced for r in rows)
    ledger = SQLiteLedger(tmp_path / "ledger.sqlite3", ZoneInfo("Asia/Shanghai"))
    ledger.write([], rows)
    ledger.close()
    (tmp_path / "book.yaml").write_text(shipped, encoding="utf-8")
    for _ in range(2):  # the second run changes nothing
        out = run(capsys, "reprice", "--config", str(config), "--apply")[1]
    assert "; 0 priced differently" in out.splitlines()[0]
    stored = query(
        config,
        "SELECT request_id, priced, billed_model, flags FROM usage ORDER BY request_id",
    )
    assert stored == [
        ("c1", 0, None, "[]"),
        ("m1", 1, "deepseek-flash", '["billed_as_endpoint_fallback"]'),
    ]
    # deepseek-flash at peak: 1000 x 2 + 100 x 8 CNY per million.
    costs = query(config, "SELECT currency, amount FROM usage_cost WHERE request_id = 'm1'")
    assert sorted(costs) == [("CNY", "0.0028"), ("USD", "0.00042")]


NOTICE_2027 = """\
      - 2027-01-01..2027-01-03    # a stand-in for the 2027 notice, not yet published
      - 2027-02-05..2027-02-11
"""
"""Holidays a 2027 notice may give: New Year's Day and its weekend, and the Spring Festival
week from its eve (lunar 12/29, Friday 5 February) to Thursday 11 February."""


def with_2027_calendar(shipped: str) -> str:
    years, last = "    years: [2026]\n", "      - 2026-10-01..2026-10-07    # National Day\n"
    assert shipped.count(years) == 1 and shipped.count(last) == 1
    return shipped.replace(years, "    years: [2026, 2027]\n").replace(last, last + NOTICE_2027)


def test_the_published_calendar_replaces_the_provisional_days(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, book: PriceBook
) -> None:
    """Calls priced before the 2027 notice, re-priced once it is in the book: New Year's Day
    (provisional) keeps its off-peak price and loses its flag; Tuesday 9 February, a bridging
    day only the notice gives, goes from peak to off-peak; Monday 15 February stays peak and
    loses the missing-calendar flag. Each call: 1,000 cache-miss and 100 output tokens of
    deepseek-flash, CNY 1 / 4 off-peak and 2 / 8 peak, USD 0.15 / 0.60 and 0.30 / 1.20."""
    shipped = SHIPPED_BOOK.read_text(encoding="utf-8")
    config = write_config(tmp_path, shipped)
    calls = (
        ("n1", "2027-01-01T10:00:00+08:00"),
        ("n2", "2027-02-09T10:00:00+08:00"),
        ("n3", "2027-02-15T10:00:00+08:00"),
    )
    rows = [record(book, i, "alpha", "deepseek-flash", t, miss=1000, out=100) for i, t in calls]
    assert [(r.tier, r.flags, r.costs["CNY"]) for r in rows] == [
        ("off_peak", ("holiday_calendar_provisional",), Decimal("0.0014")),
        ("peak", ("holiday_calendar_missing",), Decimal("0.0028")),
        ("peak", ("holiday_calendar_missing",), Decimal("0.0028")),
    ]
    ledger = SQLiteLedger(tmp_path / "ledger.sqlite3", ZoneInfo("Asia/Shanghai"))
    ledger.write([], rows)
    ledger.close()

    (tmp_path / "book.yaml").write_text(with_2027_calendar(shipped), encoding="utf-8")
    code, out, err = run(capsys, "reprice", "--config", str(config))
    assert (code, err) == (0, "")
    assert "3 row(s) with usage in range; 3 priced differently" in out.splitlines()[0]
    amounts = ["0.007", "0.0056", "-0.0014", "0.00105", "0.00084", "-0.00021"]
    assert diff_cells(out)[1:] == [
        ["alpha", "deepseek-flash", "3", "3", "0", "0", *amounts],
        ["TOTAL", "3", "3", "0", "0", *amounts],
    ]
    assert run(capsys, "reprice", "--config", str(config), "--apply")[0] == 0
    assert query(
        config,
        "SELECT u.request_id, u.tier, u.flags, c.amount FROM usage u JOIN usage_cost c "
        "ON c.request_id = u.request_id AND c.currency = 'CNY' ORDER BY 1",
    ) == [
        ("n1", "off_peak", "[]", "0.0014"),
        ("n2", "off_peak", "[]", "0.0014"),
        ("n3", "peak", "[]", "0.0028"),
    ]
