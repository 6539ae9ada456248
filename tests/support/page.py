"""An HTML page read back as what a reader sees: which elements it has, what it would fetch,
and its tables' text, with the standard library's parser (no browser needed; the browser test
feeds it Chromium's DOM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

_FETCHING = {"src", "href", "xlink:href", "srcset", "action", "data", "poster"}


@dataclass
class Page:
    tags: set[str] = field(default_factory=set)
    """Every element name on the page."""
    fetches: list[str] = field(default_factory=list)
    """Every attribute value that would make a browser fetch something."""
    tables: dict[str, list[list[str]]] = field(default_factory=dict)
    """Section id -> its table's rows (header first), each cell's text."""
    bars: list[str] = field(default_factory=list)
    """Each chart bar's tooltip."""
    policy: str | None = None
    """Its Content-Security-Policy (a ``<meta http-equiv>``), if any."""


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._section = ""
        self._cell: list[str] | None = None
        self._in_bar = False
        self._tip: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.page.tags.add(tag)
        values = dict(attrs)
        self.page.fetches += [v or "" for k, v in attrs if k in _FETCHING]
        if tag == "meta" and (values.get("http-equiv") or "").lower() == (
            "content-security-policy"
        ):
            self.page.policy = values.get("content")
        elif tag == "section":
            self._section = values.get("id") or ""
        elif tag == "tr":
            self.page.tables.setdefault(self._section, []).append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "rect" and "bar" in (values.get("class") or "").split():
            self._in_bar = True
        elif tag == "title" and self._in_bar:
            self._tip = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.page.tables[self._section][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "title" and self._tip is not None:
            self.page.bars.append("".join(self._tip))
            self._tip = None
        elif tag == "rect":
            self._in_bar = False

    def handle_data(self, data: str) -> None:
        for text in (self._cell, self._tip):
            if text is not None:
                text.append(data)


def read_page(html: str) -> Page:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return reader.page
