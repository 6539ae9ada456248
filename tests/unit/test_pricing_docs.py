"""The README's "adding next month's price change" example works as written."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from proxy.pricing import load_price_book, price
from proxy.usage import TokenUsage
from tests.conftest import ROOT, SHIPPED_BOOK

FORMAT_DOC = ROOT / "config" / "pricing" / "README.md"


def test_documented_price_change_loads_and_applies(tmp_path: Path) -> None:
    text = FORMAT_DOC.read_text(encoding="utf-8")
    section = text.split("## Adding next month's price change", 1)[1]
    snippet = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert snippet is not None
    addition = tmp_path / "local.yaml"
    addition.write_text("currencies: [CNY, USD]\nmodels:\n" + snippet.group(1), encoding="utf-8")
    book = load_price_book([SHIPPED_BOOK, addition])
    before = price(
        book,
        "deepseek-flash",
        TokenUsage(cache_miss=1_000_000),
        datetime.fromisoformat("2026-11-30T23:59:59.999999+08:00"),
    )
    after = price(
        book,
        "deepseek-flash",
        TokenUsage(cache_miss=1_000_000),
        datetime.fromisoformat("2026-12-01T10:00:00+08:00"),
    )
    assert before.costs["CNY"].total == Decimal(1)  # Monday 23:59 Beijing, off-peak
    assert after.costs["CNY"].total == Decimal("1.5")  # Tuesday 10:00 Beijing, peak
    assert after.version_id == "deepseek-flash@2026-11-30T16:00:00Z"
