"""The ledger: one durable verdict per part, in a SQLite file.

This module owns the record of what the line inspected: one row per part
(a file dropped in a hot folder, or a camera frame) with its identity, its
verdict, the model that gave it, its timings, and which sinks (JSONL, sort,
heatmaps) still have to run for it. :mod:`edge_inspect.watch` writes it;
``edge-inspect results`` reads it; ``edge-inspect ledger check`` and
``edge-inspect ledger recover`` look after it (:func:`check`, :func:`recover`).

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

Schema (``PRAGMA user_version``, now 4): the table ``parts`` has one column
per :class:`Record` field. Version 2 added ``source_raw`` (the exact bytes
of a file name that is not valid UTF-8; ``source`` then shows those bytes
as ``\\xff`` escapes, see :func:`path_columns`) and ``sink_error`` (why a
sink last failed for the row); version 3 the outbox's cursors; version 4
``polarity`` (how the decision score comes from the criterion's value) and
``input_note`` (how far the image was from the model's input). An
older ledger is migrated in place when opened for writing; one opened
read-only is read as it is. A file that is not a ledger, or a ledger from a
newer edge-inspect, is refused with an :class:`~edge_inspect.errors.InputError`.

What else the ledger guards against, each with an error that says what to do:

- **any file name and any text**: names that are not UTF-8 (a str holding
  lone surrogates, as Python gives them) and messages quoting them are
  stored as valid UTF-8 text, with the raw bytes of the name kept aside.
- **a damaged file**: :meth:`Ledger.open` runs SQLite's ``integrity_check``
  (``quick_check`` when read-only). A damaged ledger, found then or by a
  later query, raises :class:`~edge_inspect.errors.LedgerDamagedError`
  (nothing is changed) naming ``edge-inspect ledger recover PATH``:
  :func:`recover` salvages every row that can still be read into a new
  file at PATH and keeps the damaged one beside it.
- **a ledger deleted, renamed or replaced under a running watcher**: every
  write transaction checks, just before it commits, that the path still
  names the file opened; otherwise it rolls back and raises
  :class:`~edge_inspect.errors.LedgerGoneError`, so no verdict goes into a
  file the next start would not read.
- **a ledger that cannot be written** (file mode, owner, read-only mount, a
  folder where ``-wal`` and ``-shm`` cannot be created) is refused at open,
  by a real write, not at the first part. ``readonly=True`` opens it for
  reading only (``edge-inspect results``, ``ledger check``).

    >>> with Ledger.open("parts/.edge-inspect/ledger.sqlite") as ledger:
    ...     ledger.counts()
    {'ok': 981, 'ng': 17, 'error': 2}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import quote

from edge_inspect.errors import EdgeInspectError, InputError, LedgerDamagedError, LedgerGoneError

log = logging.getLogger(__name__)

#: The schema this module writes; ``PRAGMA user_version`` of every ledger.
SCHEMA_VERSION = 4

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
    heatmap TEXT,
    source_raw BLOB,
    sink_error TEXT,
    polarity TEXT,
    input_note TEXT
);
CREATE INDEX parts_file ON parts (source, size, mtime_ns);
CREATE INDEX parts_committed ON parts (committed_at);
CREATE INDEX parts_pending ON parts (id) WHERE sinks_pending != '';
CREATE TABLE cursors (sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('ledger_id', lower(hex(randomblob(6))));
"""

#: Statements that bring a ledger of version ``v`` to ``v + 1``. New columns go
#: at the end of the table, where a new ledger has them too.
_MIGRATIONS = {
    1: ("ALTER TABLE parts ADD COLUMN source_raw BLOB", "ALTER TABLE parts ADD COLUMN sink_error TEXT"),
    # The outbox (edge_inspect.outbox): each network sink's delivery cursor, and this ledger's id for message ids.
    2: ("CREATE TABLE cursors (sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL, updated_at REAL NOT NULL)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta VALUES ('ledger_id', lower(hex(randomblob(6))))"),
    # The criterion's polarity, which says how the decision score comes from its raw value; and how far each
    # image was from the model's input.
    3: ("ALTER TABLE parts ADD COLUMN polarity TEXT", "ALTER TABLE parts ADD COLUMN input_note TEXT"),
}

_SQLITE_HEADER = b"SQLite format 3\x00"
# SQLite's primary result codes (the low byte of an extended code).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_CORRUPT, _SQLITE_CANTOPEN, _SQLITE_AUTH, _SQLITE_NOTADB = 11, 14, 23, 26


# ------------------------------------------------------------------ text


