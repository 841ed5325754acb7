"""The JSONL sink: one JSON line per verdict, appended and synced.

Each line is the ledger row (:meth:`~edge_inspect.ledger.Record.to_dict`)
with its row ``id``, without the ledger's bookkeeping (``identity``,
``sinks_pending``), with the criterion's ``raw_score`` beside the decision
``score``, and times as ISO 8601 with the UTC offset
(:func:`edge_inspect.numbers.timestamp`). Lines are appended with ``O_APPEND`` in one ``write`` per
batch and ``fsync``-ed before the ledger marks them done. After a crash:

- a partial last line (a write cut by a power loss) is cut off at open;
- rows still pending are appended unless their id is already in the file's
  tail (the line was written and synced, but the ledger did not yet record
  it): every row id appears exactly once.

    >>> sink = JsonlSink("verdicts.jsonl")
    >>> sink.write([Done(record)])      # {record.id: {}}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from edge_inspect import numbers
from edge_inspect.errors import InputError
from edge_inspect.ledger import Record
from edge_inspect.sinks.base import Done, fsync_dir

log = logging.getLogger(__name__)

#: Ledger columns left out of the JSON line.
OMITTED = ("identity", "sinks_pending")
#: Ledger columns of Unix times, written as ISO 8601 text.
TIMES = ("frame_time", "arrived_at", "read_at", "inspected_at", "committed_at")
_BLOCK = 1 << 16


def line(record: Record) -> bytes:
    """The JSON line of a row, newline included."""
    row = record.to_dict()
    data = {}
    for key, value in row.items():
        if key in OMITTED:
            continue
        data[key] = numbers.timestamp(value) if key in TIMES else value
        if key == "score":  # Record.raw_score, from the criteria already parsed
            data["raw_score"] = row["criteria"].get(record.criterion) if record.criterion is not None else None
    return (json.dumps(data, separators=(",", ":")) + "\n").encode()


class JsonlSink:
    """Append one JSON line per verdict to ``path``.

    Args:
        path: the JSONL file; created (with its folder) when missing.

    Raises:
        InputError: the file cannot be opened for appending.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise InputError(f"Cannot open results file {self.path} for appending ({exc.strerror or exc}); "
                             "check that its folder exists and is writable.") from exc
        if created:
            fsync_dir(self.path.parent)
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Cut a partial last line, left by a write that a power loss interrupted."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        end = size
        while end > 0:
            start = max(0, end - _BLOCK)
            chunk = os.pread(self._fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        log.warning("%s ended with a partial line (%d bytes, from an interrupted write); removed it, its verdict "
                    "is written again from the ledger.", self.path, size - keep)
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)

    def wants(self, record: Record) -> bool:
        return True

    def _append(self, data: bytes) -> None:
        size = os.fstat(self._fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            # A disk filling up mid-write must not leave half a line for the next append to run into.
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                log.error("Cannot cut %s back to %d bytes after a failed write (%s).", self.path, size, exc)
            raise

    def write(self, done: Sequence[Done]) -> dict[int, dict]:
        """Append the lines of a batch in one write, then fsync."""
        if not done:
            return {}
        self._append(b"".join(line(d.record) for d in done))
        return {d.record.id: {} for d in done}

    def ids_from(self, first: int) -> set[int]:
        """Row ids in the file's tail, reading back from the end to the first line with an id below ``first``.

        Lines are appended in row-id order, so no line before that one can
        hold an id of ``first`` or more.
        """
        found: set[int] = set()
        end = os.fstat(self._fd).st_size
        carry = b""
        while end > 0:
            start = max(0, end - _BLOCK)
            chunk = os.pread(self._fd, end - start, start) + carry
            lines = chunk.split(b"\n")
            carry = lines[0] if start > 0 else b""
            for text in reversed(lines[1:] if start > 0 else lines):
                if not text.strip():
                    continue
                try:
                    row_id = int(json.loads(text)["id"])
                except (ValueError, KeyError, TypeError):
                    log.warning("%s holds a line that is not a verdict; ignored: %.80r", self.path, text)
                    continue
                if row_id < first:
                    return found
                found.add(row_id)
            end = start
        return found

    def replay(self, records: Sequence[Record], inspector=None) -> dict[int, dict]:
        """Append the rows whose id is not yet in the file's tail."""
        if not records:
            return {}
        present = self.ids_from(min(r.id for r in records))
        missing = [r for r in records if r.id not in present]
        if missing:
            self._append(b"".join(line(r) for r in missing))
        log.info("Results file %s: %d line(s) written again, %d already there.", self.path, len(missing),
                 len(records) - len(missing))
        return {r.id: {} for r in records}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
