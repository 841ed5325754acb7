"""The hot folder: files dropped in a folder, yielded once each is complete.

A machine, a camera PC or an operator drops part images into a folder; this
module yields each file as a :class:`FileItem` once it is complete, never
while it is still being written. Two ways to tell:

- events (the default, Linux inotify through watchdog): a file is complete
  when the writer closes it after writing (``IN_CLOSE_WRITE``) or when it is
  renamed or moved into the folder. Creation and modification events do not
  count: a writer pausing between chunks would otherwise be read early.
- polling (``poll=SECONDS``, for network shares, where no events arrive): a
  file is complete once its size and mtime have held still for ``settle``
  seconds.

Where completeness is guessed (files there at start, files a rescan or a
poll finds), holding still is not enough: a writer may pause longer than
``settle``. So the kernel is asked whether any process still has the file
open for writing (:mod:`edge_inspect.sources.writers`); a file still open
waits for its close. Where the platform cannot tell (network file systems,
whose writers sit on other machines, or a user who cannot see other users'
processes), the file must hold still for ``settle_unsure`` seconds instead.

Writers should write under an ignored name (``x.png.part``, ``x.tmp``, a
dotfile) and rename into place, or write the file in one open-write-close.

Events can miss a file: one that appears through a hard link raises no close
or move event, and the kernel drops events when its inotify queue overflows.
So event mode also rescans the folder every ``rescan`` seconds, and at once
after an overflow, and yields the files no event reported, once they have
held still for ``settle`` seconds.

    >>> with HotFolder("/srv/edge-inspect/incoming", exclude=["ok", "ng"]) as folder:
    ...     for item in folder:                    # blocks, waiting for files
    ...         print(item.path, item.size)
    /srv/edge-inspect/incoming/part-0001.png 48211
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import re
import stat
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEventHandler,
)

from edge_inspect.errors import ConfigError, SourceError
from edge_inspect.preprocess import is_image_name
from edge_inspect.sources.writers import WriteCheck

log = logging.getLogger(__name__)

#: Names never yielded: hidden files and the usual partial-download suffixes.
DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.crdownload", "*~")

#: How often the event-mode iterator checks that the observer thread lives.
_LIVENESS_S = 2.0
#: Yielded files remembered before the ones gone from the folder are forgotten.
_REMEMBERED = 1024
#: Entries looked at, at most, to tell whether a sub-folder that is not watched holds images (per scan).
_PEEK_ENTRIES = 2000
_STOP = object()
_OVERFLOW = object()


@dataclass(frozen=True)
class FileItem:
    """A complete file in a hot folder, ready to be read.

    Attributes:
        path: absolute path, under the folder as given (symlinks not resolved).
        size: ``st_size`` when it was judged complete.
        mtime_ns: ``st_mtime_ns`` when it was judged complete.
    """

    path: Path
    size: int
    mtime_ns: int


class HotFolder:
    """Yield the files arriving in a folder, each once it is complete.

    Iterate a hot folder once: it blocks, waiting for files, until
    :meth:`stop` is called (from any thread, a signal handler included) or
    the folder itself goes away.
    A file may be yielded more than once (found by the backlog scan and by
    an event at start, or rewritten later): the consumer deduplicates, the
    watch pipeline with its ledger.

    Args:
        folder: the folder to watch; must exist and be a readable directory.
        poll: ``None`` to use inotify events (Linux); ``SECONDS`` to scan the
            folder every so often instead, for network shares (NFS, SMB)
            where events from other machines never arrive.
        settle: seconds a file's size and mtime must hold still before it is
            yielded when no close event says it is complete (poll mode,
            rescans, and backlog files still open at start), once no process
            has it open for writing.
        settle_unsure: the same, where the platform cannot tell whether a
            process still has the file open for writing (network file
            systems; see :mod:`~edge_inspect.sources.writers`). Longer, since
            a writer may pause: at least ``settle``.
        ignore: ``fnmatch`` patterns on the file name, compared
            case-insensitively; a directory whose name matches, or whose name
            starts with a dot, is not descended into. Every other regular
            file is yielded, images or not, so that a stray file gets an
            error verdict downstream instead of lying there unnoticed.
        backlog: first yield the files already in the folder at start,
            oldest mtime first (ties by name). True by default because the
            ledger deduplicates files already inspected: restarting after a
            crash or a power cut catches up with the files that arrived while
            the service was down, and inspects nothing twice.
        recursive: also yield the files in sub-folders, at any depth, those
            created after the start included (a new sub-folder's files
            that no close event reports are settled as a rescan's are).
            Off, a sub-folder holding image files is named in a warning,
            once, when a scan finds it (at start, at each rescan or poll)
            or when it is moved in.
        exclude: sub-folders never yielded from (the watch pipeline sorts
            files into ``ok/``, ``ng/`` and ``error/`` inside the watched
            folder): absolute paths, or relative ones, taken both from the
            working directory and from ``folder``.
        rescan: in event mode, seconds between safety scans of the folder;
            ``None`` turns them off. Events miss a file that appears through
            a hard link (no close or move event) and the files whose events
            the kernel dropped when its inotify queue overflowed (a burst
            faster than this process reads). A rescan yields each file no
            event yielded since it last changed (size or mtime), once it has
            held still for ``settle`` seconds; a file yielded unchanged
            before is not yielded again. An overflow also triggers a rescan
            at once, with a warning in the log, whatever ``rescan`` says.
            Poll mode ignores it: every poll is a scan.

    Raises:
        SourceError: ``folder`` is missing, not a directory or not readable;
            while iterating in event mode, the folder was removed or cannot
            be watched (inotify limits). In poll mode a folder that cannot
            be listed any more (a network share gone) is logged and polled
            again until it comes back.
        ConfigError: ``poll``, ``settle``, ``settle_unsure`` or ``rescan`` out of range.
    """

    def __init__(self, folder: str | os.PathLike, *, poll: float | None = None, settle: float = 1.0,
                 ignore: Sequence[str] = DEFAULT_IGNORE, backlog: bool = True, recursive: bool = False,
                 exclude: Sequence[str | os.PathLike] = (), rescan: float | None = 60.0,
                 settle_unsure: float = 10.0):
        if poll is not None and not poll > 0:
            raise ConfigError(f"Hot folder poll interval must be a positive number of seconds, got {poll!r}.")
        if rescan is not None and not rescan > 0:
            raise ConfigError(f"Hot folder rescan interval must be a positive number of seconds or None (no "
                              f"periodic rescan), got {rescan!r}.")
        if not settle >= 0:
            raise ConfigError(f"Hot folder settle time must be zero or more seconds, got {settle!r}.")
        if not settle_unsure >= settle:
            raise ConfigError(f"Hot folder settle time where open writers cannot be seen ({settle_unsure!r} s) must "
                              f"be at least the settle time ({settle!r} s).")
        self.folder = Path(os.path.abspath(folder))
        _check_folder(self.folder)
        st = os.stat(self.folder)
        self._identity = (st.st_dev, st.st_ino)
        self.poll = poll
        self.settle = float(settle)
        self.settle_unsure = float(settle_unsure)
        self.writers = WriteCheck(self.folder)
        if not self.writers.can_tell:
            log.info("Hot folder %s is on %s: open writers cannot be seen from here, so files without a close event "
                     "wait %.3g s of stillness (settle_unsure)", self.folder, self.writers.fstype or "this platform",
                     self.settle_unsure)
        self._noted: set[tuple[Path, str]] = set()
        #: ``time.monotonic()`` of the last check that the folder is there and watched: the source's idle check.
        self.checked_at = time.monotonic()
        self.rescan = None if rescan is None else float(rescan)
        self.ignore = tuple(p.lower() for p in ignore)
        self._ignore_re = re.compile("|".join(fnmatch.translate(p) for p in self.ignore) or r"(?!)", re.DOTALL)
        self.backlog = backlog
        self.recursive = recursive
        #: Sub-folders not watched (``recursive`` off) already named in a warning for holding images.
        self._unwatched: set[Path] = set()
        self._unwatched_lock = threading.Lock()
        excluded: list[Path] = []
        for sub in map(Path, exclude):
            # A relative sub-folder may be meant from the working directory (a
            # path given on the command line) or from the folder: exclude both.
            excluded.append(Path(os.path.abspath(sub)))
            if not sub.is_absolute():
                excluded.append(Path(os.path.abspath(self.folder / sub)))
        self.exclude = tuple(dict.fromkeys(excluded))
        # A SimpleQueue, whose put() is reentrant: stop() may run in a signal
        # handler that interrupted the iterating thread inside get().
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._observer = None
        self._observer_stopped = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "HotFolder":
        if self.poll is None:
            self._start_observer()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._stop_observer(join=True)

    def stop(self) -> None:
        """Make the iterator return promptly.

        Safe from any thread, from a signal handler, and more than once. The
        iterating thread stops the observer on its way out; leaving the
        ``with`` block also waits for the observer thread to end.
        """
        self._stopping.set()
        self._queue.put(_STOP)

    def _stop_observer(self, join: bool = False) -> None:
        with self._lock:
            observer, first = self._observer, not self._observer_stopped
            self._observer_stopped = True
        if observer is None:
            return
        if first:
            observer.stop()
        if join and observer.is_alive():
            observer.join(timeout=5.0)

    def __iter__(self) -> Iterator[FileItem]:
        if self.poll is None:
            return self._events()
        return self._polls()

    # ------------------------------------------------------------ filtering

    def _wanted(self, path: Path) -> bool:
        """True when ``path`` lies where files are taken from and its name is not ignored."""
        return path != self.folder and self._wanted_dir(path.parent) and not self._ignored(path.name)

    def _wanted_dir(self, folder: Path) -> bool:
        """True when files are taken from ``folder``: the hot folder, or a sub-folder when recursive."""
        try:
            parts = folder.relative_to(self.folder).parts
        except ValueError:
            return False
        if parts and not self.recursive:
            return False
        return not any(folder.is_relative_to(e) for e in self.exclude) and not any(map(self._skipped_dir, parts))

    def _ignored(self, name: str) -> bool:
        return self._ignore_re.match(name.lower()) is not None

    def _skipped_dir(self, name: str) -> bool:
        # Hidden folders hold state, the watch ledger's included: never descend.
        return name.startswith(".") or self._ignored(name)

    def _item(self, path: Path, entry: os.DirEntry | None = None) -> FileItem | None:
        """The file's :class:`FileItem`, or None when it is gone or not a regular file (logged once)."""
        try:
            st = entry.stat() if entry is not None else os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):
                self._note(path, "a broken symbolic link (its target does not exist)")
            return None
        except OSError as exc:
            if os.path.islink(path):
                self._note(path, f"a symbolic link that cannot be followed ({exc.strerror or exc})")
            else:
                log.debug("Skipping %s: %s", path, exc)
            return None
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
            self._note(path, kind)
            return None
        return FileItem(path, st.st_size, st.st_mtime_ns)

    def _note(self, path: Path, kind: str) -> None:
        """Log once per path and kind that an entry is not inspected, because it is not a regular file."""
        key = (path, kind)
        if key in self._noted:
            return
        if len(self._noted) >= _REMEMBERED:
            self._noted.clear()
        self._noted.add(key)
        log.warning("Hot folder %s: %s is %s, not a file; it gets no verdict. Move it away, or drop the image file "
                    "itself in the folder.", self.folder, path.name, kind)

    def check_unwatched(self, folder: Path) -> None:
        """Warn once if ``folder``, a sub-folder that is not watched (``recursive`` off), holds image files.

        Excluded, hidden and ignored sub-folders are not looked into; nor is
        one already named. At most :data:`_PEEK_ENTRIES` entries are looked
        at per call, so a large tree without images costs little at each scan.
        """
        if self.recursive or folder.parent != self.folder or folder in self._unwatched or not self._walks_into(folder):
            return
        image = self._first_image(folder)
        if image is None:
            return
        with self._unwatched_lock:
            if folder in self._unwatched:
                return
            self._unwatched.add(folder)
        log.warning("Hot folder %s: its sub-folder %s holds image files (%s, perhaps more) that are not inspected: "
                    "only the files directly in the folder are. To inspect sub-folders too, watch with --recursive, "
                    "or set recursive = true in the source's configuration; or move the images into %s.",
                    self.folder, folder.name, image.relative_to(folder).as_posix(), self.folder)

    def _walks_into(self, folder: Path) -> bool:
        """Whether a walk goes into this sub-folder: not hidden, ignored or a sort folder, and not excluded."""
        return not self._skipped_dir(folder.name) and not any(folder.is_relative_to(e) for e in self.exclude)

    def _first_image(self, folder: Path) -> Path | None:
        """A file with an image name under ``folder`` (hidden, ignored and excluded folders skipped), or None."""
        pending, seen = [folder], 0
        while pending and seen < _PEEK_ENTRIES:
            try:
                with os.scandir(pending.pop()) as listing:
                    for entry in listing:
                        seen += 1
                        if seen > _PEEK_ENTRIES:
                            break
                        try:
                            is_dir = entry.is_dir(follow_symlinks=False)
                        except OSError:
                            continue
                        if is_dir:
                            if self._walks_into(Path(entry.path)):
                                pending.append(Path(entry.path))
                        elif is_image_name(entry.name) and not self._ignored(entry.name):
                            return Path(entry.path)
            except OSError:
                continue
        return None

    def check_identity(self) -> None:
        """Raise :class:`SourceError` when the folder was removed, renamed or replaced since the start."""
        try:
            st = os.stat(self.folder)
        except FileNotFoundError:
            raise self.gone() from None
        except OSError as exc:
            raise SourceError(f"Hot folder {self.folder} cannot be checked any more ({exc.strerror or exc}). "
                              "Check the folder and restart.") from exc
        if (st.st_dev, st.st_ino) != self._identity:
            raise SourceError(f"Hot folder {self.folder} was replaced while watched (renamed or removed, and "
                              "another folder made under its name): the files arriving there are not seen. "
                              "Restart to watch the new folder.")

    def _wait(self, pending: dict[Path, tuple[tuple[int, int], float]], now: float) -> float:
        """Seconds until the next pending file may be complete: after ``settle``, or ``settle_unsure``."""
        def due(since: float) -> float:
            if since + self.settle > now:
                return since + self.settle
            return since + self.settle_unsure if since + self.settle_unsure > now else now
        return max(0.05, min(due(since) for _, since in pending.values()) - now)

    def gone(self) -> SourceError:
        """The error of a folder removed, renamed or unmounted while watched."""
        return SourceError(f"Hot folder {self.folder} was removed or renamed (or unmounted) while watched: no part "
                           "can arrive in it any more, and a ledger inside it is gone with it. Restore the folder "
                           "(or point the watcher at its new path) and restart.")

    def _complete(self, path: Path, still_for: float) -> bool | None:
        """Whether a file that held still for ``still_for`` seconds is complete; None: still open, wait for it."""
        busy = self.writers.busy(path)
        if busy:
            return None
        return still_for >= (self.settle if busy is False else self.settle_unsure)

    def _scan(self, top: Path | None = None) -> list[FileItem]:
        """The wanted regular files under ``top`` (default: the folder), oldest mtime first, ties by name.

        Raises:
            OSError: the folder itself cannot be listed (sub-folders that
                cannot are logged and skipped).
        """
        items: list[FileItem] = []
        pending = [top or self.folder]
        while pending and not self._stopping.is_set():
            current = pending.pop()
            try:
                entries = list(os.scandir(current))
            except OSError as exc:
                if current == self.folder:
                    raise
                log.warning("Cannot list %s (%s); skipping it", current, exc)
                continue
            # Only wanted folders are listed, so a file's name is all there is to check.
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    path = Path(entry.path)
                    if self.recursive and self._walks_into(path):
                        pending.append(path)
                    elif not self.recursive:
                        if is_image_name(entry.name) and not self._ignored(entry.name):
                            self._note(path, "a folder")
                        self.check_unwatched(path)
                elif not self._ignored(entry.name):
                    item = self._item(Path(entry.path), entry)
                    if item is not None:
                        items.append(item)
        items.sort(key=lambda i: (i.mtime_ns, i.path.name, str(i.path)))
        return items

    # ------------------------------------------------------------ events

    def _start_observer(self) -> None:
        with self._lock:
            if self._observer is not None or self._observer_stopped or self._stopping.is_set():
                return
            if not sys.platform.startswith("linux"):
                raise SourceError(
                    f"Hot folder {self.folder}: event mode needs Linux inotify (close-after-write events), "
                    f"and this is {sys.platform}. Poll the folder instead (the poll setting, in seconds)."
                )
            from watchdog.observers.inotify import InotifyObserver

            observer = None
            try:
                # Full events: a file moved in from outside the watched tree
                # arrives as a move with an empty source, not as a creation.
                observer = InotifyObserver(generate_full_events=True)
                observer.schedule(_Handler(self), str(self.folder), recursive=self.recursive,
                                  event_filter=[FileClosedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent,
                                                DirDeletedEvent])
                observer.start()
                _OverflowWatch.attach(observer, self)
            except OSError as exc:
                if observer is not None and observer.is_alive():
                    observer.stop()
                    observer.join(timeout=5.0)
                raise SourceError(
                    f"Cannot watch {self.folder} for new files: {exc}. If inotify limits are reached, raise "
                    "fs.inotify.max_user_watches / max_user_instances (sysctl), or poll the folder (the poll setting, in seconds)."
                ) from exc
            self._observer = observer

    def _events(self) -> Iterator[FileItem]:
        self._start_observer()  # first, so that no file falls between the scan and the watch
        try:
            # What was yielded, for the rescans to tell the files that events missed.
            yielded = _Yielded()
            pending: dict[Path, tuple[tuple[int, int], float]] = {}
            if self.backlog:
                pending = yield from self._backlog_events(yielded)
            else:
                # Files there at start are not new: a rescan yields them only once they change.
                for item in self._listing():
                    yielded.add(item)
            next_rescan = time.monotonic() + self.rescan if self.rescan is not None else float("inf")
            while not self._stopping.is_set():
                now = time.monotonic()
                timeout = min(_LIVENESS_S, max(0.0, next_rescan - now))
                if pending:
                    timeout = min(timeout, self._wait(pending, now))
                try:
                    message = self._queue.get(timeout=timeout)
                except queue.Empty:
                    message = None
                if message is _STOP or self._stopping.is_set():
                    return
                if isinstance(message, BaseException):
                    raise message
                if isinstance(message, FileItem):
                    pending.pop(message.path, None)
                    yielded.add(message)
                    yield message
                elif isinstance(message, _Found):
                    self._settle_later(message.items, yielded, pending)
                elif message is _OVERFLOW:
                    log.warning("Hot folder %s: the kernel dropped file events (inotify queue overflow); "
                                "rescanning the folder for the files they announced. If this recurs, raise "
                                "fs.inotify.max_queued_events (sysctl).", self.folder)
                if message is _OVERFLOW or time.monotonic() >= next_rescan:
                    self._rescan(yielded, pending)
                    if self.rescan is not None:
                        next_rescan = time.monotonic() + self.rescan
                if pending:
                    for item in self._settled(pending):
                        yielded.add(item)
                        yield item
                if message is None and not self._stopping.is_set():
                    self.check_identity()
                    self.checked_at = time.monotonic()
                    if not self._watching():
                        raise SourceError(f"The watch on {self.folder} ended unexpectedly. Restart to watch again.")
        finally:
            self._stop_observer()

    def _watching(self) -> bool:
        observer = self._observer
        return observer.is_alive() and all(emitter.is_alive() for emitter in observer.emitters)

    def _listing(self) -> list[FileItem]:
        """:meth:`_scan` at start, in event mode.

        Raises:
            SourceError: the folder cannot be listed.
        """
        try:
            return self._scan()
        except OSError as exc:
            raise SourceError(f"Cannot list hot folder {self.folder}: {exc}. Check its permissions.") from exc

    def _backlog_events(self, yielded: _Yielded):
        """Yield the backlog's complete files; return the others, to be settled.

        A file there at start may still be open by a writer that paused, however
        old its mtime: it is yielded by its close event, or once no process has
        it open and it has held still. Where open writers cannot be seen, its
        mtime must be ``settle_unsure`` seconds old.
        """
        items = self._listing()
        pending: dict[Path, tuple[tuple[int, int], float]] = {}
        now, wall_ns = time.monotonic(), time.time_ns()
        log.info("Hot folder %s: %d files waiting at start", self.folder, len(items))
        for item in items:
            if self._stopping.is_set():
                break
            # The mtime's age counts as stillness: a local file system's clock is this machine's.
            age = max(0.0, (wall_ns - item.mtime_ns) / 1e9)
            complete = self._complete(item.path, age)
            if complete:
                yielded.add(item)
                yield item
            else:  # still open (None): wait from now; unsure: the time it already held still counts
                pending[item.path] = ((item.size, item.mtime_ns), now if complete is None else now - age)
        return pending

    def _rescan(self, yielded: _Yielded, pending: dict[Path, tuple[tuple[int, int], float]]) -> None:
        """Scan the folder for files that no event yielded since they last changed; settle them in ``pending``.

        They are yielded once they have held still for ``settle`` seconds, as
        seen from here, as in poll mode: a file that events missed may still
        be being written, its close event dropped or still to come.
        """
        try:
            items = self._scan()
        except OSError as exc:
            # The watch reports a folder removed; anything else may pass. Try again next time.
            log.warning("Cannot rescan hot folder %s (%s); trying again at the next rescan", self.folder, exc)
            return
        if self._stopping.is_set():
            return  # a partial scan: it would forget files still there
        yielded.keep(item.path for item in items)
        missed = self._settle_later(items, yielded, pending)
        if missed:
            log.info("Hot folder %s: the rescan found %d file(s) no event reported, first %s",
                     self.folder, len(missed), missed[0].path.name)

    @staticmethod
    def _settle_later(items: Sequence[FileItem], yielded: _Yielded,
                      pending: dict[Path, tuple[tuple[int, int], float]]) -> list[FileItem]:
        """Put the files no event yielded since they last changed in ``pending``, from now; returns them."""
        now = time.monotonic()
        missed = [item for item in items if item.path not in pending and not yielded.unchanged(item)]
        for item in missed:
            pending[item.path] = ((item.size, item.mtime_ns), now)
        return missed

    def _settled(self, pending: dict[Path, tuple[tuple[int, int], float]]) -> Iterator[FileItem]:
        now = time.monotonic()
        for path, (signature, since) in list(pending.items()):
            item = self._item(path)
            if item is None:
                del pending[path]
            elif (item.size, item.mtime_ns) != signature:
                pending[path] = ((item.size, item.mtime_ns), now)
            elif now - since >= self.settle:
                complete = self._complete(path, now - since)
                if complete is None:  # still open: its close event yields it, or a later check
                    pending[path] = (signature, now)
                elif complete:
                    del pending[path]
                    yield item

    # ------------------------------------------------------------ polling

    def _polls(self) -> Iterator[FileItem]:
        # path -> (size, mtime_ns) of the last yield, or of the start without backlog
        done: dict[Path, tuple[int, int]] = {}
        # path -> ((size, mtime_ns), monotonic time first seen so)
        pending: dict[Path, tuple[tuple[int, int], float]] = {}
        first, failing = True, False
        while not self._stopping.is_set():
            try:
                items = self._scan()
            except OSError as exc:
                # A network share can come back: say so once, keep polling.
                if not failing:
                    log.warning("Cannot list hot folder %s (%s); retrying every %.3g s", self.folder, exc, self.poll)
                failing = True
                items = None
            if items is not None:
                if failing:
                    log.info("Hot folder %s readable again", self.folder)
                failing = False
                self.check_identity()
                self.checked_at = time.monotonic()
                now = time.monotonic()
                seen = set()
                ready = []
                for item in items:
                    signature = (item.size, item.mtime_ns)
                    seen.add(item.path)
                    if first and not self.backlog:
                        done[item.path] = signature
                    if done.get(item.path) == signature:
                        continue
                    previous = pending.get(item.path)
                    if previous is None or previous[0] != signature:
                        pending[item.path] = (signature, now)
                        previous = pending[item.path]
                    if now - previous[1] >= self.settle:
                        complete = self._complete(item.path, now - previous[1])
                        if complete is None:  # a writer still has it open
                            pending[item.path] = (signature, now)
                        elif complete:
                            ready.append(item)
                for path in [p for p in pending if p not in seen]:
                    del pending[path]
                for path in [p for p in done if p not in seen]:
                    del done[path]
                first = False
                for item in ready:  # already oldest first
                    if self._stopping.is_set():
                        return
                    del pending[item.path]
                    done[item.path] = (item.size, item.mtime_ns)
                    yield item
            wait = self.poll
            if pending:
                wait = min(wait, self._wait(pending, time.monotonic()))
            try:
                if self._queue.get(timeout=wait) is _STOP:
                    return
            except queue.Empty:
                pass


