"""Configuration files for tests: a proxy.yaml beside a copy of the shipped price book."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SHIPPED_BOOK

KEY_HASH = "sha256:" + "ab" * 32
"""A client key's hash as proxy.yaml lists it; no key in the tests hashes to it."""
ONE_TEAM = f"pricing: {{book: [book.yaml]}}\nteams:\n  a:\n    keys: ['{KEY_HASH}']\n"
"""The least a proxy.yaml holds: the price book and one team with one key."""


def config_with_shipped_book(folder: Path, text: str) -> Path:
    """`text` as `folder`/proxy.yaml, with the shipped price book beside it as book.yaml."""
    (folder / "book.yaml").write_text(SHIPPED_BOOK.read_text(encoding="utf-8"), encoding="utf-8")
    path = folder / "proxy.yaml"
    path.write_text(text, encoding="utf-8")
    return path
