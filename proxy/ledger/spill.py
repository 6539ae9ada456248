"""What the proxy saves when the ledger cannot take it, and how it goes back in.

Two files can appear beside the ledger (``<ledger>`` is ``ledger.path``), each named with the
UTC instant and the process id, so several workers (``serve --workers N``) never share one:

- ``<ledger>.recovered-<UTC>-<pid>``: a copy of a ledger whose file was deleted or replaced
  while the proxy ran, made through the connection that still had it open
  (`proxy.ledger.writer`).
- ``<ledger>.unwritten-<UTC>-<pid>.jsonl``: the records a stopping proxy could not commit
  within ``ledger.shutdown_timeout``, one `UsageRecord.to_json` line each (`spill`). If that
  file cannot be written either (the disk is full), each record goes to the log at ERROR as
  one ``unwritten ledger record: {...}`` line instead, so a log pipeline still has it.

``python -m proxy ledger-replay FILE...`` (`proxy.ledger.commands`) reads either kind of file
(`read_records`) and writes the records through the store's normal path (`replay`), into the
SQLite or the PostgreSQL ledger: daily spend stays consistent, and a record whose final row is
already there is not written twice, so replaying a file again, or one whose records partly
made it, is harmless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from proxy.ledger.queries import Queries, settled
from proxy.records import UsageRecord

log = logging.getLogger("proxy.ledger")

EXIT_UNWRITTEN = 3
"""The exit code of a proxy (or supervisor) that stopped with records it could not write:
1 is Python's own for a crash and 2 is "refused to start"."""
LOG_MARKER = "unwritten ledger record: "
"""What precedes a record's JSON in the log when no spill file could be written."""
INTERRUPTED = "the proxy stopped before the call ended; usage unknown"
"""The reason given to a call whose final record never came (as the store's recovery says)."""
REPLAY_BATCH = 500


def beside(ledger: Path, kind: str, now: datetime, suffix: str = "") -> Path:
    """``<ledger>.<kind>-<UTC instant>-<pid><suffix>``, in the ledger's folder."""
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    return ledger.with_name(f"{ledger.name}.{kind}-{stamp}-{os.getpid()}{suffix}")


def spill(records: Sequence[UsageRecord], ledger: Path, config: Path, now: datetime) -> Path | None:
    """Save records the ledger could not take, and say where and how to put them back.

    Returns the spill file, or None when it could not be written and the records went to the
    log instead. The file is synced before this returns: these records exist nowhere else.
    """
    target = beside(ledger, "unwritten", now, ".jsonl")
    lines = [json.dumps(record.to_json(), separators=(",", ":")) for record in records]
    try:
        _write_new(target, lines)
    except OSError as exc:
        for line in lines:
            log.error("%s%s", LOG_MARKER, line)
        log.error(
            "%d usage record(s) could not be written to the ledger %s, nor to %s (%s): "
            "they are in this log, one line each (the lines above that end in a record's "
            "JSON). Put them back once the ledger can be written: python -m proxy "
            "ledger-replay --config %s LOGFILE",
            len(records),
            ledger,
            target,
            exc,
            config,
        )
        return None
    log.error(
        "%d usage record(s) could not be written to the ledger %s: they are saved in %s "
        "(one JSON line each). Put them back once the ledger can be written: "
        "python -m proxy ledger-replay --config %s %s",
        len(records),
        ledger,
        target,
        config,
        target,
    )
    return target


def _write_new(target: Path, lines: Iterable[str]) -> None:
    """Write a file that must not exist yet; a partly written one is removed."""
    with target.open("x", encoding="utf-8") as out:
        try:
            for line in lines:
                out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                target.unlink()
            raise


class SpillError(Exception):
    """A line that is not a record: which file, which line, and why."""


def read_records(path: Path) -> list[UsageRecord]:
    """The records in a spill file, or in a log holding ``unwritten ledger record:`` lines
    (other log lines are skipped). Raises `SpillError` on a line that looks like a record but
    is not one, and `OSError` if the file cannot be read."""
    records: list[UsageRecord] = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            try:
                text = line.decode("utf-8").strip()
                marker = text.find(LOG_MARKER + "{")
                if marker >= 0:
                    text = text[marker + len(LOG_MARKER) :]
                elif not text.startswith("{"):
                    continue  # a log line about something else
                records.append(UsageRecord.from_json(json.loads(text)))
            except ValueError as exc:  # not UTF-8, not JSON, or a field at fault
                raise SpillError(f"{path}:{number}: {exc}") from None
    return records


@dataclass(frozen=True, slots=True)
class Replayed:
    written: int
    """Records whose final row was not in the ledger and now is."""
    present: int
    """Records whose final row was already there (left as they were)."""


class Writes(Protocol):
    """The store's write path (`proxy.ledger.store.SQLiteLedger`, `PostgresLedger`)."""

    def write(self, pending: Sequence[UsageRecord], final: Sequence[UsageRecord]) -> None: ...


def replay(queries: Queries, store: Writes, records: Sequence[UsageRecord]) -> Replayed:
    """Write spilled records into the ledger `queries` reads, through `store`'s normal write
    path (a store that ends no running proxy's calls when it opens).

    A spilled ``in_flight`` record is a call whose final record never came: it is written as
    the store's recovery would end it, ``interrupted`` with unknown usage, which any final row
    of the call settles. Safe while the proxy runs (the store's transactions wait for each
    other) and safe to repeat.
    """
    finals: dict[str, UsageRecord] = {}
    for record in sorted(records, key=lambda r: r.outcome != "in_flight"):  # finals win
        finals[record.request_id] = (
            dataclasses.replace(record, outcome="interrupted", unpriced_reason=INTERRUPTED)
            if record.outcome == "in_flight"
            else record
        )
    present = settled(queries, list(finals.values()))
    batch = [record for request_id, record in finals.items() if request_id not in present]
    for start in range(0, len(batch), REPLAY_BATCH):
        store.write([], batch[start : start + REPLAY_BATCH])
    return Replayed(written=len(finals) - len(present), present=len(present))
