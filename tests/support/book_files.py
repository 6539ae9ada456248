"""Price-book files written by a test, and the problems loading them reports, as
``file: entry: reason`` lines (the `write` fixture of tests/unit/conftest.py uses these)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.pricing import PriceBookError, load_price_book

Write = Callable[[str, str], Path]
"""Write a dedented book file by name in the test's folder; returns its path."""


def book_writer(folder: Path) -> Write:
    def write(name: str, text: str) -> Path:
        path = folder / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


def problems_of(*paths: Path) -> list[str]:
    """The problems loading these files reports, each as ``file name: entry: reason``."""
    with pytest.raises(PriceBookError) as info:
        load_price_book(paths)
    return [f"{Path(p.file).name}: {p.entry}: {p.reason}" for p in info.value.problems]
