"""Fixtures shared by integration test modules (the package-wide ones are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.ledger.store import SQLiteLedger
from proxy.pricing import PriceBook
from tests.conftest import SHIPPED_BOOK
from tests.support.ledger_rows import BEIJING, sample_rows, write_config


@pytest.fixture
def ledger_config(tmp_path: Path, book: PriceBook) -> Path:
    """A config and a ledger holding `sample_rows`, priced with the shipped book."""
    path = write_config(tmp_path, SHIPPED_BOOK.read_text(encoding="utf-8"))
    ledger = SQLiteLedger(tmp_path / "ledger.sqlite3", BEIJING)
    ledger.write(*sample_rows(book))
    ledger.close()
    return path
