"""Counters shared by the worker processes of ``serve --workers N``: one small mapped file,
and the names of its columns (`ColumnRegistry`).

The file is a table of 64-bit integers, one row (slot) per worker and a fixed number of columns;
`proxy.admission.SharedAdmission` keeps each worker's calls in progress there. Each worker
writes only its own row, so no lock is needed, and a reader sums a column over every row. Reads
of the other rows are not synchronised: an aligned 8-byte load or store is single-copy atomic on
the processors CPython serves on (x86-64, AArch64), so a reader sees a count before or after a
change, never half of one.

The supervisor creates the file (all zeros) and gives each worker its slot; when a worker dies,
it zeroes the worker's row, since a killed process cannot count its own calls out.

Which column counts what can grow while the workers run (a live reload adds a team): the table
is made with spare columns, and the names of those in use are kept in a second file beside it,
appended under a lock by whichever process first needs a new name, so that every process
agrees on the columns whatever order they add names in.
"""

from __future__ import annotations

import fcntl
import json
import mmap
from collections.abc import Sequence
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


class ColumnsFull(Exception):
    """Names that do not fit in a `ColumnRegistry`: all its columns are taken."""

    def __init__(self, capacity: int, taken: int, missing: Sequence[str]) -> None:
        super().__init__(f"{len(missing)} new name(s), {taken} of {capacity} columns taken")
        self.capacity = capacity
        self.taken = taken
        self.missing = tuple(missing)


class ColumnRegistry:
    """The names of a table's columns, in a file: a first line stating how many columns there
    are room for (``{"capacity": 4096}``), then one JSON string per name, the n-th naming
    column n - 1. Names are only ever appended, under an exclusive ``flock`` on the file, so a
    name keeps its column for the file's life, and processes that add names at the same time
    (workers reloading a configuration) agree on every column. Its users read it only under
    that lock, which is taken rarely (at a worker's start, and on a reload that brings a
    name this process has not seen), never per call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as file:
            self.capacity: int = json.loads(file.readline())["capacity"]

    @classmethod
    def create(cls, path: Path, names: Sequence[str], capacity: int) -> ColumnRegistry:
        """A new registry naming `names` in order (the file must not exist yet)."""
        if len(names) > capacity:
            raise ColumnsFull(capacity, 0, names)
        lines = [json.dumps({"capacity": capacity}), *(json.dumps(name) for name in names)]
        with path.open("xb") as file:
            file.write("".join(f"{line}\n" for line in lines).encode())
        return cls(path)

    def columns(self, names: Sequence[str]) -> dict[str, int]:
        """The column of every name registered, once those of `names` not yet registered are
        appended (in their order); `ColumnsFull`, appending none, if they do not all fit."""
        with self.path.open("a+b") as file:  # appends whatever the position; reads from 0
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed, after the write
            file.seek(0)
            _, *lines = file.read().splitlines()
            known = {json.loads(line): index for index, line in enumerate(lines)}
            missing = [name for name in dict.fromkeys(names) if name not in known]
            if len(known) + len(missing) > self.capacity:
                raise ColumnsFull(self.capacity, len(known), missing)
            for name in missing:
                known[name] = len(known)
            file.write("".join(f"{json.dumps(name)}\n" for name in missing).encode())
        return known