@dataclass(frozen=True)
class _Found:
    """Files found in a new sub-folder, for the iterator to settle (no close event may come for them)."""

    items: tuple[FileItem, ...]


class _Yielded:
    """The files yielded in event mode, path -> (size, mtime_ns), for the rescans.

    Memory stays bounded by the files in the folder: each rescan forgets the
    files gone from it, and so does :meth:`add` (checking each path) once
    the count doubles, for when rescans are rare or off.
    """

    def __init__(self):
        self._signatures: dict[Path, tuple[int, int]] = {}
        self._limit = _REMEMBERED

    def add(self, item: FileItem) -> None:
        self._signatures[item.path] = (item.size, item.mtime_ns)
        if len(self._signatures) > self._limit:
            self.keep(path for path in self._signatures if os.path.lexists(path))
            self._limit = max(_REMEMBERED, 2 * len(self._signatures))

    def unchanged(self, item: FileItem) -> bool:
        """True when ``item`` was yielded with this size and mtime."""
        return self._signatures.get(item.path) == (item.size, item.mtime_ns)

    def keep(self, paths) -> None:
        """Forget every file but ``paths`` (the ones still there)."""
        kept = set(paths)
        self._signatures = {p: s for p, s in self._signatures.items() if p in kept}


class _OverflowWatch:
    """Tells a hot folder when the kernel dropped events: its inotify queue overflowed.

    watchdog reacts to an overflow itself (it logs it and rebuilds its
    recursive watches) but delivers no event for it to the handler. So this
    joins the observer's inotify instance as one more callback on the
    folder's watch (``IN_MASK_ADD`` leaves the watch's mask as it is): the
    instance reports an overflow to each of its callbacks, on its reading
    thread.
    """

    def __init__(self, hot: HotFolder):
        self.hot = hot

    @classmethod
    def attach(cls, observer, hot: HotFolder) -> None:
        """Register with ``observer``'s inotify instance, or log that this watchdog version has none to offer.

        Raises:
            OSError: the folder cannot be watched.
        """
        inotify = getattr(observer, "_inotify_fd", None)
        if not callable(getattr(inotify, "add_callback", None)):
            log.info("Hot folder %s: this watchdog version does not report inotify queue overflows; only the "
                     "periodic rescan (rescan=%s) finds the files whose events the kernel dropped",
                     hot.folder, hot.rescan)
            return
        from watchdog.observers.inotify_c import InotifyConstants

        watch = cls(hot)
        mask = InotifyConstants.IN_MASK_ADD | InotifyConstants.IN_DONT_FOLLOW | InotifyConstants.IN_DELETE_SELF
        inotify.add_callback(os.fsencode(hot.folder), mask, watch, id(watch))

    def on_queue_overflow(self) -> None:
        self.hot._queue.put(_OVERFLOW)

    def on_event(self, event) -> None:
        """The folder's events reach the hot folder through its handler."""

    def on_watch_deleted(self, wd) -> None:
        """The folder gone is reported through the handler."""


