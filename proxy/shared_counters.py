"""Counters shared by the worker processes of ``serve --workers N``: one small mapped file.

The file is a table of 64-bit integers, one row (slot) per worker and a fixed number of columns;
`proxy.admission.SharedAdmission` keeps each worker's calls in progress there. Each worker
writes only its own row, so no lock is needed, and a reader sums a column over every row. Reads
of the other rows are not synchronised: an aligned 8-byte load or store is single-copy atomic on
the processors CPython serves on (x86-64, AArch64), so a reader sees a count before or after a
change, never half of one.

The supervisor creates the file (all zeros) and gives each worker its slot; when a worker dies,
it zeroes the worker's row, since a killed process cannot count its own calls out.
"""

from __future__ import annotations

import mmap
from pathlib import Path

_ITEM = 8  # bytes per counter (the 'q' format: a C long long)


class SharedCounters:
    """A mapped table of `width` counters per slot, in a file that already exists."""

    def __init__(self, path: Path, width: int) -> None:
        with path.open("r+b") as file:  # the mapping keeps its own descriptor
            self._map = mmap.mmap(file.fileno(), 0)
        self._view = memoryview(self._map).cast("q")
        self.width = width
        self.slots = len(self._view) // width

    @classmethod
    def create(cls, path: Path, slots: int, width: int) -> SharedCounters:
        """A new file of zeros (the file must not exist yet)."""
        with path.open("xb") as file:
            file.truncate(slots * width * _ITEM)
        return cls(path, width)

    def add(self, slot: int, column: int, delta: int) -> None:
        """Change a count in `slot`'s row; only the row's own worker may call this."""
        self._view[slot * self.width + column] += delta

    def column_sum(self, column: int) -> int:
        """The sum of one column over every slot."""
        return sum(self._view[column :: self.width])

    def zero(self, slot: int) -> None:
        """Clear a dead worker's row (the supervisor, before a new worker takes the slot)."""
        start = slot * self.width
        for index in range(start, start + self.width):
            self._view[index] = 0

    def close(self) -> None:
        self._view.release()
        self._map.close()