def _utf8_text(text: str) -> str:
    """``text`` made storable as UTF-8: lone surrogates become backslash escapes.

    Bytes a name smuggled in through ``surrogateescape`` show as ``\\xff``;
    any other lone surrogate as ``\\ud800``. Valid text is returned as is.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def path_columns(path: str | bytes | os.PathLike) -> tuple[str, bytes | None]:
    """The ``source`` and ``source_raw`` columns of a file path.

    Returns:
        ``(text, raw)``: ``text`` is valid UTF-8 (bytes that are not UTF-8
        are shown as ``\\xff`` escapes); ``raw`` is the path's exact bytes
        (:func:`os.fsencode`) when it is not valid UTF-8, else None.

        >>> path_columns(os.fsdecode(b"/line/bad\\xff.jpeg"))
        ('/line/bad\\\\xff.jpeg', b'/line/bad\\xff.jpeg')
    """
    name = os.fspath(path)
    if isinstance(name, str):
        try:
            name.encode("utf-8")
            return name, None
        except UnicodeEncodeError:
            pass
        try:
            raw = os.fsencode(name)
        except UnicodeEncodeError:  # a surrogate no file system name decodes to: no bytes to keep
            return _utf8_text(name), None
    else:
        raw = name
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


def file_identity(path: str | bytes | os.PathLike, size: int, mtime_ns: int, sha256: str | None) -> str:
    """The identity of a file's content; ``sha256`` is None when it could not be read.

    Valid UTF-8 text for any path, and distinct for distinct paths: a name
    that is not UTF-8 is spelled in hex after a ``file-bytes:`` marker, so
    the byte ``0xff`` never meets a name holding a literal ``\\xff``.
    """
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return f"file-bytes:{sha256 or '-'}:{size}:{mtime_ns}:{os.fsencode(name).hex()}"
        except UnicodeEncodeError:  # not a name from a file system; still one identity per string
            return f"file-str:{sha256 or '-'}:{size}:{mtime_ns}:{name.encode('utf-8', 'surrogatepass').hex()}"
    return f"file:{sha256 or '-'}:{size}:{mtime_ns}:{name}"


def frame_identity(uri: str, timestamp: float, index: int) -> str:
    """The identity of a camera frame."""
    return f"frame:{timestamp!r}:{index}:{uri}"


@dataclass(frozen=True)
class Record:
    """One part's row in the ledger.

    Attributes:
        identity: :func:`file_identity` or :func:`frame_identity`; unique.
        kind: ``"file"`` or ``"frame"``.
        source: the file's path, or the camera's URI; valid UTF-8 text (see
            :func:`path_columns`; :attr:`path` is the exact file path).
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
        source_raw: the file path's exact bytes when they are not valid
            UTF-8; None otherwise (and for frames).
        sink_error: why a sink last failed for this row; None otherwise.
        polarity: the criterion's polarity (``high``, ``low``,
            ``two-sided``): ``score`` is the criterion's value, its negative,
            or its distance from the normal median; None in rows written
            before it was recorded.
        input_note: how far the image was from the model's input (colour,
            much larger or smaller, another aspect ratio; see
            :func:`edge_inspect.preprocess.input_note`); None when it was
            close, on error verdicts, and in rows written before it was
            recorded.
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
    source_raw: bytes | None = None
    sink_error: str | None = None
    polarity: str | None = None
    input_note: str | None = None
    id: int | None = None

    @property
    def pending(self) -> set[str]:
        """The sinks still to run, as a set of names."""
        return set(self.sinks_pending.split())

    @property
    def path(self) -> Path:
        """The exact file path: from ``source_raw`` when the name is not UTF-8, else ``source``."""
        return Path(os.fsdecode(self.source_raw)) if self.source_raw is not None else Path(self.source)

    @property
    def raw_score(self) -> float | None:
        """The deciding criterion's own value, from which ``score`` comes by ``polarity``; None on error."""
        if not self.criteria or self.criterion is None:
            return None
        return json.loads(self.criteria).get(self.criterion)

    def to_dict(self) -> dict:
        """The row as a JSON object: columns in schema order, ``criteria`` parsed, without ``source_raw`` (bytes)."""
        # Every field is a scalar: read them, rather than pay for dataclasses.asdict's deep copy on every verdict.
        data = {"id": self.id, **{k: getattr(self, k) for k in _DICT_COLUMNS}}
        data["criteria"] = json.loads(self.criteria) if self.criteria else {}
        return data


#: Column names, in the order of :class:`Record`'s fields (``id`` last).
COLUMNS = tuple(f.name for f in fields(Record))
_DICT_COLUMNS = tuple(c for c in COLUMNS if c not in ("id", "source_raw"))
_TEXT_COLUMNS = tuple(f.name for f in fields(Record) if "str" in str(f.type))
_INSERT = (f"INSERT INTO parts ({', '.join(c for c in COLUMNS if c != 'id')}) "
           f"VALUES ({', '.join('?' for c in COLUMNS if c != 'id')}) ON CONFLICT (identity) DO NOTHING")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM parts"
#: What finish_sinks may set.
SINK_COLUMNS = ("sinks_pending", "sorted_path", "heatmap", "sink_error")


def _row(values: Sequence) -> Record:
    return Record(**dict(zip(COLUMNS, values)))


