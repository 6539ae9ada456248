"""What a price-book file can get wrong, reported as file + entry + reason."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BookProblem:
    """One defect in the price book. `entry` is a path such as ``models.deepseek-chat[2].rates``."""

    file: str
    entry: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.entry}: {self.reason}"


class PriceBookError(Exception):
    """The price book cannot be used; `problems` lists every defect found, not just the first."""

    def __init__(self, problems: Iterable[BookProblem]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"price book has {len(self.problems)} problem(s):\n{lines}")
