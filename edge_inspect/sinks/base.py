"""What every sink shares: the :class:`Done` record it receives, the :class:`Sink` protocol, file helpers.

    >>> from edge_inspect.sinks.base import Done, fsync_dir
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_inspect.ledger import Record

log = logging.getLogger(__name__)


@dataclass
class Done:
    """A part whose verdict is committed, handed to the sinks.

    Attributes:
        record: the ledger row, with its id (and the columns earlier sinks
            set, such as ``sorted_path``).
        image: the decoded image, when the pipeline kept it (heatmaps).
        anomaly_map: the ``(h, w)`` anomaly map at the model's size, when
            the model computed one.
    """

    record: Record
    image: np.ndarray | None = None
    anomaly_map: np.ndarray | None = None


class Sink(Protocol):
    """What every sink provides.

    ``write`` and ``replay`` return, for each row they completed, the ledger
    columns to set (possibly none: ``{}``); a row they leave out stays
    pending for this sink and is replayed at the next start.
    """

    name: str

    def wants(self, record: Record) -> bool:
        """Whether this sink has anything to do for the row."""

    def write(self, done: Sequence[Done]) -> dict[int, dict]:
        """Run for freshly committed parts."""

    def replay(self, records: Sequence[Record], inspector) -> dict[int, dict]:
        """Run again for rows left pending by an interrupted run; must be idempotent."""

    def close(self) -> None:
        """Release files."""


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames and new names in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # some file systems (network mounts) refuse fsync on a folder; the rename itself still happened
        log.debug("fsync of folder %s refused: %s", folder, exc)
    finally:
        os.close(fd)


def safe_name(name: str) -> str:
    """A file name as valid UTF-8: each byte that is not (a surrogate escape) becomes ``%XX``.

    Names that are valid UTF-8 come back unchanged. Control characters stay:
    the file system allows them, and JSON escapes them.

        >>> safe_name(os.fsdecode(b"bad\\xff\\xfe.jpeg"))
        'bad%FF%FE.jpeg'
    """
    if not any("\udc80" <= c <= "\udcff" for c in name):
        return name
    return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in name)


#: The longest file name most Linux file systems take, in bytes.
NAME_MAX = 255


def fit_name(stem: str, tail: str) -> str:
    """``stem + tail``, the stem cut at a character boundary so that the name's UTF-8 bytes fit :data:`NAME_MAX`.

    A part named with 255 bytes already has no room for the ``-ID`` that
    keeps a sorted name unique, and :func:`safe_name` makes a name that is
    not UTF-8 up to three times longer.
    """
    room = NAME_MAX - len(tail.encode("utf-8", "surrogateescape"))
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return stem + tail
    return raw[:max(room, 1)].decode("utf-8", "ignore") + tail


def split_name(name: str) -> tuple[str, str]:
    """``(stem, suffix)`` of a file name, the suffix only when it is short (``.png``, not 200 bytes after a dot)."""
    path = Path(name)
    return (path.stem, path.suffix) if len(path.suffix) <= 16 else (name, "")


def same_content(path: Path, record: Record) -> bool:
    """Whether ``path`` holds the bytes the row was decided on: size, mtime and sha256 all match."""
    import hashlib

    try:
        st = path.stat()
    except OSError:
        return False
    if (st.st_size, st.st_mtime_ns) != (record.size, record.mtime_ns):
        return False
    if record.sha256 is None:
        return True
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == record.sha256
    except OSError:
        return False
