"""The workers' shared counters and the names of their columns (`proxy.shared_counters`):
processes that register names at the same time agree on every column."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.shared_counters import ColumnRegistry, ColumnsFull, SharedCounters

ROOT = Path(__file__).resolve().parents[2]
REGISTER = """
import json, sys
from pathlib import Path
from proxy.shared_counters import ColumnRegistry
registry = ColumnRegistry(Path(sys.argv[1]))
sys.stdin.read()  # every process is started: go
columns = {}
for name in json.loads(sys.argv[2]):
    columns.update(registry.columns([name]))
print(json.dumps(columns))
"""


def test_processes_registering_at_once_agree_on_every_column(tmp_path: Path) -> None:
    """Four processes register 200 names each, one call per name, in orders of their own
    and overlapping (worker reloads racing): each name gets one column, and every process
    read the columns the file states."""
    path = tmp_path / "names"
    ColumnRegistry.create(path, ["alpha"], capacity=2000)
    names = [f"team-{index}" for index in range(400)]
    orders = [names[:200], names[200:][::-1], names[100:300], names[::2]]
    with contextlib.ExitStack() as stack:  # each process waited for, whatever happens
        processes = [
            stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", REGISTER, str(path), json.dumps(order)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
            )
            for order in orders
        ]
        for process in processes:  # all of them started and waiting: let them go together
            assert process.stdin is not None
            process.stdin.close()
        outputs = []
        for process in processes:
            assert process.stdout is not None
            outputs.append(process.stdout.read())
            process.wait(timeout=60)
    assert [process.returncode for process in processes] == [0] * 4
    final = ColumnRegistry(path).columns([])
    assert sorted(final) == sorted(["alpha", *names])
    assert sorted(final.values()) == list(range(401))
    for output, order in zip(outputs, orders, strict=True):
        seen = json.loads(output)
        assert {name: seen[name] for name in order} == {name: final[name] for name in order}


def test_a_registry_keeps_its_columns_and_refuses_names_beyond_its_capacity(
    tmp_path: Path,
) -> None:
    path = tmp_path / "names"
    registry = ColumnRegistry.create(path, ["alpha", "beta"], capacity=3)
    assert registry.columns(["gamma", "beta", "gamma"]) == {"alpha": 0, "beta": 1, "gamma": 2}
    with pytest.raises(ColumnsFull) as info:
        ColumnRegistry(path).columns(["delta", "alpha", "epsilon"])
    assert (info.value.capacity, info.value.taken, info.value.missing) == (
        3,
        3,
        ("delta", "epsilon"),
    )
    assert registry.columns([]) == {"alpha": 0, "beta": 1, "gamma": 2}


def test_zeroing_a_slot_clears_its_whole_row(tmp_path: Path) -> None:
    counters = SharedCounters.create(tmp_path / "counters", 2, 4097)
    for column in (0, 1, 4096):
        counters.add(0, column, 3)
        counters.add(1, column, 1)
    counters.zero(0)
    assert [counters.column_sum(column) for column in (0, 1, 4096)] == [1, 1, 1]
    counters.close()
