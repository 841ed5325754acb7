"""The ledger: one durable verdict per part, in a SQLite file.

This module owns the record of what the line inspected: one row per part
(a file dropped in a hot folder, or a camera frame) with its identity, its
verdict, the model that gave it, its timings, and which sinks (JSONL, sort,
heatmaps) still have to run for it. :mod:`edge_inspect.watch` writes it;
``edge-inspect results`` reads it.

Exactly once rests on three choices:

- **identity**: a file is ``(path, size, mtime_ns, sha256 of its bytes)``
  (a file replaced under the same name is a new part; the same file seen
  twice is not); a frame is ``(uri, grab timestamp, frame index)``. The
  identity column is ``UNIQUE``, so a second verdict for a part cannot be
  inserted, whatever the caller does.
- **one transaction per batch of verdicts**: each verdict is either wholly
  in the file or absent.
- **durability**: WAL mode with ``synchronous=FULL``. In WAL mode ``NORMAL``
  only syncs the log at checkpoints, so a power cut can lose the last
  committed transactions; a verdict a sink has already acted on (a file
  moved into ``ok/``) would then be missing. ``FULL`` syncs the log at every
  commit, and batching verdicts keeps that to one sync per batch.

The schema is versioned with ``PRAGMA user_version``; a file that is not a
ledger, or a ledger from a newer edge-inspect, is refused with an
:class:`~edge_inspect.errors.InputError`.

    >>> with Ledger.open("parts/.edge-inspect/ledger.sqlite") as ledger:
    ...     ledger.counts()
    {'ok': 981, 'ng': 17, 'error': 2}
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from edge_inspect.errors import InputError

log = logging.getLogger(__name__)

#: The schema this module writes; ``PRAGMA user_version`` of every ledger.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE parts (
    id INTEGER PRIMARY KEY,
    identity TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'frame')),
    source TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    sha256 TEXT,
    frame_index INTEGER,
    frame_time REAL,
    verdict TEXT NOT NULL CHECK (verdict IN ('ok', 'ng', 'error')),
    score REAL,
    threshold REAL,
    criterion TEXT,
    criteria TEXT,
    model_sha256 TEXT,
    error TEXT,
    arrived_at REAL NOT NULL,
    read_at REAL,
    inspected_at REAL,
    committed_at REAL NOT NULL,
    latency_ms REAL NOT NULL,
    batch_size INTEGER,
    sinks_pending TEXT NOT NULL DEFAULT '',
    sorted_path TEXT,
    heatmap TEXT
);
CREATE INDEX parts_file ON parts (source, size, mtime_ns);
CREATE INDEX parts_committed ON parts (committed_at);
CREATE INDEX parts_pending ON parts (id) WHERE sinks_pending != '';
"""


def file_identity(path: str | os.PathLike, size: int, mtime_ns: int, sha256: str | None) -> str:
    """The identity of a file's content; ``sha256`` is None when it could not be read."""
    return f"file:{sha256 or '-'}:{size}:{mtime_ns}:{os.fspath(path)}"


def frame_identity(uri: str, timestamp: float, index: int) -> str:
    """The identity of a camera frame."""
    return f"frame:{timestamp!r}:{index}:{uri}"


@dataclass(frozen=True)
class Record:
    """One part's row in the ledger.

    Attributes:
        identity: :func:`file_identity` or :func:`frame_identity`; unique.
        kind: ``"file"`` or ``"frame"``.
        source: the file's path, or the camera's URI.
        size, mtime_ns, sha256: the file's size, modification time and
            content hash (``sha256`` None when the file could not be read).
        frame_index, frame_time: the frame's number and grab time.
        verdict: ``"ok"``, ``"ng"`` or ``"error"``.
        score, threshold, criterion: the decision (score None on error).
        criteria: every criterion's value, as a JSON object (text).
        model_sha256: the checksum of the ONNX graph that decided.
        error: the reason of an ``error`` verdict.
        arrived_at, read_at, inspected_at, committed_at: Unix times when the
            source handed the part over, its bytes were read and decoded,
            the model scored it, and its row was written (just before the
            transaction commits).
        latency_ms: ``committed_at - arrived_at`` in milliseconds.
        batch_size: how many images shared the model run.
        sinks_pending: names of the sinks still to run, space-separated.
        sorted_path: where the sort sink moved the file.
        heatmap: the overlay PNG the heatmaps sink wrote.
        id: the row id; None before the row is written.
    """

    identity: str
    kind: str
    source: str
    verdict: str
    arrived_at: float
    committed_at: float
    latency_ms: float
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    frame_index: int | None = None
    frame_time: float | None = None
    score: float | None = None
    threshold: float | None = None
    criterion: str | None = None
    criteria: str | None = None
    model_sha256: str | None = None
    error: str | None = None
    read_at: float | None = None
    inspected_at: float | None = None
    batch_size: int | None = None
    sinks_pending: str = ""
    sorted_path: str | None = None
    heatmap: str | None = None
    id: int | None = None

    @property
    def pending(self) -> set[str]:
        """The sinks still to run, as a set of names."""
        return set(self.sinks_pending.split())

    def to_dict(self) -> dict:
        """The row as a JSON object: columns in schema order, ``criteria`` parsed."""
        # Every field is a scalar: read them, rather than pay for dataclasses.asdict's deep copy on every verdict.
        data = {"id": self.id, **{k: getattr(self, k) for k in COLUMNS if k != "id"}}
        data["criteria"] = json.loads(self.criteria) if self.criteria else {}
        return data


