"""Checking a ledger and saving what can be read of a damaged one: ``edge-inspect ledger check|recover``.

A ledger whose pages were overwritten (a disk error, a power cut during a
write on hardware that lies about its syncs) is refused at open with the
recovery command. :func:`recover` reads every row it still can into a new
ledger at the same path, keeps the damaged file beside it, and reports what
it saved and what it lost; the delivery cursors of the network sinks come
along when they can be read.

    >>> check("parts/.edge-inspect/ledger.sqlite")
    []
    >>> recover("parts/.edge-inspect/ledger.sqlite").salvaged
    981
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_inspect.errors import InputError
from edge_inspect.ledger import (
    COLUMNS,
    Ledger,
    _connect,
    _has_sqlite_header,
    _is_damage,
    _not_a_ledger,
    _open_error,
    _sqlite_check,
)
from edge_inspect.sinks.base import fsync_dir

log = logging.getLogger(__name__)


def check(path: str | os.PathLike) -> list[str]:
    """SQLite's full ``integrity_check`` of a ledger, read-only.

    Returns:
        The problems found (at most 100, SQLite's words), empty when the
        ledger is healthy.

    Raises:
        InputError: the file is missing, is not an SQLite file, or is a
            healthy SQLite file that is not an edge-inspect ledger.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No ledger at {path}. Expected the file edge-inspect watch writes; "
                         "check the path (a ledger file, or the watched folder).")
    try:
        conn, _ = _connect(path, readonly=True)
    except sqlite3.Error as exc:
        raise _open_error(path, exc, readonly=True) from exc
    try:
        try:
            problems = _sqlite_check(conn, full=True, limit=100, readonly=True)
            if problems:
                if not _has_sqlite_header(path):
                    raise _not_a_ledger(path, problems[0])
                return problems
            Ledger._check_schema(conn, path, create=False)
        except sqlite3.Error as exc:
            if _is_damage(exc) and _has_sqlite_header(path):
                return [str(exc)]
            raise _open_error(path, exc, readonly=True) from exc
    finally:
        conn.close()
    return []


@dataclass(frozen=True)
class RecoverReport:
    """What :func:`recover` did.

    Attributes:
        path: the ledger path, which now holds the new, healthy ledger.
        damaged: where the damaged file is kept (its ``-wal`` and ``-shm``,
            if any, beside it with the same suffixes).
        salvaged: rows copied into the new ledger, with their ids, verdicts
            and pending sinks.
        lost: ids of the rows that could not be read, in order.
        lost_sources: for lost rows an index still names, their source
            (path or camera URI): the parts a restart inspects again if they
            are still in the folder.
        unknown_from: when neither the table nor an index can say how many
            rows there were (a file cut short), the first id past the last
            one known that could not be read: rows from there on, if there
            were any, are lost too. None otherwise.
        problems: what SQLite's check found in the damaged file.
    """

    path: Path
    damaged: Path
    salvaged: int
    lost: tuple[int, ...]
    lost_sources: dict[int, str] = field(default_factory=dict)
    unknown_from: int | None = None
    problems: tuple[str, ...] = ()


#: Rows read per query when salvaging; a range that fails is halved down to single ids.
_SALVAGE_CHUNK = 256
_SIDECARS = ("-wal", "-shm", "-journal")


