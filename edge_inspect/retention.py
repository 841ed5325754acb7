"""Retention and the low-disk guard: what keeps a source's outputs from filling the disk.

This module owns deleting what a source wrote once it is old or too much,
and saying when the disk is too full to write more:

- :class:`Janitor`, one per source, runs a pass every
  ``retention.interval`` seconds: it deletes sorted parts (regular files
  directly inside ``ok/``, ``ng/`` and ``error/``) and heatmap overlays
  (``*-<id>.png`` directly inside the heatmaps folder) past their age or
  size caps, oldest first, and drops ledger rows past ``ledger_max_age``.
  A row whose sinks are pending is never dropped, and no file such a row
  still needs is deleted. Symbolic links are never followed nor deleted,
  and nothing outside those folders is touched.
- :class:`DiskGuard` answers, cheaply enough to ask per batch, whether the
  free space where a source writes is below ``disk.min_free``; the caller
  then leaves sorting and heatmaps pending (the verdicts still commit) and
  replays them when space returns.

Deleting needs no bookkeeping to be crash-safe: a deleted file's ledger row
keeps its ``sorted_path`` or ``heatmap`` as history, each deletion and each
batch of dropped rows stands on its own, and a pass cut short leaves only
fewer deletions.

    >>> janitor = Janitor("line2", config.sources["line2"].retention, ledger,
    ...                   sorted_root=Path("/srv/line2"), heatmaps=None, hot_folder=Path("/srv/line2"))
    >>> if janitor.due(time.time()):
    ...     janitor.run_once()
    RetentionReport(sorted_deleted=120, sorted_bytes=98304000, heatmaps_deleted=0, heatmaps_bytes=0, ...)
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_inspect.ledger import Ledger, Record

if TYPE_CHECKING:
    from edge_inspect.config import Retention

log = logging.getLogger(__name__)

#: The sort folders inside the watched folder (:data:`edge_inspect.sinks.sort.FOLDERS`).
SORT_FOLDERS = ("ok", "ng", "error")
#: Ledger rows read (and at most dropped) per pass: bounded work, and one short write transaction.
ROWS_PER_PASS = 10_000
#: An overlay the heatmaps sink writes: ``<stem>-<row id>.png`` or ``frame-<index>-<row id>.png``.
_OVERLAY = re.compile(r"^[^.].*-(\d+)\.png$")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class RetentionReport:
    """What one :meth:`Janitor.run_once` pass did.

    Attributes:
        sorted_deleted, sorted_bytes: sorted parts deleted, and their bytes.
        heatmaps_deleted, heatmaps_bytes: overlays deleted, and their bytes.
        rows_dropped: ledger rows dropped.
        kept_pending: files a cap would have deleted, kept because a row
            with pending sinks still needs them.
        seconds: how long the pass took.
        failed: files that could not be deleted (the reason is logged).
    """

    sorted_deleted: int
    sorted_bytes: int
    heatmaps_deleted: int
    heatmaps_bytes: int
    rows_dropped: int
    kept_pending: int
    seconds: float
    failed: int = 0


@dataclass(frozen=True)
class _Entry:
    """A regular file found in a folder the janitor looks after, as ``lstat`` saw it."""

    dir_fd: int
    folder: str
    name: str
    size: int
    mtime_ns: int
    dev: int
    ino: int

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.name)


@dataclass
class _Tally:
    deleted: int = 0
    bytes: int = 0
    kept: int = 0
    failed: int = 0
    first_error: str | None = None


class Janitor:
    """Keep one source's sorted parts, overlays and ledger rows within its retention caps.

    Args:
        name: the source's name, for the log.
        retention: the source's caps (:class:`edge_inspect.config.Retention`).
        ledger: the source's ledger, open for writing.
        sorted_root: the watched folder when the source sorts (its ``ok/``,
            ``ng/`` and ``error/`` hold the sorted parts), else None.
        heatmaps: the heatmaps folder, if the source writes overlays.
        hot_folder: the watched folder, for a folder source. A row whose
            part is still at its path there is never dropped: the next start
            would inspect the part again. When the folder is missing (a
            share unmounted), no file row is dropped in that pass.
    """

    def __init__(self, name: str, retention: Retention, ledger: Ledger, *, sorted_root: Path | None,
                 heatmaps: Path | None, hot_folder: Path | None):
        self.name = name
        self.retention = retention
        self.ledger = ledger
        self.sorted_root = None if sorted_root is None else Path(os.path.abspath(sorted_root))
        self.heatmaps = None if heatmaps is None else Path(os.path.abspath(heatmaps))
        self.hot_folder = None if hot_folder is None else Path(os.path.abspath(hot_folder))
        self._last: float | None = None
        # Where the next pass resumes reading old rows; back to the start after a pass that reached the end.
        self._after_id = 0
        self._warned: set[str] = set()

    def due(self, now: float) -> bool:
        """Whether ``retention.interval`` seconds have passed since the last pass (or none ran yet).

        A clock set back since the last pass makes a pass due too, rather
        than none for as long as it was set back.
        """
        return self._last is None or now - self._last >= self.retention.interval or now < self._last

    def run_once(self, now: float | None = None) -> RetentionReport:
        """One pass: delete files past the caps, drop old rows; log one INFO line if anything went.

        Args:
            now: the Unix time ages are measured from (default: now).

        Returns:
            What the pass did.

        Raises:
            LedgerGoneError, LedgerDamagedError, InputError: the ledger
                cannot be read or written; no file was deleted after the
                ledger failed to say which ones pending rows need.
        """
        started = time.monotonic()
        now = time.time() if now is None else now
        self._last = now
        r = self.retention
        sorted_tally, overlay_tally = _Tally(), _Tally()
        with ExitStack() as stack:
            parts: list[_Entry] = []
            overlays: list[_Entry] = []
            if self.sorted_root is not None and (r.sorted_max_age is not None or r.sorted_max_bytes is not None):
                parts = self._scan_sorted(stack)
            if self.heatmaps is not None and (r.heatmaps_max_age is not None or r.heatmaps_max_bytes is not None):
                overlays = self._scan_overlays(stack)
            if parts or overlays:
                # Asked after the scan: a row committed later cannot own a file the scan saw, since a part is
                # sorted, and its overlay written, only once its row is committed.
                needed_inodes = self._pending_inodes()
                stamps = self.ledger.pending_stamps() if parts else set()
                ids = self.ledger.pending_ids() if overlays else set()
                sorted_tally = self._apply(
                    parts, r.sorted_max_age, r.sorted_max_bytes, now,
                    lambda e: (e.dev, e.ino) in needed_inodes or (e.size, e.mtime_ns) in stamps)
                overlay_tally = self._apply(
                    overlays, r.heatmaps_max_age, r.heatmaps_max_bytes, now,
                    lambda e: (e.dev, e.ino) in needed_inodes or int(_OVERLAY.match(e.name).group(1)) in ids)
        rows = self._drop_rows(now) if r.ledger_max_age is not None else 0
        report = RetentionReport(
            sorted_deleted=sorted_tally.deleted, sorted_bytes=sorted_tally.bytes,
            heatmaps_deleted=overlay_tally.deleted, heatmaps_bytes=overlay_tally.bytes, rows_dropped=rows,
            kept_pending=sorted_tally.kept + overlay_tally.kept, seconds=time.monotonic() - started,
            failed=sorted_tally.failed + overlay_tally.failed)
        if report.sorted_deleted or report.heatmaps_deleted or report.rows_dropped:
            log.info("Retention %s: deleted %d sorted part(s) (%s) and %d overlay(s) (%s), dropped %d ledger row(s); "
                     "kept %d file(s) that pending rows still need (%.2f s).", self.name, report.sorted_deleted,
                     _size(report.sorted_bytes), report.heatmaps_deleted, _size(report.heatmaps_bytes),
                     report.rows_dropped, report.kept_pending, report.seconds)
        if report.failed:
            log.warning("Retention %s: %d file(s) could not be deleted (first: %s). Give the user running "
                        "edge-inspect write access to their folders; the next pass tries again.", self.name,
                        report.failed, sorted_tally.first_error or overlay_tally.first_error)
        return report

    # ------------------------------------------------------------------ files

    def _scan_sorted(self, stack: ExitStack) -> list[_Entry]:
        root = self._open(stack, str(self.sorted_root), None)
        if root is None:
            return []
        entries: list[_Entry] = []
        for verdict in SORT_FOLDERS:
            folder = self._open(stack, str(self.sorted_root / verdict), (root, verdict))
            if folder is not None:
                entries += _regular_files(folder, str(self.sorted_root / verdict), lambda name: True)
        return entries

    def _scan_overlays(self, stack: ExitStack) -> list[_Entry]:
        # The heatmaps folder as configured may be a link to another disk; only what lies inside it is read.
        folder = self._open(stack, str(self.heatmaps), None)
        if folder is None:
            return []
        return _regular_files(folder, str(self.heatmaps), lambda name: _OVERLAY.match(name) is not None)

    def _open(self, stack: ExitStack, path: str, inside: tuple[int, str] | None) -> int | None:
        """A descriptor of the folder (closed with ``stack``), or None when it is missing or refused.

        ``inside`` is ``(parent descriptor, name)`` for a sort folder: opened
        from its parent without following a link, so that an ``ok/`` that is
        a link elsewhere is never entered.
        """
        try:
            if inside is None:
                fd = os.open(path, _DIR_FLAGS)
            else:
                fd = os.open(inside[1], _DIR_FLAGS | _NOFOLLOW, dir_fd=inside[0])
        except FileNotFoundError:
            return None
        except OSError as exc:
            if isinstance(exc, NotADirectoryError) or (inside is not None and os.path.islink(path)):
                what = "is a symbolic link or not a folder"
            else:
                what = f"cannot be read ({exc.strerror or exc})"
            self._warn_once(path, "Retention %s: %s %s; the files in it are left alone.", self.name, path, what)
            return None
        self._warned.discard(path)
        stack.callback(os.close, fd)
        return fd

    def _pending_inodes(self) -> set[tuple[int, int]]:
        """The files rows with pending sinks name, as ``(device, inode)``: any spelling of their path matches."""
        inodes = set()
        for path in self.ledger.pending_paths():
            try:
                st = os.stat(path, follow_symlinks=False)
            except (OSError, ValueError):  # gone, or unreadable now: nothing there this pass can delete
                continue
            inodes.add((st.st_dev, st.st_ino))
        return inodes

    def _apply(self, entries: list[_Entry], max_age: float | None, max_bytes: int | None, now: float,
               needed: Callable[[_Entry], bool]) -> _Tally:
        """Delete the entries past ``max_age``, then the oldest until their total is at most ``max_bytes``."""
        tally = _Tally()
        kept: set[tuple[int, int]] = set()
        left = []
        oldest_kept = None if max_age is None else int((now - max_age) * 1e9)
        for entry in entries:
            if oldest_kept is not None and entry.mtime_ns < oldest_kept:
                if needed(entry):
                    kept.add((entry.dev, entry.ino))
                elif self._delete(entry, tally):
                    continue
            left.append(entry)
        if max_bytes is not None:
            total = sum(e.size for e in left)
            for entry in sorted(left, key=lambda e: (e.mtime_ns, e.name)):
                if total <= max_bytes:
                    break
                if needed(entry):
                    kept.add((entry.dev, entry.ino))
                elif self._delete(entry, tally):
                    total -= entry.size
        tally.kept = len(kept)
        return tally

    def _delete(self, entry: _Entry, tally: _Tally) -> bool:
        """Remove one file, if its name still holds the file scanned; whether it was removed."""
        try:
            st = os.stat(entry.name, dir_fd=entry.dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (entry.dev, entry.ino):
                return False  # replaced since the scan: not the file the caps were measured on
            os.unlink(entry.name, dir_fd=entry.dir_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            tally.failed += 1
            tally.first_error = tally.first_error or f"{entry.path}: {exc.strerror or exc}"
            return False
        tally.deleted += 1
        tally.bytes += entry.size
        return True

    # ------------------------------------------------------------------- rows

    def _drop_rows(self, now: float) -> int:
        """Drop one batch of old rows whose sinks are done and whose part left the watched folder."""
        rows = self.ledger.old_rows(now - self.retention.ledger_max_age, ROWS_PER_PASS, self._after_id)
        folder_there = self.hot_folder is None or self.hot_folder.is_dir()
        if not folder_there and any(r.kind == "file" for r in rows):
            self._warn_once("hot folder", "Retention %s: the watched folder %s is missing; ledger rows of files are "
                            "kept until it is back.", self.name, self.hot_folder)
        elif folder_there:
            self._warned.discard("hot folder")
        ids = [r.id for r in rows if r.kind != "file" or (folder_there and not _still_there(r))]
        dropped = self.ledger.drop(ids) if ids else 0
        # A full batch: the next pass goes on after it, so rows kept here cannot hold back the ones behind them.
        self._after_id = rows[-1].id if len(rows) == ROWS_PER_PASS else 0
        return dropped

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)


def _regular_files(dir_fd: int, folder: str, wanted: Callable[[str], bool]) -> list[_Entry]:
    """The regular files directly in the folder open as ``dir_fd`` whose names are ``wanted``; links never followed."""
    entries = []
    try:
        with os.scandir(dir_fd) as listing:
            for item in listing:
                if not wanted(item.name):
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone since listed
                if stat.S_ISREG(st.st_mode):
                    entries.append(_Entry(dir_fd, folder, item.name, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino))
    except OSError as exc:
        log.warning("Retention: cannot list %s (%s); its files are left alone this pass.", folder, exc.strerror or exc)
        return []
    return entries


def _still_there(record: Record) -> bool:
    """Whether the row's part is still at its original path (same size and mtime); True when that cannot be told."""
    try:
        st = os.stat(record.path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return True
    if record.size is None or record.mtime_ns is None:
        return True
    return (st.st_size, st.st_mtime_ns) == (record.size, record.mtime_ns)


# ------------------------------------------------------------------ disk


class DiskGuard:
    """Whether the free space where a source writes is below ``disk.min_free``.

    Each answer is kept ``cache`` seconds per path, so asking per batch costs
    a dictionary look-up most of the time. Any thread may call it.

    Args:
        min_free: bytes that must stay free; 0 turns the guard off.
        cache: seconds an answer is reused.

        >>> guard = DiskGuard(1 << 30)
        >>> guard.low("/srv/line2")
        'low disk: 412 MB free at /srv/line2, below disk.min_free 1.1 GB; sorting and heatmaps paused'
    """

    def __init__(self, min_free: int, *, cache: float = 1.0):
        self.min_free = int(min_free)
        self.cache = cache
        self._answers: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def free(self, path: str | os.PathLike) -> int:
        """Bytes an unprivileged user can still write where ``path`` is (or would be).

        Measured with ``statvfs`` (``f_bavail * f_frsize``) at ``path``, or at
        its nearest existing parent when it does not exist yet.

        Raises:
            OSError: the file system cannot be asked (an I/O error, a share gone).
        """
        where = os.path.abspath(os.fsdecode(path))
        while True:
            try:
                st = os.statvfs(where)
            except (FileNotFoundError, NotADirectoryError):
                parent = os.path.dirname(where)
                if parent == where:
                    raise
                where = parent
                continue
            return st.f_bavail * st.f_frsize

    def low(self, path: str | os.PathLike) -> str | None:
        """None when at least ``min_free`` bytes are free at ``path``; else why sorting and heatmaps pause.

        When the free space cannot be read, says None (and logs it once):
        the sinks then try, and a failed write leaves their rows pending.
        """
        if self.min_free <= 0:
            return None
        where = os.path.abspath(os.fsdecode(path))
        clock = time.monotonic()
        with self._lock:
            cached = self._answers.get(where)
        if cached is not None and clock < cached[0]:
            return cached[1]
        try:
            free = self.free(where)
        except OSError as exc:
            if where not in self._warned:
                self._warned.add(where)
                log.warning("Cannot read the free space at %s (%s); the low-disk guard cannot tell there.", where,
                            exc.strerror or exc)
            answer = None
        else:
            self._warned.discard(where)
            answer = None if free >= self.min_free else (
                f"low disk: {_size(free)} free at {where}, below disk.min_free {_size(self.min_free)}; "
                "sorting and heatmaps paused")
        with self._lock:
            self._answers[where] = (clock + self.cache, answer)
        return answer


def _size(n: int) -> str:
    """Bytes for people, in decimal units: ``412 MB``, ``1.1 GB``, ``512 B``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"
    return f"{n} B"
