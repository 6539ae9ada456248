"""A monthly statement as plain text for a terminal or an e-mail: its sections
(`proxy.ledger.statement.sections`) as aligned tables under their titles."""

from __future__ import annotations

import textwrap

from proxy.ledger.report_render import table, terminal_safe
from proxy.ledger.statement import Statement, period, sections, title

WIDTH = 100
"""Where notes wrap."""


def render_text(statement: Statement) -> str:
    parts = [terminal_safe(title(statement)), terminal_safe(period(statement))]
    for section in sections(statement):
        parts += [
            "",
            section.title,
            textwrap.fill(section.note, WIDTH),
            table(section.header, section.rows, section.text_columns),
        ]
    return "\n".join(parts)