class _Handler(FileSystemEventHandler):
    """Turns the observer's events into :class:`FileItem` s on the hot folder's queue.

    Runs on the observer thread. It must not raise: an exception there ends
    the observer thread silently, so it goes on the queue, for the iterator
    to raise.
    """

    def __init__(self, hot: HotFolder):
        super().__init__()
        self.hot = hot

    def dispatch(self, event) -> None:
        try:
            self._handle(event)
        except Exception as exc:  # noqa: BLE001  (re-raised by the iterator, on the consumer's thread)
            self.hot._queue.put(exc)

    def _handle(self, event) -> None:
        hot = self.hot
        if isinstance(event, FileClosedEvent):
            self._offer(event.src_path)
        elif isinstance(event, FileMovedEvent):
            if event.dest_path:
                self._offer(event.dest_path)
        elif isinstance(event, DirMovedEvent):
            # A folder moved in from outside the watched tree brings its files
            # without an event each (moves inside the tree have sub-events).
            dest = Path(os.fsdecode(event.dest_path)) if event.dest_path else None
            source = Path(os.fsdecode(event.src_path)) if event.src_path else None
            if (dest is not None and hot._wanted_dir(dest)
                    and (source is None or not source.is_relative_to(hot.folder))):
                for item in hot._scan(dest):
                    hot._queue.put(item)
            elif dest is not None and not hot.recursive:
                hot.check_unwatched(dest)
        elif isinstance(event, DirCreatedEvent):
            # A new sub-folder is watched once the observer sees it: a file written and closed in it before
            # then raised no close event. Settle what is there already, as a rescan does.
            path = Path(os.fsdecode(event.src_path))
            if hot.recursive and path != hot.folder and hot._wanted_dir(path):
                items = hot._scan(path)
                if items:
                    hot._queue.put(_Found(tuple(items)))
        elif isinstance(event, DirDeletedEvent):
            if Path(os.fsdecode(event.src_path)) == hot.folder:
                hot._queue.put(hot.gone())

    def _offer(self, raw: str | bytes) -> None:
        path = Path(os.fsdecode(raw))
        if self.hot._wanted(path):
            item = self.hot._item(path)
            if item is not None:
                self.hot._queue.put(item)


def _check_folder(folder: Path) -> None:
    """Raise :class:`SourceError` unless ``folder`` is a readable directory."""
    try:
        folder.stat()
    except FileNotFoundError:
        raise SourceError(f"Hot folder {folder} does not exist. Create it, or pass the folder the parts arrive in.")
    except PermissionError:
        raise SourceError(f"Hot folder {folder} cannot be reached by this user (a folder on its path is closed to "
                          "it). Check the owner and permissions of the folders above it.") from None
    if not folder.is_dir():
        raise SourceError(f"Hot folder {folder} is a file, not a folder. Pass the folder the parts arrive in.")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise SourceError(f"Hot folder {folder} is not readable by this user. Check its owner and permissions.")