def recover(path: str | os.PathLike) -> RecoverReport:
    """Salvage every readable row of a damaged ledger into a new one at the same path.

    Reads rows by ranges of ids through the primary key; a range that fails
    is halved until the unreadable rows are isolated and skipped. The
    ``identity`` and ``parts_file`` indexes, read on their own, tell which
    ids existed and what the lost rows were. The new ledger is built beside
    the old one, checked and synced; then the damaged file (with its
    ``-wal`` and ``-shm``) is renamed to ``PATH.damaged-YYYYmmdd-HHMMSS``
    and the new file renamed to ``PATH``. Stop the watcher first.

        >>> report = recover("parts/.edge-inspect/ledger.sqlite")
        >>> report.salvaged, report.lost[:3], report.damaged.name
        (9950, (4097, 4098, 4099), 'ledger.sqlite.damaged-20240501-081500')

    Raises:
        InputError: the file is missing, not a ledger, healthy (nothing to
            recover), or so damaged that not even its list of tables can
            be read (nothing is changed then); or the new file cannot be
            written beside it.
    """
    path = Path(path)
    problems = check(path)
    if not problems:
        raise InputError(f"Ledger {path} is healthy (SQLite's integrity check finds nothing wrong): nothing to "
                         "recover, and nothing was changed.")
    conn, _ = _connect(path, readonly=True)
    # Text in a damaged page may not be UTF-8; keep what can be kept rather than lose the row.
    conn.text_factory = lambda data: data.decode("utf-8", "backslashreplace")
    # Lets SQLite read a file cut short (its header then claims more pages than there are); the connection is
    # read-only, so nothing is written.
    conn.execute("PRAGMA writable_schema = ON")
    try:
        try:
            present = {row[1] for row in conn.execute("PRAGMA table_info(parts)")}
            cause = "it has no table of parts"
        except sqlite3.Error as exc:
            present, cause = set(), f"SQLite says: {exc}"
        if "id" not in present:
            raise InputError(f"Ledger {path} is too damaged to recover: its table of parts cannot be read "
                             f"({cause}). Nothing was changed. Restore it from a backup, or move it aside and restart "
                             "the watcher to start a new ledger (every part still in the folder is then inspected "
                             "again).")
        sources, named, witnessed = _indexed_ids(conn)
        columns = ["id", *(c for c in COLUMNS if c != "id" and c in present)]
        rows, failed, top = _salvage(conn, columns, max(named, default=0))
        outbox = _salvage_outbox(conn)
    finally:
        conn.close()
    temp = path.with_name(f".{path.name}.recover-{os.getpid()}")
    written, invalid = _write_new_ledger(temp, columns, rows, outbox)
    kept = {r[0] for r in rows} - invalid
    # Ids run from 1 with no gap (rows are never deleted): every id up to the top one existed. Two whole indexes
    # that agree say where the top is; otherwise the highest id anything names, and max(id) where it is
    # plausible (a garbled cell can claim any id).
    known_top = max(max(named, default=0), max(kept, default=0))
    if not witnessed and top is not None and top <= 2 * known_top + 4 * _SALVAGE_CHUNK:
        known_top = max(known_top, top)
    lost = set(range(1, known_top + 1)) - kept
    unknown_from = known_top + 1 if not witnessed and any(i > known_top for i in failed) else None
    if not written and (lost or unknown_from):
        _remove(temp)
        raise InputError(f"Ledger {path} is too damaged to recover: not one row can be read. Nothing was changed. "
                         "Restore it from a backup, or move it aside and restart the watcher to start a new ledger "
                         "(every part still in the folder is then inspected again).")
    damaged = _swap_in(path, temp)
    report = RecoverReport(path=path, damaged=damaged, salvaged=written, lost=tuple(sorted(lost)),
                           lost_sources={i: sources[i] for i in sorted(lost) if i in sources},
                           unknown_from=unknown_from, problems=tuple(problems))
    log.warning("Ledger %s recovered: %d row(s) salvaged, %d lost%s; the damaged file is kept as %s.",
                path, report.salvaged, len(report.lost),
                f", and those from id {unknown_from} on, if any" if unknown_from else "", damaged)
    return report


def _salvage(conn: sqlite3.Connection, columns: list[str], named_top: int) -> tuple[list[tuple], set[int], int | None]:
    """Every readable row (``columns``, id first), the ids whose reads failed, and ``max(id)`` if it reads.

    Reads forward from id 1 in chunks; where a read fails, the next chunk of
    ids is read in ranges halved down to single ids, which isolates the
    unreadable rows, and reading goes on after it. It stops where the table
    ends, or, past ``named_top`` (the highest id an index names) and the
    rows read, after 64 chunks that gave nothing but failures. Rows whose id
    is not in the range asked for (a garbled cell) are dropped.
    """
    names = ", ".join(columns)
    forward = f"SELECT {names} FROM parts WHERE id >= ? ORDER BY id LIMIT {_SALVAGE_CHUNK}"
    span = f"SELECT {names} FROM parts WHERE id BETWEEN ? AND ? ORDER BY id"
    rows: list[tuple] = []
    failed: set[int] = set()

    def read(lo: int, hi: int) -> int:
        """Read ids lo..hi, halving ranges that fail down to single ids; returns the rows found."""
        try:
            found = conn.execute(span, (lo, hi)).fetchall()
        except sqlite3.DatabaseError:
            if lo == hi:
                failed.add(lo)
                return 0
            mid = (lo + hi) // 2
            return read(lo, mid) + read(mid + 1, hi)
        found = [row for row in found if isinstance(row[0], int) and lo <= row[0] <= hi]
        rows.extend(found)
        return len(found)

    try:
        top = conn.execute("SELECT max(id) FROM parts").fetchone()[0]
    except sqlite3.DatabaseError:
        top = None
    start, barren = 1, 0
    while barren < 64:
        before, got = start, 0
        try:
            for row in conn.execute(forward, (start,)):
                got += 1
                if isinstance(row[0], int) and row[0] >= start:  # else a garbled cell
                    rows.append(row)
                    start = row[0] + 1
        except sqlite3.DatabaseError:
            pass  # rows up to the damage are kept; isolate the unreadable ids from `start` on
        else:
            if got < _SALVAGE_CHUNK:
                break  # the table ends here
            if start > before:
                barren = 0
                continue
        found = read(start, start + _SALVAGE_CHUNK - 1)
        start += _SALVAGE_CHUNK
        barren = 0 if found or start <= named_top else barren + 1
    return rows, failed, top


