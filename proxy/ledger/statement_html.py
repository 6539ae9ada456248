"""A monthly statement as one self-contained HTML page (``statement --format html``).

The page holds its sections (`proxy.ledger.statement.sections`, the very cells the text
rendering shows), inline CSS and an inline SVG chart of spend per day
(`proxy.ledger.statement_chart`): nothing is fetched, and its Content-Security-Policy
(``default-src 'none'``) forbids any script, so it opens the same offline, from a mail or a
file share. Model names and key ids come from clients and the ledger: every string from the
statement is escaped (`html.escape`), so a model named ``<script>...`` is text on the page,
never an element; the policy is a second wall should an escape ever be missed.
"""

from __future__ import annotations

from html import escape

from proxy.ledger.statement import Section, Statement, period, sections, title
from proxy.ledger.statement_chart import day_chart

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; color: #1d2733; margin: 2em auto; max-width: 80em;
       padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin: 1.6em 0 0.3em; border-bottom: 1px solid #d5dbe1; }
p.period, p.note { color: #52606d; margin: 0.2em 0 0.6em; }
table { border-collapse: collapse; }
th, td { padding: 0.2em 0.7em; border-bottom: 1px solid #e4e8ec; white-space: nowrap; }
th { text-align: left; font-weight: 600; background: #f3f5f7; }
td.figure, th.figure { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; border-top: 2px solid #9aa5b1; }
svg.chart .bar { fill: #3b75af; }
svg.chart .axis, svg.chart .grid { stroke: #9aa5b1; }
svg.chart .grid { stroke-dasharray: 4 4; }
svg.chart text { font-size: 11px; fill: #52606d; }
"""
_POLICY = "default-src 'none'; style-src 'unsafe-inline'"


def render_html(statement: Statement) -> str:
    heading = escape(title(statement))
    body = "\n".join(_section(statement, section) for section in sections(statement))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{escape(_POLICY)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{heading}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{heading}</h1>
<p class="period">{escape(period(statement))}</p>
{body}
</body>
</html>
"""


def _section(statement: Statement, section: Section) -> str:
    chart = ""
    if section.slug == "days" and statement.currencies:
        currency = statement.currencies[0]
        chart = day_chart(statement.day_costs(currency), currency) + "\n"
    return (
        f'<section id="{escape(section.slug)}">\n<h2>{escape(section.title)}</h2>\n'
        f'<p class="note">{escape(section.note)}</p>\n{chart}{_table(section)}\n</section>'
    )


def _table(section: Section) -> str:
    labels = section.text_columns

    def kind(index: int) -> str:
        return "label" if index < labels else "figure"

    head = "".join(
        f'<th class="{kind(i)}" scope="col">{escape(cell)}</th>'
        for i, cell in enumerate(section.header)
    )
    rows = []
    for number, row in enumerate(section.rows, start=1):
        total = section.total and number == len(section.rows)
        cells = "".join(f'<td class="{kind(i)}">{escape(cell)}</td>' for i, cell in enumerate(row))
        rows.append(f'<tr class="total">{cells}</tr>' if total else f"<tr>{cells}</tr>")
    body = "\n".join(rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
