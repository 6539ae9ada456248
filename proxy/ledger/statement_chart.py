"""The statement's chart: spend per day of the month as an inline SVG bar chart, drawn here.

No script, stylesheet or font is fetched: the page stays one self-contained file that opens
offline and under a ``default-src 'none'`` policy. Coordinates are computed from the exact
amounts as `Decimal` and written with two decimals; each bar's ``<title>`` (a tooltip) holds
the exact amount. Every piece of text is escaped, though all of it is the proxy's own (dates,
amounts, the book's currency code).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from decimal import Decimal
from html import escape

from proxy.formats import ZERO, decimal_text

WIDTH = 760
HEIGHT = 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 80, 10, 20, 30
_PLOT_WIDTH = Decimal(WIDTH - _LEFT - _RIGHT)
_PLOT_HEIGHT = Decimal(HEIGHT - _TOP - _BOTTOM)
_BAR_SHARE = Decimal("0.7")
"""Of each day's slot, the bar's width."""
_HUNDREDTH = Decimal("0.01")


def _at(value: Decimal | int) -> str:
    return decimal_text(Decimal(value).quantize(_HUNDREDTH))


def day_chart(days: Sequence[tuple[date, Decimal]], currency: str) -> str:
    """An SVG of one bar per day, as tall as the day's spend against the month's highest."""
    peak = max((amount for _, amount in days), default=ZERO)
    label = escape(f"Spend per day in {currency}")
    baseline = HEIGHT - _BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'aria-label="{label}" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}">',
        f'<line class="axis" x1="{_LEFT}" y1="{baseline}" x2="{WIDTH - _RIGHT}" y2="{baseline}"/>',
        f'<text class="scale" x="{_LEFT - 6}" y="{baseline}" text-anchor="end">0</text>',
    ]
    if peak > 0:
        parts += [
            f'<line class="grid" x1="{_LEFT}" y1="{_TOP}" x2="{WIDTH - _RIGHT}" y2="{_TOP}"/>',
            f'<text class="scale" x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end">'
            f"{escape(decimal_text(peak))} {escape(currency)}</text>",
        ]
    else:
        parts.append(
            f'<text class="empty" x="{WIDTH // 2}" y="{HEIGHT // 2}" text-anchor="middle">'
            "no spend this month</text>"
        )
    slot = _PLOT_WIDTH / max(len(days), 1)
    for index, (day, amount) in enumerate(days):
        height = amount / peak * _PLOT_HEIGHT if peak > 0 else ZERO
        left = _LEFT + slot * index
        tip = escape(f"{day.isoformat()}: {decimal_text(amount)} {currency}")
        parts += [
            f'<rect class="bar" x="{_at(left + slot * (1 - _BAR_SHARE) / 2)}" '
            f'y="{_at(baseline - height)}" width="{_at(slot * _BAR_SHARE)}" '
            f'height="{_at(height)}"><title>{tip}</title></rect>',
            f'<text class="day" x="{_at(left + slot / 2)}" y="{baseline + 16}" '
            f'text-anchor="middle">{day.day}</text>',
        ]
    parts.append("</svg>")
    return "\n".join(parts)