#: Column names, in the order of :class:`Record`'s fields.
COLUMNS = tuple(f.name for f in fields(Record))
_INSERT = (f"INSERT INTO parts ({', '.join(c for c in COLUMNS if c != 'id')}) "
           f"VALUES ({', '.join('?' for c in COLUMNS if c != 'id')}) ON CONFLICT (identity) DO NOTHING")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM parts"


def _row(values: Sequence) -> Record:
    return Record(**dict(zip(COLUMNS, values)))


class Ledger:
    """An open ledger file. Build one with :meth:`open`.

    Writes go through one connection, serialised by a lock; :meth:`known`
    and :meth:`seen_file` may be called from any thread (each thread reads
    through a connection of its own, which WAL mode lets run beside the
    writer).
    """

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path = path
        self._conn = connection
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True) -> Ledger:
        """Open a ledger, creating it (and its folder) when ``create`` and missing.

        Raises:
            InputError: the path is a folder, is missing (``create=False``),
                is not an edge-inspect ledger, or holds a newer schema.
        """
        path = Path(path)
        if path.is_dir():
            raise InputError(f"Ledger path {path} is a folder; expected a ledger file such as {path / 'ledger.sqlite'}.")
        if not path.exists():
            if not create:
                raise InputError(f"No ledger at {path}. Expected the file edge-inspect watch writes; "
                                 "check the path (--ledger, or the watched folder).")
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            cls._check_schema(conn, path, create)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("Ledger %s: journal mode %s instead of WAL (the file system may not support WAL); "
                            "verdicts stay durable, readers may wait on the writer.", path, mode)
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    @staticmethod
    def _check_schema(conn: sqlite3.Connection, path: Path, create: bool) -> None:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{path} is not an edge-inspect ledger (SQLite says: {exc}). Expected the ledger file "
                             "edge-inspect watch writes; pass another --ledger path.") from exc
        if version > SCHEMA_VERSION:
            raise InputError(f"Ledger {path} has schema version {version}; this edge-inspect reads up to version "
                             f"{SCHEMA_VERSION}. Upgrade edge-inspect, or pass another --ledger path.")
        if version == SCHEMA_VERSION and "parts" in tables:
            return
        if version == 0 and not tables:
            if not create:
                raise InputError(f"Ledger {path} is empty: no verdict was ever written to it.")
            Ledger._create_schema(conn)
            return
        raise InputError(f"{path} is an SQLite file but not an edge-inspect ledger (user_version {version}, tables: "
                         f"{', '.join(sorted(tables)) or 'none'}). Pass another --ledger path.")

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close every connection of this ledger."""
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ write

    def _transaction(self, body) -> None:
        """Run ``body(connection)`` in one write transaction; roll back if it fails.

        Raises:
            InputError: SQLite cannot write (disk full, read-only file, ...).
        """
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    body(self._conn)
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise InputError(f"Cannot write to the ledger {self.path} (SQLite says: {exc}). Check free disk "
                                 "space and that the file is writable; the parts not committed are inspected "
                                 "again after a restart.") from exc

    def record(self, records: Sequence[Record]) -> list[Record | None]:
        """Write verdicts in one transaction.

        Args:
            records: rows without an id.

        Returns:
            Per record, the record with its new id, or None when its
            identity was already in the ledger (nothing written for it).

        Raises:
            InputError: the ledger cannot be written.
        """
        out: list[Record | None] = []

        def insert(conn):
            out.clear()
            for rec in records:
                cursor = conn.execute(_INSERT, tuple(getattr(rec, c) for c in COLUMNS if c != "id"))
                out.append(replace(rec, id=cursor.lastrowid) if cursor.rowcount == 1 else None)

        self._transaction(insert)
        return out

    def finish_sinks(self, updates: dict[int, dict]) -> None:
        """After the sinks ran: set each row's remaining sinks and sink outputs, in one transaction.

        Args:
            updates: row id -> columns to set, among ``sinks_pending``,
                ``sorted_path`` and ``heatmap``.

        Raises:
            InputError: the ledger cannot be written.
        """
        for values in updates.values():
            unknown = set(values) - {"sinks_pending", "sorted_path", "heatmap"}
            if unknown:
                raise ValueError(f"finish_sinks cannot set {sorted(unknown)}")

        def update(conn):
            for row_id, values in updates.items():
                assignments = ", ".join(f"{name} = ?" for name in values)
                conn.execute(f"UPDATE parts SET {assignments} WHERE id = ?", (*values.values(), row_id))

        if updates:
            self._transaction(update)

    # ------------------------------------------------------------------- read

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    def known(self, identity: str) -> bool:
        """Whether a verdict for this identity is committed. Any thread may call it."""
        return self._reader().execute("SELECT 1 FROM parts WHERE identity = ?", (identity,)).fetchone() is not None

    def seen_file(self, path: str | os.PathLike, size: int, mtime_ns: int) -> bool:
        """Whether some verdict is committed for this path at this size and mtime. Any thread may call it."""
        return self._reader().execute("SELECT 1 FROM parts WHERE source = ? AND size = ? AND mtime_ns = ?",
                                      (os.fspath(path), size, mtime_ns)).fetchone() is not None

    def pending(self) -> list[Record]:
        """Rows whose sinks have not all run, oldest first."""
        with self._lock:
            return [_row(v) for v in self._conn.execute(f"{_SELECT} WHERE sinks_pending != '' ORDER BY id")]

    def get(self, row_id: int) -> Record | None:
        """The row with this id, or None."""
        with self._lock:
            values = self._conn.execute(f"{_SELECT} WHERE id = ?", (row_id,)).fetchone()
        return None if values is None else _row(values)

    def counts(self, since: float | None = None) -> dict[str, int]:
        """Verdicts per kind (``ok``, ``ng``, ``error``), committed at or after ``since`` (Unix time)."""
        counts = {"ok": 0, "ng": 0, "error": 0}
        with self._lock:
            for verdict, n in self._conn.execute(
                    "SELECT verdict, count(*) FROM parts WHERE committed_at >= ? GROUP BY verdict", (since or 0.0,)):
                counts[verdict] = n
        return counts

    def last(self, n: int, since: float | None = None) -> list[Record]:
        """The ``n`` most recent rows, oldest first."""
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} WHERE committed_at >= ? ORDER BY id DESC LIMIT ?",
                                      (since or 0.0, n)).fetchall()
        return [_row(v) for v in reversed(rows)]

    def rows(self, since: float | None = None) -> Iterator[Record]:
        """Every row committed at or after ``since``, oldest first."""
        cursor = self._reader().execute(f"{_SELECT} WHERE committed_at >= ? ORDER BY id", (since or 0.0,))
        for values in cursor:
            yield _row(values)

    def write_csv(self, path: str | os.PathLike, since: float | None = None) -> int:
        """Export rows (committed at or after ``since``) as CSV, one column per ledger column; returns the row count.

        Raises:
            InputError: the file cannot be written.
        """
        import csv

        columns = ["id", *(c for c in COLUMNS if c not in ("id", "identity", "sinks_pending"))]
        n = 0
        try:
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                for record in self.rows(since):
                    values = asdict(record)
                    writer.writerow(["" if values[c] is None else values[c] for c in columns])
                    n += 1
        except OSError as exc:
            raise InputError(f"Cannot write {path} ({exc.strerror or exc}); check that its folder exists and is "
                             "writable.") from exc
        return n


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """A ``--since`` value as a Unix time.

    Accepts a duration back from now (``90s``, ``30m``, ``12h``, ``7d``,
    ``2w``), ``today`` (local midnight), or an ISO 8601 date or date-time
    (``2024-05-01``, ``2024-05-01T08:00``; local time unless it has an
    offset).

    Raises:
        InputError: none of these.
    """
    import datetime as dt
    import re
    import time

    now = time.time() if now is None else now
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.lower())
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    if text.lower() == "today":
        midnight = dt.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight.timestamp()
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise InputError(f"--since {text!r} is not a time. Expected a duration back from now (30m, 12h, 7d), "
                         "'today', or an ISO date or date-time (2024-05-01, 2024-05-01T08:00).") from None
