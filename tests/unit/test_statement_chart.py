"""The statement's SVG chart: bars exactly proportional to the day's spend, a tooltip with the
exact amount, and a month without spend drawn as such."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal

from proxy.ledger.statement_chart import HEIGHT, day_chart

PLOT_HEIGHT = HEIGHT - 20 - 30  # the chart's top and bottom margins
BAR = re.compile(r'<rect class="bar" x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="([\d.]+)">')


def test_bars_are_proportional_to_the_days_spend() -> None:
    days = [
        (date(2026, 11, 1), Decimal(0)),
        (date(2026, 11, 2), Decimal("0.03204")),
        (date(2026, 11, 3), Decimal("0.01068")),  # a third of the highest
    ]
    svg = day_chart(days, "CNY")
    heights = [Decimal(h) for _, h in BAR.findall(svg)]
    assert heights == [0, PLOT_HEIGHT, Decimal(PLOT_HEIGHT) / 3]
    assert [Decimal(y) + h for (y, _), h in zip(BAR.findall(svg), heights, strict=True)] == [
        HEIGHT - 30
    ] * 3
    assert "<title>2026-11-03: 0.01068 CNY</title>" in svg
    assert ">0.03204 CNY</text>" in svg  # the scale's top
    assert "no spend" not in svg


def test_a_month_without_spend() -> None:
    days = [(date(2026, 2, d), Decimal(0)) for d in range(1, 29)]
    svg = day_chart(days, "USD")
    assert [h for _, h in BAR.findall(svg)] == ["0"] * 28
    assert "no spend this month" in svg


def test_text_is_escaped() -> None:
    svg = day_chart([(date(2026, 11, 1), Decimal(1))], "<b>")
    assert "<b>" not in svg
    assert "&lt;b&gt;" in svg
