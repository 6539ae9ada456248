"""ruff (lint and format) and mypy --strict over the package, its tests and the benchmark:
style and typing are part of the build."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.static


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


CODE = ("proxy", "tests", "bench")


def test_ruff_clean() -> None:
    result = _run("ruff", "check", *CODE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_formatted() -> None:
    result = _run("ruff", "format", "--check", *CODE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_clean() -> None:
    result = _run("mypy", "--strict", *CODE)
    assert result.returncode == 0, result.stdout + result.stderr
