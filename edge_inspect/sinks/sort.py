"""The sort sink: move each inspected file into ``ok/``, ``ng/`` or ``error/``.

The folders live inside the watched folder (the hot folder excludes them),
so a move is a rename on the same file system: atomic, never a copy. A name
already taken in the target folder is never overwritten: the file gets the
ledger row id in its name (``part_7.png`` -> ``part_7-1234.png``). A file
from a sub-folder of the watched folder (a recursive watch) keeps its
sub-folder in its sorted name, joined with ``~`` (``lineA/part_7.png`` ->
``ng/lineA~part_7.png``): the sort folders stay flat, so the retention caps
see every sorted file, and parts of the same name from two sub-folders stay
apart. A name that is not valid UTF-8 (bytes from a Windows share or an old
camera) is given a UTF-8 one in its sort folder
(:func:`~edge_inspect.sinks.base.safe_name`), so that the ledger, the JSON
lines and every program downstream can name it. The move
links the new name first and then removes the old one (both names point to
the same file in between), falling back to ``os.replace`` on file systems
without hard links; the folders are synced before the ledger marks the
move done.

Replay after a crash finds each pending file where it is: still in the
watched folder (moved now), already in its sort folder under one of the
names this sink would give it (recorded, not moved twice), or gone.

    >>> sink = SortSink("parts/")
    >>> sink.write([Done(record)])    # {record.id: {"sorted_path": "parts/ok/part_7.png"}}
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from edge_inspect.errors import InputError
from edge_inspect.ledger import Record
from edge_inspect.sinks.base import Done, fit_name, fsync_dir, safe_name, same_content, split_name

log = logging.getLogger(__name__)

#: The sort folders, one per verdict.
FOLDERS = ("ok", "ng", "error")
#: Joins a part's sub-folders and name into its sorted name: ``lineA/part.png`` -> ``lineA~part.png``.
SUBFOLDER_JOIN = "~"
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS}


class SortSink:
    """Move each file into ``folder/<verdict>/``.

    Args:
        folder: the watched folder; ``ok/``, ``ng/`` and ``error/`` are
            created in it.

    Raises:
        InputError: the sort folders cannot be created.
    """

    name = "sort"

    def __init__(self, folder: str | os.PathLike):
        # Absolute: the ledger records where each file went, for any later working directory.
        self.folder = Path(os.path.abspath(folder))
        #: Row id -> why the last call left it pending.
        self.failures: dict[int, str] = {}
        try:
            for verdict in FOLDERS:
                (self.folder / verdict).mkdir(exist_ok=True)
        except OSError as exc:
            raise InputError(f"Cannot create the sort folders in {self.folder} ({exc.strerror or exc}); "
                             "check that the folder is writable, or turn sorting off (sinks.sort).") from exc

    @property
    def folders(self) -> list[Path]:
        """The sort folders, which the hot folder must not watch."""
        return [self.folder / verdict for verdict in FOLDERS]

    def wants(self, record: Record) -> bool:
        return record.kind == "file"

    def write(self, done: Sequence[Done]) -> dict[int, dict]:
        return self._sort([d.record for d in done])

    def replay(self, records: Sequence[Record], inspector=None) -> dict[int, dict]:
        updates = self._sort(records)
        log.info("Sort: %d pending move(s) finished.", len(updates))
        return updates

    def close(self) -> None:
        pass

    # ----------------------------------------------------------------- moves

    def _sort(self, records: Sequence[Record]) -> dict[int, dict]:
        updates: dict[int, dict] = {}
        touched: set[Path] = set()
        for record in records:
            try:
                target = self._move(record)
            except OSError as exc:
                self.failures[record.id] = f"cannot move {record.source} into {record.verdict}/ ({exc.strerror or exc})"
                continue
            updates[record.id] = {"sorted_path": None if target is None else str(target)}
            if target is not None:
                touched.update((target.parent, record.path.parent))
        for folder in touched:
            fsync_dir(folder)
        return updates

    def _candidates(self, record: Record) -> Iterator[Path]:
        """The names this sink gives the file, in the order it tries them."""
        stem, suffix = split_name(safe_name(record.path.name))
        try:
            subfolders = record.path.parent.relative_to(self.folder).parts
        except ValueError:  # not under the watched folder: its name alone
            subfolders = ()
        stem = "".join(f"{safe_name(part)}{SUBFOLDER_JOIN}" for part in subfolders) + stem
        folder = self.folder / record.verdict
        yield folder / fit_name(stem, suffix)
        yield folder / fit_name(stem, f"-{record.id}{suffix}")
        for k in itertools.count(2):
            yield folder / fit_name(stem, f"-{record.id}-{k}{suffix}")

    def _move(self, record: Record) -> Path | None:
        """Move one file; its new path, or None when there is nothing left to move."""
        source = record.path
        try:
            st = source.stat()
        except FileNotFoundError:
            st = None
        if st is None or (st.st_size, st.st_mtime_ns) != (record.size, record.mtime_ns):
            # Gone, or replaced by new content: it may be sorted already (a crash after the move).
            for candidate in self._candidates(record):
                if not candidate.exists():
                    break
                if same_content(candidate, record):
                    return candidate
            # An error verdict is often for a file that vanished: nothing to say twice.
            log.log(logging.INFO if record.verdict == "error" else logging.WARNING,
                    "%s (row %d) is no longer in %s; nothing to sort.", source.name, record.id, source.parent)
            return None
        for candidate in self._candidates(record):
            try:
                existing = candidate.stat()
            except FileNotFoundError:
                existing = None
            if existing is not None:
                if (existing.st_dev, existing.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(source)  # linked before a crash, the old name not yet removed
                    return candidate
                continue
            try:
                os.link(source, candidate)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                os.replace(source, candidate)  # no hard links here: the name was free a moment ago
                return candidate
            os.unlink(source)
            return candidate
        return None  # not reached: the candidate names never run out