def _storable(record: Record) -> Record:
    """The record as the ledger stores it: every text valid UTF-8, a non-UTF-8 file name's bytes in ``source_raw``."""
    changes = {}
    for name in _TEXT_COLUMNS:
        value = getattr(record, name)
        if isinstance(value, str) and not value.isascii():
            safe = _utf8_text(value)
            if safe is not value:
                changes[name] = safe
    if "source" in changes and record.kind == "file" and record.source_raw is None:
        changes["source"], changes["source_raw"] = path_columns(record.source)
    return replace(record, **changes) if changes else record


def _code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of an error, when Python reports it."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the file's content is inconsistent (not locked, not unreadable)."""
    if "unsupported file format" in str(exc):  # a garbled schema format number in the header (SQLITE_ERROR)
        return True
    if "Could not decode to UTF-8" in str(exc):  # Python's error: the ledger only ever stores valid UTF-8
        return True
    return _code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _has_sqlite_header(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == _SQLITE_HEADER
    except OSError:
        return False


def _damaged(path: Path, problems: Sequence[str]) -> LedgerDamagedError:
    first = problems[0] if problems else "no detail"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return LedgerDamagedError(
        f"Ledger {path} is damaged: SQLite reports {first!r}{more}. Nothing was changed. Stop the watcher, then "
        f"save every row that can still be read into a new ledger with: edge-inspect ledger recover "
        f"{shlex.quote(str(path))} (the damaged file is kept beside it).")


def _not_a_ledger(path: Path, said: sqlite3.Error | str) -> InputError:
    return InputError(f"{path} is not an edge-inspect ledger (SQLite says: {said}). Expected the ledger file "
                      "edge-inspect watch writes; point the source's ledger setting at another file.")


def _not_writable(path: Path, exc: sqlite3.Error | str) -> InputError:
    return InputError(
        f"Ledger {path} cannot be written (SQLite says: {exc}). The watcher commits every verdict there before "
        "acting on the part. Give the user running edge-inspect write access to the file (its mode and owner: "
        f"chmod, chown) and to its folder {path.parent} as well, since WAL mode creates {path.name}-wal and "
        f"{path.name}-shm beside it; or point the source's ledger setting at another file. To only read it, use "
        "edge-inspect results.")


def _read_error(path: Path, exc: sqlite3.Error) -> EdgeInspectError:
    """The error to raise for a failed query on an open ledger."""
    if _is_damage(exc):
        return _damaged(path, [str(exc)]) if _has_sqlite_header(path) else _not_a_ledger(path, exc)
    return InputError(f"Cannot read the ledger {path} (SQLite says: {exc}). Check that the file and its folder "
                      "are readable by the user running edge-inspect, and that the disk is healthy.")


def _open_error(path: Path, exc: sqlite3.Error, readonly: bool) -> EdgeInspectError:
    """The error to raise when opening a ledger fails on ``exc``."""
    if not readonly and _code(exc) in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_AUTH):
        return _not_writable(path, exc)
    if readonly and _code(exc) in (_SQLITE_CANTOPEN, _SQLITE_READONLY) and path.is_file():
        return InputError(f"Cannot open the ledger {path} for reading (SQLite says: {exc}). A ledger in WAL mode "
                          f"needs {path.name}-shm beside it, which this user cannot create in {path.parent}. Run as "
                          "the user the watcher runs as, or let this user write to that folder.")
    return _read_error(path, exc)


def _connect(path: Path, readonly: bool) -> tuple[sqlite3.Connection, str | None]:
    """A connection to ``path``, and for ``readonly`` the URI it was opened with (readers reuse it)."""
    if not readonly:
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0), None
    uri = f"file:{quote(os.fsencode(os.path.abspath(path)))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        if _code(exc) != _SQLITE_CANTOPEN or os.path.exists(f"{path}-wal") or not _read_only_mount(path.parent):
            return conn, uri  # the caller's first query raises it again, and says what it means
        conn.close()
        # A WAL ledger on a read-only mount, closed cleanly (no -wal): SQLite cannot create the -shm index beside
        # it. No log holds rows the file lacks, and nobody can write there: read the file as immutable.
        uri += "&immutable=1"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)
    return conn, uri


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _sqlite_check(conn: sqlite3.Connection, full: bool = False, limit: int = 20, readonly: bool = False) -> list[str]:
    """SQLite's own check of the file: the problems it lists, empty when healthy.

    ``quick_check`` reads every page and checks the b-trees, but does not
    match index entries against rows; ``integrity_check`` (``full``) does,
    and checks the CHECK constraints too, except on a read-only connection:
    there (``readonly``), a query does that part.
    """
    try:
        lines = [line for (line,) in conn.execute(f"PRAGMA {'integrity' if full else 'quick'}_check({limit})")]
        if lines == ["ok"] and full and readonly and conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'parts'").fetchone():
            lines = [f"CHECK constraint failed in parts (row {row_id}: kind {kind!r}, verdict {verdict!r})"
                     for row_id, kind, verdict in conn.execute(_VIOLATIONS, (limit,))] or lines
    except sqlite3.DatabaseError as exc:
        if not _is_damage(exc):
            raise
        return [str(exc)]
    return [] if lines == ["ok"] else [str(line) for line in lines]


