"""Shared fixtures: the shipped price book (loaded once) and the fake DeepSeek."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.pricing import PriceBook, load_price_book
from tests.support.fake_clients import UPSTREAM_AUTH
from tests.support.fake_deepseek import FakeDeepSeek, running_fake
from tests.support.fake_deepseek_shapes import FAKE_UPSTREAM_KEY

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_BOOK = ROOT / "config" / "pricing" / "deepseek.yaml"


@pytest.fixture(scope="session")
def book() -> PriceBook:
    return load_price_book([SHIPPED_BOOK])


@pytest.fixture
async def fake() -> AsyncIterator[FakeDeepSeek]:
    """A fresh fake DeepSeek on loopback (tests/support/fake_deepseek.py)."""
    async with running_fake() as server:
        yield server


@pytest.fixture
async def client(fake: FakeDeepSeek) -> AsyncIterator[httpx.AsyncClient]:
    """httpx straight to the fake DeepSeek, with its key."""
    async with httpx.AsyncClient(base_url=fake.base_url, headers=UPSTREAM_AUTH) as http:
        yield http


@pytest.fixture
async def sdk(fake: FakeDeepSeek) -> AsyncIterator[openai.AsyncOpenAI]:
    """The openai SDK straight to the fake DeepSeek."""
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key=FAKE_UPSTREAM_KEY, max_retries=0
    ) as api:
        yield api