def _indexed_ids(conn: sqlite3.Connection) -> tuple[dict[int, str], set[int], bool]:
    """What the identity and file indexes, read without the table, say.

    Returns:
        The source the file index gives for each id; the ids either index
        names; whether both read whole and name the same ids (then they
        are two witnesses of which rows there were).
    """
    sources: dict[int, str] = {}
    named: list[set[int]] = []
    whole = True
    queries = (("SELECT id, NULL FROM parts INDEXED BY sqlite_autoindex_parts_1 ORDER BY identity", False),
               ("SELECT id, source FROM parts INDEXED BY parts_file ORDER BY source, size, mtime_ns", True))
    for sql, with_source in queries:
        ids: set[int] = set()
        try:
            for row_id, source in conn.execute(sql):
                if isinstance(row_id, int) and row_id > 0:
                    ids.add(row_id)
                    if with_source:
                        sources[row_id] = source
        except sqlite3.DatabaseError:  # an index damaged too, or missing: keep what it gave
            whole = False
        named.append(ids)
    return sources, named[0] | named[1], whole and named[0] == named[1]


def _salvage_outbox(conn: sqlite3.Connection) -> tuple[list[tuple], str | None] | None:
    """The delivery cursors and the ledger id, or None when they cannot be read."""
    try:
        cursors = conn.execute("SELECT sink, last_id, updated_at FROM cursors").fetchall()
        found = conn.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
        return cursors, (found[0] if found else None)
    except sqlite3.Error:
        return None


def _write_new_ledger(temp: Path, columns: list[str], rows: list[tuple],
                      outbox: tuple[list[tuple], str | None] | None = ([], None)) -> tuple[int, set[int]]:
    """Build a healthy ledger at ``temp`` holding ``rows``; returns (rows written, ids refused as invalid).

    ``outbox``: the damaged ledger's delivery cursors and id, kept; None when
    they could not be read: then every sink starts again from the first row
    (a receiver sees some verdicts twice, and drops them by their ids,
    rather than miss the ones not yet delivered).
    """
    _remove(temp)
    invalid: set[int] = set()
    try:
        conn = sqlite3.connect(temp, isolation_level=None)
        try:
            Ledger._create_schema(conn)
            insert = f"INSERT INTO parts ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            conn.execute("BEGIN IMMEDIATE")
            for row in rows:
                try:
                    conn.execute(insert, row)
                except sqlite3.IntegrityError:  # garbage that read as a row: a CHECK, NOT NULL or UNIQUE refuses it
                    invalid.add(row[0])
            if outbox is None:
                conn.execute("INSERT INTO meta VALUES ('cursor_start', 'first')")
            else:
                cursors, ledger_id = outbox
                conn.executemany("INSERT OR REPLACE INTO cursors VALUES (?, ?, ?)", cursors)
                if ledger_id:
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'ledger_id'", (ledger_id,))
            conn.execute("COMMIT")
            problems = _sqlite_check(conn, full=True)
            if problems:
                raise InputError(f"The new ledger built beside {temp.parent} fails SQLite's check ({problems[0]}); it "
                                 "was removed and the damaged ledger left in place. Check the disk (dmesg, smartctl) "
                                 "before trying again.")
            conn.execute("PRAGMA journal_mode=WAL")
            written = conn.execute("SELECT count(*) FROM parts").fetchone()[0]
        finally:
            conn.close()
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        _remove(temp)
        if isinstance(exc, (OSError, sqlite3.Error)):
            raise InputError(f"Cannot build the recovered ledger at {temp} ({exc}); the damaged ledger was left "
                             f"in place. Free disk space, or make {temp.parent} writable.") from exc
        raise
    return written, invalid


def _remove(path: Path) -> None:
    """Remove a file and its SQLite sidecars, those that exist."""
    for suffix in ("", *_SIDECARS):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _swap_in(path: Path, temp: Path) -> Path:
    """Keep the damaged ledger as ``PATH.damaged-<time>`` (sidecars too), put ``temp`` at ``path``; returns the first."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    damaged, k = path.with_name(f"{path.name}.damaged-{stamp}"), 2
    while any(Path(f"{damaged}{s}").exists() for s in ("", *_SIDECARS)):
        damaged, k = path.with_name(f"{path.name}.damaged-{stamp}-{k}"), k + 1
    try:
        try:
            os.link(path, damaged)  # the damaged bytes under the new name, while PATH still names them
            linked = True
        except OSError:
            os.rename(path, damaged)
            linked = False
        # The log must leave before the new file arrives: SQLite would replay it into the new file.
        for suffix in _SIDECARS:
            if os.path.exists(f"{path}{suffix}"):
                os.rename(f"{path}{suffix}", f"{damaged}{suffix}")
        os.replace(temp, path)
    except OSError as exc:
        raise InputError(f"Cannot put the recovered ledger in place of {path} ({exc.strerror or exc}). The new "
                         f"ledger is {temp}; the damaged one is {damaged if not os.path.exists(path) else path}. "
                         f"Make {path.parent} writable and run edge-inspect ledger recover again.") from exc
    fsync_dir(path.parent)
    log.debug("Ledger %s: damaged file kept as %s (hard link: %s).", path, damaged, linked)
    return damaged
