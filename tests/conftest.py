"""Shared fixtures: the shipped price book, loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.pricing import PriceBook, load_price_book

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_BOOK = ROOT / "config" / "pricing" / "deepseek.yaml"


@pytest.fixture(scope="session")
def book() -> PriceBook:
    return load_price_book([SHIPPED_BOOK])