#: Rows breaking the table's CHECK constraints, which integrity_check skips on a read-only connection.
_VIOLATIONS = ("SELECT id, CAST(kind AS BLOB), CAST(verdict AS BLOB) FROM parts "
               "WHERE kind NOT IN ('file', 'frame') OR verdict NOT IN ('ok', 'ng', 'error') LIMIT ?")


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection):
    """One write transaction on a bare connection: committed at the end, rolled back if the body raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class Ledger:
    """An open ledger file. Build one with :meth:`open`.

    Writes go through one connection, serialised by a lock; :meth:`known`
    and :meth:`seen_file` may be called from any thread (each thread reads
    through a connection of its own, which WAL mode lets run beside the
    writer).
    """

    def __init__(self, path: Path, connection: sqlite3.Connection, *, readonly: bool = False,
                 uri: str | None = None, select: str = _SELECT):
        self.path = path
        self.readonly = readonly
        self._conn = connection
        self._uri = uri
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._abspath = os.path.abspath(path)
        st = os.stat(self._abspath)
        self._file_id = (st.st_dev, st.st_ino)
        self._select = select
        # The write-ahead log and its index beside the file, as this ledger's connection holds them (see close).
        self._log_ids: dict[str, tuple[int, int]] = {}
        for suffix in ("-wal", "-shm") if not readonly else ():
            try:
                st = os.stat(f"{self._abspath}{suffix}")
            except OSError:
                continue
            self._log_ids[suffix] = (st.st_dev, st.st_ino)

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = True, readonly: bool = False) -> Ledger:
        """Open a ledger, creating it (and its folder) when ``create`` and missing.

        A version-1 ledger is migrated to version 2 in place (one
        transaction); opened ``readonly``, it is read as it is. Opened for
        writing, a first real write (``PRAGMA user_version`` rewritten in a
        transaction) proves the file can take verdicts.

        Args:
            path: the ledger file.
            create: create it when missing (never with ``readonly``).
            readonly: only read: no migration, no journal-mode switch, no
                write; works on a read-only file or mount.

        Raises:
            LedgerDamagedError: SQLite finds the file damaged: its full
                ``integrity_check`` when opened for writing (the identity
                index must match the rows, or exactly once fails), the
                faster ``quick_check`` (b-trees and pages, not index against
                rows) when ``readonly``.
            InputError: the path is a folder, is missing (``create=False``),
                is not an edge-inspect ledger, holds a newer schema, or
                (not ``readonly``) cannot be written.
        """
        path = Path(path)
        if path.is_dir():
            raise InputError(f"Ledger path {path} is a folder; expected a ledger file such as {path / 'ledger.sqlite'}.")
        create = create and not readonly
        if not path.exists():
            if not create:
                raise InputError(f"No ledger at {path}. Expected the file edge-inspect watch writes; "
                                 "check the path (the ledger setting, or the watched folder).")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"Cannot create the folder of the ledger {path} ({exc.strerror or exc}); point the "
                                 "ledger setting at another path, or make its folder writable.") from exc
        try:
            conn, uri = _connect(path, readonly)
        except sqlite3.Error as exc:
            raise _open_error(path, exc, readonly) from exc
        try:
            try:
                # Before the schema: damage can garble the header's user_version, and must be named as damage.
                problems = _sqlite_check(conn, full=not readonly)
                if problems:
                    raise _damaged(path, problems) if _has_sqlite_header(path) else _not_a_ledger(path, problems[0])
                version = cls._check_schema(conn, path, create)
                if not readonly:
                    cls._prepare_for_writing(conn, path, version)
                    version = SCHEMA_VERSION
                ledger = cls(path, conn, readonly=readonly, uri=uri, select=_select_for(conn, version))
            except sqlite3.Error as exc:
                raise _open_error(path, exc, readonly) from exc
        except BaseException:
            conn.close()
            raise
        return ledger

    @staticmethod
    def _check_schema(conn: sqlite3.Connection, path: Path, create: bool) -> int:
        """The ledger's schema version, after creating the schema in a new file; raises if it is no ledger."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version > SCHEMA_VERSION:
            raise InputError(f"Ledger {path} has schema version {version}; this edge-inspect reads up to version "
                             f"{SCHEMA_VERSION}. Upgrade edge-inspect, or point the ledger setting at another file.")
        if version >= 1 and "parts" in tables:
            return version
        if version == 0 and not tables:
            if not create:
                raise InputError(f"Ledger {path} is empty: no verdict was ever written to it.")
            Ledger._create_schema(conn)
            return SCHEMA_VERSION
        raise InputError(f"{path} is an SQLite file but not an edge-inspect ledger (user_version {version}, tables: "
                         f"{', '.join(sorted(tables)) or 'none'}). Point the ledger setting at another file.")

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        with _immediate(conn):
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def _prepare_for_writing(conn: sqlite3.Connection, path: Path, version: int) -> None:
        """Migrate, switch to WAL with full syncs, and prove with a real write that verdicts can be committed."""
        try:
            if version < SCHEMA_VERSION:
                Ledger._migrate(conn, path)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("Ledger %s: journal mode %s instead of WAL (the file system may not support WAL); "
                            "verdicts stay durable, readers may wait on the writer.", path, mode)
            conn.execute("PRAGMA synchronous=FULL")
            # Rewriting the header's user_version writes and syncs a page: the same path as a verdict's commit.
            with _immediate(conn):
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            if _is_damage(exc):
                raise _damaged(path, [str(exc)]) from exc
            if _code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED):
                raise InputError(f"Ledger {path} stayed locked by another process writing to it (SQLite says: {exc}"
                                 "). Is another edge-inspect watch using it? Stop that one, or point the ledger setting "
                                 "at another file; edge-inspect results can read it meanwhile.") from exc
            raise _not_writable(path, exc) from exc

    @staticmethod
    def _migrate(conn: sqlite3.Connection, path: Path) -> None:
        with _immediate(conn):
            # read again under the write lock: another process may have migrated the file meanwhile
            start = version = conn.execute("PRAGMA user_version").fetchone()[0]
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if start < SCHEMA_VERSION:
            log.info("Ledger %s: schema upgraded from version %d to %d.", path, start, SCHEMA_VERSION)

    def close(self) -> None:
        """Close every connection of this ledger.

        When the path names another file by then (the ledger was replaced
        while open), this ledger's ``-wal`` and ``-shm``, still at the path,
        are renamed to ``PATH.replaced-<time>-wal`` (and ``-shm``): SQLite
        would otherwise replay the old file's log into the new one.
        """
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._conn.close()
        if self._log_ids:
            self._set_aside_log()

    def _set_aside_log(self) -> None:
        try:
            st = os.stat(self._abspath)
        except OSError:
            return  # deleted or renamed: the log stays at the old name, ready for the file moved back
        if (st.st_dev, st.st_ino) == self._file_id:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix, ident in self._log_ids.items():
            name, aside = f"{self._abspath}{suffix}", f"{self._abspath}.replaced-{stamp}{suffix}"
            try:
                st = os.stat(name)
                if (st.st_dev, st.st_ino) != ident:
                    continue  # the new file's own
                os.rename(name, aside)
            except OSError:
                continue
            log.warning("Ledger %s was replaced while open: its %s is kept as %s, so that SQLite does not apply it "
                        "to the new file.", self.path, suffix, aside)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ write

    def _check_same_file(self) -> None:
        """Raise :class:`LedgerGoneError` unless the path still names the file opened."""
        try:
            st = os.stat(self._abspath)
        except FileNotFoundError:
            raise LedgerGoneError(
                f"Ledger {self.path} was deleted or renamed while the watcher was running: no file has that name "
                f"any more. A verdict written now would be lost to the next start, which reads {self.path}, and "
                "every part still in the folder would then be inspected again; nothing was written. Move the ledger "
                f"back, or restore it from a backup, leaving {self.path.name}-wal where it is (it holds the latest "
                "verdicts); or restart the watcher to start over knowingly with a new ledger.") from None
        except OSError as exc:
            raise InputError(f"Cannot check the ledger {self.path} before writing ({exc.strerror or exc}); "
                             "check that its folder is still there and readable.") from exc
        if (st.st_dev, st.st_ino) != self._file_id:
            raise LedgerGoneError(
                f"Ledger {self.path} was replaced by another file while the watcher was running. A verdict written "
                "now would go into the old file, which the next start does not read, and every part still in the "
                "folder would then be inspected again; nothing was written. Put the ledger back, or restart the "
                "watcher to carry on knowingly with the file now at that path.")

    def _transaction(self, body) -> None:
        """Run ``body(connection)`` in one write transaction; roll back if it fails.

        Just before committing, checks that the path still names the ledger
        file opened; if not, rolls back, so nothing goes into a file the next
        start would not read.

        Raises:
            LedgerGoneError: the file was deleted, renamed or replaced.
            LedgerDamagedError: SQLite found the file damaged.
            InputError: SQLite cannot write (disk full, read-only file, ...).
        """
        if self.readonly:
            raise InputError(f"Ledger {self.path} was opened read-only; open it with readonly=False to write.")
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    body(self._conn)
                    self._check_same_file()
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if _is_damage(exc):
                    raise _damaged(self.path, [str(exc)]) from exc
                raise InputError(f"Cannot write to the ledger {self.path} (SQLite says: {exc}). Check free disk "
                                 "space and that the file is writable; the parts not committed are inspected "
                                 "again after a restart.") from exc

    def record(self, records: Sequence[Record]) -> list[Record | None]:
        """Write verdicts in one transaction.

        Text that is not valid UTF-8 (a file name's bytes smuggled in a str
        as lone surrogates, or a message quoting one) is stored with those
        bytes as backslash escapes; a file's exact path bytes go to
        ``source_raw``.

        Args:
            records: rows without an id.

        Returns:
            Per record, the record as stored with its new id, or None when
            its identity was already in the ledger (nothing written for it).

        Raises:
            LedgerGoneError: the ledger file was deleted, renamed or replaced.
            InputError: the ledger cannot be written.
        """
        rows = [_storable(rec) for rec in records]
        out: list[Record | None] = []

        def insert(conn):
            out.clear()
            for rec in rows:
                cursor = conn.execute(_INSERT, tuple(getattr(rec, c) for c in COLUMNS if c != "id"))
                out.append(replace(rec, id=cursor.lastrowid) if cursor.rowcount == 1 else None)

        self._transaction(insert)
        return out

    def finish_sinks(self, updates: dict[int, dict]) -> None:
        """After the sinks ran: set each row's remaining sinks and sink outputs, in one transaction.

        Args:
            updates: row id -> columns to set, among ``sinks_pending``,
                ``sorted_path``, ``heatmap`` and ``sink_error``.

        Raises:
            ValueError: another column is named.
            LedgerGoneError: the ledger file was deleted, renamed or replaced.
            InputError: the ledger cannot be written.
        """
        for values in updates.values():
            unknown = set(values) - set(SINK_COLUMNS)
            if unknown:
                raise ValueError(f"finish_sinks cannot set {sorted(unknown)}; only {', '.join(SINK_COLUMNS)}")

        def update(conn):
            for row_id, values in updates.items():
                assignments = ", ".join(f"{name} = ?" for name in values)
                conn.execute(f"UPDATE parts SET {assignments} WHERE id = ?",
                             (*(_utf8_text(v) if isinstance(v, str) else v for v in values.values()), row_id))

        if updates:
            self._transaction(update)

    # ------------------------------------------------------------------- read

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._uri is not None:
                conn = sqlite3.connect(self._uri, uri=True, isolation_level=None, check_same_thread=False,
                                       timeout=30.0)
            else:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    def _query(self, sql: str, params: Sequence = (), *, reader: bool = False) -> list[tuple]:
        """All rows of a query; a damaged file raises :class:`LedgerDamagedError`, never a raw sqlite3 error."""
        try:
            if reader:
                return self._reader().execute(sql, params).fetchall()
            with self._lock:
                return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _read_error(self.path, exc) from exc

    def known(self, identity: str) -> bool:
        """Whether a verdict for this identity is committed. Any thread may call it.

        Raises:
            LedgerDamagedError: the file is damaged.
        """
        return bool(self._query("SELECT 1 FROM parts WHERE identity = ?", (_utf8_text(identity),), reader=True))

    def seen_file(self, path: str | bytes | os.PathLike, size: int, mtime_ns: int) -> bool:
        """Whether some verdict is committed for this path at this size and mtime. Any thread may call it.

        Raises:
            LedgerDamagedError: the file is damaged.
        """
        source, raw = path_columns(path)
        if self._select is not _SELECT:  # a version-1 ledger read as it is: no source_raw column
            return bool(self._query("SELECT 1 FROM parts WHERE source = ? AND size = ? AND mtime_ns = ?",
                                    (source, size, mtime_ns), reader=True))
        return bool(self._query("SELECT 1 FROM parts WHERE source = ? AND size = ? AND mtime_ns = ? "
                                "AND source_raw IS ?", (source, size, mtime_ns, raw), reader=True))

    def pending(self) -> list[Record]:
        """Rows whose sinks have not all run, oldest first."""
        return [_row(v) for v in self._query(f"{self._select} WHERE sinks_pending != '' ORDER BY id")]

    # ------------------------------------------------------------ the outbox

    def ledger_id(self) -> str:
        """This ledger's random id (made with it): message ids stay unique if a ledger is ever made anew."""
        return self._query("SELECT value FROM meta WHERE key = 'ledger_id'", reader=True)[0][0]

    def cursor(self, sink: str, *, start_at: str = "end") -> int:
        """The last row id delivered to ``sink``; a sink new to this ledger starts at its last row, or at 0.

        Raises:
            InputError: the ledger cannot be written (a new cursor is stored at once).
        """
        found = self._query("SELECT last_id FROM cursors WHERE sink = ?", (sink,), reader=True)
        if found:
            return found[0][0]
        import time

        def create(conn):
            recovered = conn.execute("SELECT 1 FROM meta WHERE key = 'cursor_start' AND value = 'first'").fetchone()
            top = (conn.execute("SELECT coalesce(max(id), 0) FROM parts").fetchone()[0]
                   if start_at == "end" and not recovered else 0)
            conn.execute("INSERT OR IGNORE INTO cursors VALUES (?, ?, ?)", (sink, top, time.time()))

        self._transaction(create)
        return self._query("SELECT last_id FROM cursors WHERE sink = ?", (sink,), reader=True)[0][0]

    def after(self, row_id: int, limit: int) -> list[Record]:
        """Up to ``limit`` rows with an id above ``row_id``, in id order."""
        return [_row(v) for v in self._query(f"{self._select} WHERE id > ? ORDER BY id LIMIT ?", (row_id, limit),
                                             reader=True)]

    def advance(self, sink: str, last_id: int) -> None:
        """Record that ``sink`` has every row up to ``last_id`` (never moves back)."""
        import time

        self._transaction(lambda conn: conn.execute(
            "UPDATE cursors SET last_id = max(last_id, ?), updated_at = ? WHERE sink = ?", (last_id, time.time(), sink)))

    def undelivered(self, row_id: int, now: float | None = None) -> tuple[int, float | None]:
        """Rows above ``row_id``, and the age in seconds of the oldest of them (None when there is none)."""
        import time

        count, oldest = self._query("SELECT count(*), min(committed_at) FROM parts WHERE id > ?", (row_id,),
                                    reader=True)[0]
        return count, (None if oldest is None else (now if now is not None else time.time()) - oldest)

    def backlog(self, now: float | None = None) -> tuple[int, float | None]:
        """Rows whose sinks are pending, and the age in seconds of the oldest (None when there is none)."""
        import time

        count, oldest = self._query("SELECT count(*), min(committed_at) FROM parts WHERE sinks_pending != ''",
                                    reader=True)[0]
        return count, (None if oldest is None else (now if now is not None else time.time()) - oldest)

    def get(self, row_id: int) -> Record | None:
        """The row with this id, or None."""
        rows = self._query(f"{self._select} WHERE id = ?", (row_id,))
        return _row(rows[0]) if rows else None

    def get_many(self, ids: Iterable[int]) -> list[Record]:
        """The rows with these ids, in id order; ids with no row are left out."""
        wanted = sorted(set(ids))
        out: list[Record] = []
        for start in range(0, len(wanted), 500):  # under SQLite's limit on bound parameters
            chunk = wanted[start:start + 500]
            rows = self._query(f"{self._select} WHERE id IN ({', '.join('?' * len(chunk))}) ORDER BY id", chunk)
            out.extend(_row(v) for v in rows)
        return out

    def counts(self, since: float | None = None) -> dict[str, int]:
        """Verdicts per kind (``ok``, ``ng``, ``error``), committed at or after ``since`` (Unix time)."""
        counts = {"ok": 0, "ng": 0, "error": 0}
        for verdict, n in self._query("SELECT verdict, count(*) FROM parts WHERE committed_at >= ? GROUP BY verdict",
                                      (since or 0.0,)):
            counts[verdict] = n
        return counts

    def last(self, n: int, since: float | None = None) -> list[Record]:
        """The ``n`` most recent rows, oldest first."""
        rows = self._query(f"{self._select} WHERE committed_at >= ? ORDER BY id DESC LIMIT ?", (since or 0.0, n))
        return [_row(v) for v in reversed(rows)]

    def rows(self, since: float | None = None) -> Iterator[Record]:
        """Every row committed at or after ``since``, oldest first.

        Raises:
            LedgerDamagedError: the file is damaged (possibly after some rows).
        """
        try:
            cursor = self._reader().execute(f"{self._select} WHERE committed_at >= ? ORDER BY id", (since or 0.0,))
            for values in cursor:
                yield _row(values)
        except sqlite3.Error as exc:
            raise _read_error(self.path, exc) from exc

    def write_csv(self, path: str | os.PathLike, since: float | None = None) -> int:
        """Export rows (committed at or after ``since``) as CSV, one column per ledger column; returns the row count.

        Leaves out ``identity``, ``sinks_pending`` and ``source_raw`` (the
        ``source`` column shows a non-UTF-8 name with ``\\xff`` escapes).
        Spreadsheet-ready: times (``*_at``, ``frame_time``) as ISO 8601 with
        the UTC offset; ``raw_score`` (the criterion's own value) beside the
        decision ``score``; and instead of the ``criteria`` object, one
        column per criterion, ``criteria.NAME``, empty where a row lacks it.

        Raises:
            LedgerDamagedError: the ledger is damaged.
            InputError: the file cannot be written.
        """
        import csv

        from edge_inspect.numbers import timestamp

        names: dict[str, None] = {}  # every criterion of the exported rows, in the order the rows give them
        for record in self.rows(since):
            names.update(dict.fromkeys(json.loads(record.criteria) if record.criteria else ()))
        columns = ["id"]
        for c in COLUMNS:
            if c in ("id", "identity", "sinks_pending", "source_raw", "polarity"):
                continue
            columns += {"score": ["score", "raw_score"], "criterion": ["criterion", "polarity"],
                        "criteria": [f"criteria.{name}" for name in names]}.get(c, [c])
        times = {"frame_time", "arrived_at", "read_at", "inspected_at", "committed_at"}
        n = 0
        try:
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                for record in self.rows(since):
                    values = {c: getattr(record, c) for c in COLUMNS if c in columns}
                    values.update({c: timestamp(values[c]) for c in times})
                    values["raw_score"] = record.raw_score
                    criteria = json.loads(record.criteria) if record.criteria else {}
                    values.update({f"criteria.{name}": criteria.get(name) for name in names})
                    writer.writerow(["" if (v := values[c]) is None else v for c in columns])
                    n += 1
        except OSError as exc:
            raise InputError(f"Cannot write {path} ({exc.strerror or exc}); check that its folder exists and is "
                             "writable.") from exc
        return n


    # -------------------------------------------------------------- retention

    def pending_paths(self) -> set[str]:
        """Every path a row with pending sinks names: its part's exact path, its sorted file, its overlay.

        Read through this thread's reader connection, beside the writer. Used
        by :class:`edge_inspect.retention.Janitor`: none of these may be
        deleted while the row still needs them.

        Raises:
            LedgerDamagedError: the file is damaged.
        """
        paths: set[str] = set()
        for kind, source, raw, sorted_path, heatmap in self._query(
                "SELECT kind, source, source_raw, sorted_path, heatmap FROM parts WHERE sinks_pending != ''",
                reader=True):
            if kind == "file":
                paths.add(os.fsdecode(raw) if raw is not None else source)
            paths.update(p for p in (sorted_path, heatmap) if p)
        return paths

    def pending_stamps(self) -> set[tuple[int, int]]:
        """``(size, mtime_ns)`` of every file row with pending sinks.

        The sort sink moves a part by renaming it, so the file keeps both; a
        file in a sort folder with one of these may be a pending part whose
        move the ledger has not recorded yet (the sinks' columns are written
        after every sink ran).

        Raises:
            LedgerDamagedError: the file is damaged.
        """
        return {(size, mtime_ns) for size, mtime_ns in self._query(
            "SELECT size, mtime_ns FROM parts WHERE sinks_pending != '' AND kind = 'file' "
            "AND size IS NOT NULL AND mtime_ns IS NOT NULL", reader=True)}

    def pending_ids(self) -> set[int]:
        """The ids of the rows with pending sinks.

        Raises:
            LedgerDamagedError: the file is damaged.
        """
        return {row_id for (row_id,) in self._query("SELECT id FROM parts WHERE sinks_pending != ''", reader=True)}

    def old_rows(self, before: float, limit: int, after_id: int = 0) -> list[Record]:
        """At most ``limit`` rows committed before ``before`` (Unix time) with no pending sink, by id after ``after_id``.

        Walks the table by id (its primary key), from ``after_id`` up to the
        id of the newest row committed before ``before`` (found through the
        ``committed_at`` index), so a call reads no further than the old rows
        and a caller can resume where the last call stopped.

        Raises:
            LedgerDamagedError: the file is damaged.
        """
        rows = self._query(f"{self._select} NOT INDEXED WHERE id > ? AND id <= coalesce((SELECT id FROM parts "
                           "WHERE committed_at < ? ORDER BY committed_at DESC LIMIT 1), 0) AND committed_at < ? "
                           "AND sinks_pending = '' ORDER BY id LIMIT ?", (after_id, before, before, limit), reader=True)
        return [_row(v) for v in rows]

    def drop(self, ids: Iterable[int]) -> int:
        """Delete these rows, in one transaction; a row whose sinks are pending is kept whatever the caller asks.

        The row with the highest id is kept too: SQLite gives a new row the
        highest id plus one, and the sinks rely on ids never coming back (the
        JSONL sink's replay, overlay and sorted names). A dropped part is new
        to the ledger again: if its file comes back to the watched folder, it
        is inspected again. (:func:`recover` cannot tell a dropped row from a
        lost one: it lists dropped ids as lost.)

        Returns:
            How many rows were deleted.

        Raises:
            LedgerGoneError: the ledger file was deleted, renamed or replaced.
            InputError: the ledger cannot be written.
        """
        wanted = [(row_id,) for row_id in sorted(set(ids))]
        deleted = 0

        def delete(conn):
            nonlocal deleted
            # Never a row a network sink has not yet had: at or below every delivery cursor.
            cursor = conn.executemany("DELETE FROM parts WHERE id = ? AND sinks_pending = '' "
                                      "AND id <= coalesce((SELECT min(last_id) FROM cursors), id) "
                                      "AND id < (SELECT max(id) FROM parts)", wanted)
            deleted = cursor.rowcount

        if wanted:
            self._transaction(delete)
        return deleted

def _select_for(conn: sqlite3.Connection, version: int) -> str:
    """The SELECT of every :data:`COLUMNS`; from an older table, NULL for the columns it lacks."""
    if version >= SCHEMA_VERSION:
        return _SELECT
    present = {row[1] for row in conn.execute("PRAGMA table_info(parts)")}
    return f"SELECT {', '.join(c if c in present else f'NULL AS {c}' for c in COLUMNS)} FROM parts"


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
