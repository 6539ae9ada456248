"""Shared fixtures: the shipped price book (loaded once) and the fake DeepSeek."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.pricing import PriceBook, load_price_book
from tests.fake_deepseek import FakeDeepSeek, running_fake

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_BOOK = ROOT / "config" / "pricing" / "deepseek.yaml"


@pytest.fixture(scope="session")
def book() -> PriceBook:
    return load_price_book([SHIPPED_BOOK])


@pytest.fixture
async def fake() -> AsyncIterator[FakeDeepSeek]:
    """A fresh fake DeepSeek on loopback (tests/fake_deepseek.py)."""
    async with running_fake() as server:
        yield server
