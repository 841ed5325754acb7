"""The watch pipeline: a source's parts in, one durable verdict per part out.

This module wires the line together for ``edge-inspect watch``::

    source ──> readers ──> inference ──> commit ──> sinks
    (hot folder (read once,  (dynamic     (ledger,   (sort, heatmaps,
     or camera)  sha256,      batches)     one txn    JSONL; then the
                 decode)                   a batch)   ledger marks them done)

Each stage is a thread (the readers a small pool) joined by bounded queues,
so decoding, inference and the ledger's sync overlap. The inference loop
takes whatever is queued, up to the batch size: a single part goes alone at
once, a burst fills batches. A file is read ONCE; its sha256 and its decoded
image come from the same bytes, so the verdict belongs to exactly the bytes
hashed. A part whose identity is already in the ledger (the same file seen
twice, or again after a restart) is dropped before decoding. A part that
cannot be inspected (vanished, unreadable, corrupt, too large, not an
image) gets an ``error`` verdict with the reason, and the watcher goes on.
An image far from the model's input (colour, much larger or smaller,
another aspect ratio) is inspected with a note in its row (``input_note``),
and the first of each kind is named in a warning.

At start, sinks left pending by an interrupted run are replayed. A sink
that fails while running (a full disk, a folder gone) leaves its rows
pending, with the cause in the ledger (``sink_error``), and is retried with
backoff while the watcher runs; its outage is logged once when it starts and
once when it ends. At stop (:meth:`Watcher.stop`, from a signal handler for
instance) the source stops, the parts already in hand are finished,
committed and sunk, and :meth:`Watcher.run` returns. systemd hears READY after the replay,
WATCHDOG (at most once a second) after a committed batch, and while idle as
long as the inference loop turns, and STOPPING when the stop begins
(:mod:`edge_inspect.notify`).

    >>> with Ledger.open("parts/.edge-inspect/ledger.sqlite") as ledger:
    ...     watcher = Watcher(HotFolder("parts/"), inspector, ledger, sinks=[JsonlSink("v.jsonl")])
    ...     summary = watcher.run()         # until watcher.stop()
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_inspect import notify, numbers
from edge_inspect.errors import ConfigError, EdgeInspectError, InputError
from edge_inspect.imageheader import DEFAULT_MAX_PIXELS, image_dimensions  # noqa: F401  (re-exported)
from edge_inspect.imageheader import check_pixels as _check_pixels
from edge_inspect.ledger import Ledger, Record, file_identity, frame_identity, path_columns
from edge_inspect.preprocess import InputNote, NoteWarnings, decode_image, input_note, preprocess
from edge_inspect.sinks import Done, Sink

log = logging.getLogger(__name__)

#: The order sinks run in: the JSON line last, so that it names the sorted file and its heatmap.
SINK_ORDER = ("sort", "heatmaps", "jsonl")
#: The sinks whose results a sink writes down: it runs for a row only once they are done with it.
_WAITS_FOR = {"sort": set(), "heatmaps": set(), "jsonl": {"sort", "heatmaps"}}
_END = object()
_TICK = 0.5
#: First and longest wait before a failed sink is tried again while running.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0


class _Aborted(Exception):
    """Another stage failed; this one stops."""


@dataclass(frozen=True)
class Summary:
    """What a run did: verdicts written per kind, parts dropped as already inspected, sinks replayed."""

    ok: int = 0
    ng: int = 0
    error: int = 0
    duplicates: int = 0
    replayed: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + self.ng + self.error


@dataclass
class _Part:
    """A part between the readers and the ledger."""

    ident: dict                      # identity, kind, source and the identity columns of the Record
    arrived_at: float
    key: tuple | None = None         # in-flight key of a file
    read_at: float | None = None
    image: np.ndarray | None = None  # the model's input, preprocessed
    original: np.ndarray | None = None  # the decoded image, kept for heatmaps
    error: str | None = None
    result: object = None
    inspected_at: float | None = None
    note: InputNote | None = None    # how far the decoded image was from the model's input


# ------------------------------------------------------------------ reading


def read_file(path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file, read once, and its ``fstat``.

    Raises:
        InputError: the file vanished, cannot be opened or read, is not a
            regular file, or is larger than ``max_bytes``.
    """
    name = path.name
    try:
        # O_NONBLOCK: opening a FIFO dropped in the folder must not hang the reader.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise InputError(f"{name}: vanished before it could be read (deleted or moved away).") from exc
    except PermissionError as exc:
        raise InputError(f"{name}: permission denied; the watcher's user cannot read it. "
                         "Check the file's owner and mode.") from exc
    except OSError as exc:
        raise InputError(f"{name}: cannot be opened ({exc.strerror or exc}).") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{name}: not a regular file (a folder, pipe or device); expected an image file.")
        if st.st_size > max_bytes:
            raise InputError(f"{name}: {st.st_size} bytes, over the limit of {max_bytes} bytes that --max-pixels "
                             "implies; not read. Raise --max-pixels if such images are expected.")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), st
    except OSError as exc:
        raise InputError(f"{name}: cannot be read ({exc.strerror or exc}).") from exc
    finally:
        os.close(fd)


def read_complete(path: Path, max_bytes: int, writers=None, patience: float = 10.0,
                  stopping: threading.Event | None = None) -> tuple[bytes, os.stat_result] | None:
    """The bytes of a file that no writer is changing, and its ``fstat``; None: it is being written again.

    A file reported complete (closed after writing, or still for the
    settle time) may be opened again before it is read: a writer that
    truncates and rewrites it leaves a partial content for a while. So after
    each read the file must be closed by every writer (``writers.busy``,
    where a file lease can tell) and unchanged since (inode, size, mtime);
    otherwise it is looked at every 50 ms and read again once it has changed
    and then held still for one look, for up to ``patience`` seconds. When the
    patience (or the watcher) runs out: the content read is judged if the file
    has not changed since the first read, only held open; None if it changed,
    for its next complete version (a new close event, or a poll that sees the
    change) to bring.

    Raises:
        InputError: as :func:`read_file`.
    """
    deadline = time.monotonic() + patience
    data, st = read_file(path, max_bytes)
    first = read = _version(st)
    last = None
    while True:
        busy = writers.busy(path, scan=False) if writers is not None else None
        try:
            version = _version(os.stat(path))
        except OSError:
            return data, st  # moved away or deleted since: what was read is all there is
        if version == read and not busy:
            return data, st
        timed_out = time.monotonic() >= deadline
        if timed_out or (stopping is not None and stopping.is_set()):
            held = version == read == first
            if timed_out:
                log.warning("%s: %s %.3g s after it was reported complete; %s. Writers should close a file when "
                            "done, or write it under a temporary name and rename it into place.", path.name,
                            "still open for writing, unchanged," if held else "still being written",
                            patience, "judged as it is" if held else "its next complete version gets the verdict")
            return (data, st) if held else None
        if version != read and version == last:
            # Changed since the read and still since the last look: read the new content (a file
            # that keeps changing is not read again on every look).
            data, st = read_file(path, max_bytes)
            read = _version(st)
            continue
        last = version
        time.sleep(_REREAD_S)


def _version(st: os.stat_result) -> tuple[int, int, int]:
    """Which content a file holds, as far as its metadata tells: inode, size, mtime."""
    return st.st_ino, st.st_size, st.st_mtime_ns


#: Seconds between looks at a file a writer is still changing.
_REREAD_S = 0.05


# ----------------------------------------------------------------- pipeline


class Watcher:
    """Inspect every part a source yields, exactly once, into a ledger and sinks.

    Args:
        source: an iterable of :class:`~edge_inspect.sources.FileItem` or
            :class:`~edge_inspect.sources.FrameItem` (anything with the same
            attributes); its ``stop()``, when it has one, is called by
            :meth:`stop`.
        inspector: the loaded :class:`~edge_inspect.inspector.Inspector`
            (with ``anomaly_map=True`` when a heatmaps sink is given).
        ledger: the open :class:`~edge_inspect.ledger.Ledger`.
        sinks: sinks to run after each commit (see :mod:`edge_inspect.sinks`).
        readers: threads reading and decoding.
        max_pixels: images with more pixels get an error verdict; checked
            from the header before decoding where the format allows.
        max_bytes: files larger than this get an error verdict unread
            (default: 8 bytes a pixel of ``max_pixels``, the size of an
            uncompressed 16-bit RGBA image, plus 1 MiB).
        systemd: tell systemd READY, WATCHDOG and STOPPING itself (a lone
            watcher); a service of several watchers does it for them, from
            :attr:`ready` and :attr:`committed_mono`.
        observer: told of each committed batch (``committed(records)``)
            and each model run (``inferred(batch_size, seconds)``): metrics.
        disk_guard: ``guard(folder) -> reason | None``; while it gives a
            reason for a sink's folder, sorting and heatmaps wait (their
            rows stay pending with the reason) and verdicts still commit.

    Raises:
        ConfigError: a bad setting.
    """

    def __init__(self, source: Iterable, inspector, ledger: Ledger, *, sinks: Sequence[Sink] = (), readers: int = 2,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None, systemd: bool = True,
                 observer=None, disk_guard=None):
        if readers < 1 or max_pixels < 1:
            raise ConfigError(f"A watcher needs at least 1 reader and a positive max_pixels; got readers={readers}, "
                              f"max_pixels={max_pixels}.", key="max_pixels" if max_pixels < 1 else "readers")
        names = [s.name for s in sinks]
        if len(set(names)) != len(names) or not set(names) <= set(SINK_ORDER):
            raise ConfigError(f"Sinks must be distinct and among {', '.join(SINK_ORDER)}; got {', '.join(names)}.")
        self.source = source
        # A hot folder tells whether a file is still open for writing, and how long a writer may pause.
        self._writers = getattr(source, "writers", None)
        self._patience = float(getattr(source, "settle_unsure", 10.0))
        self.inspector = inspector
        self.ledger = ledger
        self.sinks = sorted(sinks, key=lambda s: SINK_ORDER.index(s.name))
        self.readers = readers
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes if max_bytes is not None else max_pixels * 8 + (1 << 20)
        self.model_sha256 = inspector.card.data["files"][inspector.precision]["sha256"]
        self.keep_images = any(s.name == "heatmaps" for s in sinks)
        self.systemd = systemd
        self.observer = observer
        self.disk_guard = disk_guard
        #: Set once the pending sinks are replayed and the pipeline runs.
        self.ready = threading.Event()
        #: ``time.monotonic()`` of the last commit (or of the start).
        self.committed_mono = time.monotonic()
        self._paused_by: dict[str, str | None] = {}  # sink -> the low-disk guard's reason, at its last batch
        depth = 4 * inspector.batch_size
        self._items: queue.Queue = queue.Queue(depth)
        self._parts: queue.Queue = queue.Queue(depth)
        self._scored: queue.Queue = queue.Queue(8)
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._failure: BaseException | None = None
        self._source_error: EdgeInspectError | None = None
        self._lock = threading.Lock()
        self._in_flight: set[tuple] = set()
        self._counts = {"ok": 0, "ng": 0, "error": 0, "duplicates": 0}
        self._inference_beat = time.monotonic()
        self._last_ping = 0.0
        # Sinks that failed: rows to retry, when, and the outage each sink is in (its cause), for the log.
        self._retry_ids: set[int] = set()
        self._retry_at = float("inf")
        self._retry_delay = RETRY_FIRST_S
        self._outages: dict[str, str] = {}
        self._row_warned: set[tuple[str, int]] = set()
        # The first part with each kind of input note is named in the log (on the commit thread).
        self._note_warnings = NoteWarnings(f"Hot folder {source.folder}" if hasattr(source, "folder") else
                                           f"Camera {source.uri}" if hasattr(source, "uri") else "Watch",
                                           inspector.size)

    # -------------------------------------------------------------- control

    def stop(self) -> None:
        """Stop the source; parts in hand are finished. Thread-safe, and safe in a signal handler."""
        first = not self._stopping.is_set()
        self._stopping.set()
        if first:
            log.info("Stopping: finishing the parts in hand.")
            if self.systemd:
                notify.stopping()
        stop = getattr(self.source, "stop", None)
        if stop is not None:
            stop()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._abort.set()
        self.stop()

    def _put(self, q: queue.Queue, value) -> None:
        while True:
            if self._abort.is_set():
                raise _Aborted
            try:
                q.put(value, timeout=_TICK)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue, on_idle=None):
        while True:
            if self._abort.is_set():
                raise _Aborted
            try:
                return q.get(timeout=_TICK)
            except queue.Empty:
                if on_idle is not None:
                    on_idle()

    def _stage(self, body, done=None):
        def run():
            try:
                body()
            except _Aborted:
                return
            except BaseException as exc:  # handed to run(), which re-raises it
                log.debug("Watch stage %s failed", threading.current_thread().name, exc_info=True)
                self._fail(exc)
                return
            if done is not None:
                try:
                    done()
                except _Aborted:
                    return
        return run

    # ---------------------------------------------------------------- run

    def run(self) -> Summary:
        """Replay pending sinks, then inspect until the source ends or :meth:`stop`; returns the summary.

        Raises:
            EdgeInspectError: the source, the model or the ledger failed
                (the parts already committed stay committed).
        """
        start = time.monotonic()
        replayed = self._replay()
        if self.systemd:
            notify.ready()
            notify.status("Watching")
        self.ready.set()
        threads = [threading.Thread(target=self._stage(self._source_loop, self._end_items), name="watch-source",
                                    daemon=True)]
        threads += [threading.Thread(target=self._stage(self._reader_loop, lambda: self._put(self._parts, _END)),
                                     name=f"watch-reader-{k}", daemon=True) for k in range(self.readers)]
        threads.append(threading.Thread(target=self._stage(self._commit_loop), name="watch-commit", daemon=True))
        for thread in threads:
            thread.start()
        try:
            self._stage(self._inference_loop, lambda: self._put(self._scored, _END))()
            while any(t.is_alive() for t in threads):
                for thread in threads:
                    thread.join(timeout=_TICK)
        finally:
            if not self._stopping.is_set() and self.systemd:  # the source ended by itself (a video file)
                notify.stopping()
            if any(t.is_alive() for t in threads):
                self._fail(RuntimeError("watch interrupted"))
        if self._failure is not None:
            raise self._failure
        if self._source_error is not None:
            raise self._source_error
        c = self._counts
        return Summary(c["ok"], c["ng"], c["error"], c["duplicates"], replayed, time.monotonic() - start)

    def _end_items(self) -> None:
        for _ in range(self.readers):
            self._put(self._items, _END)

    def _source_loop(self) -> None:
        try:
            for item in self.source:
                self._put(self._items, (item, time.time()))
                if self._stopping.is_set():
                    break
        except EdgeInspectError as exc:
            # The camera or folder failed: finish the parts in hand, then run() raises this.
            log.error("%s", exc)
            self._source_error = exc

    # -------------------------------------------------------------- readers

    def _reader_loop(self) -> None:
        while (entry := self._get(self._items)) is not _END:
            item, arrived = entry
            part = self._frame(item, arrived) if hasattr(item, "image") else self._file(item, arrived)
            if part is not None:
                self._put(self._parts, part)

    def _duplicate(self, part: _Part, why: str) -> None:
        log.debug("%s: %s; no new verdict.", part.ident["source"], why)
        with self._lock:
            self._counts["duplicates"] += 1
            self._in_flight.discard(part.key)

    def _file(self, item, arrived: float) -> _Part | None:
        path = Path(item.path)
        key = (str(path), item.size, item.mtime_ns)
        with self._lock:
            if key in self._in_flight:
                self._counts["duplicates"] += 1
                return None
            self._in_flight.add(key)
        source, raw = path_columns(path)
        part = _Part({"kind": "file", "source": source, "source_raw": raw, "size": item.size,
                      "mtime_ns": item.mtime_ns, "identity": file_identity(path, item.size, item.mtime_ns, None)},
                     arrived, key)
        try:
            read = read_complete(path, self.max_bytes, self._writers, self._patience, self._stopping)
        except InputError as exc:
            if not path.exists() and self.ledger.seen_file(path, item.size, item.mtime_ns):
                self._duplicate(part, "already inspected and moved away")
                return None
            part.error = str(exc)
        else:
            if read is None:
                self._duplicate(part, "it is being written again; its next complete version gets the verdict")
                return None
            data, st = read
            sha = hashlib.sha256(data).hexdigest()
            part.ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha,
                              identity=file_identity(path, st.st_size, st.st_mtime_ns, sha))
            if self.ledger.known(part.ident["identity"]):
                self._duplicate(part, "already in the ledger")
                return None
            try:
                # The header is read and checked against the pixel limit before anything is decoded.
                self._prepare(part, decode_image(data, path.name, max_pixels=self.max_pixels), path.name)
            except EdgeInspectError as exc:
                part.error = str(exc)
        if part.error is not None and self.ledger.known(part.ident["identity"]):
            self._duplicate(part, "its error verdict is already in the ledger")
            return None
        part.read_at = time.time()
        return part

    def _frame(self, item, arrived: float) -> _Part:
        part = _Part({"kind": "frame", "source": item.uri, "frame_index": item.index, "frame_time": item.timestamp,
                      "identity": frame_identity(item.uri, item.timestamp, item.index)}, arrived)
        try:
            self._prepare(part, np.asarray(item.image), f"frame {item.index}")
        except EdgeInspectError as exc:
            part.error = str(exc)
        part.read_at = time.time()
        return part

    def _prepare(self, part: _Part, image: np.ndarray, name: str) -> None:
        _check_pixels(name, image.shape[1] if image.ndim > 1 else 1, image.shape[0], self.max_pixels)
        part.image = preprocess(image, self.inspector.size)
        part.note = input_note(image, self.inspector.size)
        if self.keep_images:
            part.original = image

    # ------------------------------------------------------------ inference

    def _beat(self) -> None:
        self._inference_beat = time.monotonic()

    def _inference_loop(self) -> None:
        ended = 0
        size = self.inspector.batch_size
        while ended < self.readers:
            self._beat()
            first = self._get(self._parts, on_idle=self._beat)
            batch = []
            if first is _END:
                ended += 1
            else:
                batch.append(first)
            while ended < self.readers and len(batch) < size:
                try:
                    more = self._parts.get_nowait()
                except queue.Empty:
                    break
                if more is _END:
                    ended += 1
                else:
                    batch.append(more)
            if batch:
                self._inspect(batch)
                self._put(self._scored, batch)

    def _inspect(self, batch: list[_Part]) -> None:
        good = [p for p in batch if p.error is None]
        if good:
            began = time.perf_counter()
            results = self.inspector.inspect_batch([p.image for p in good], [p.ident["source"] for p in good],
                                                   prepared=True)
            if self.observer is not None:
                self.observer.inferred(len(good), time.perf_counter() - began)
            now = time.time()
            for part, result in zip(good, results):
                part.result, part.inspected_at, part.image = result, now, None
                if result.verdict == "error":
                    part.error = result.error

    # --------------------------------------------------------------- commit

    def _ping(self) -> None:
        """WATCHDOG=1, at most once a second (systemd's watchdog timeouts are seconds or more)."""
        now = time.monotonic()
        if self.systemd and now - self._last_ping >= 1.0:
            self._last_ping = now
            notify.watchdog()

    def _commit_loop(self) -> None:
        def idle():
            # Idle is a success too, as long as the inference loop turns.
            if time.monotonic() - self._inference_beat < 10 * _TICK + 5:
                self._ping()
            self._retry_sinks()

        while (first := self._get(self._scored, on_idle=idle)) is not _END:
            parts, end = list(first), False
            while len(parts) < 4 * self.inspector.batch_size:
                try:
                    more = self._scored.get_nowait()
                except queue.Empty:
                    break
                if more is _END:
                    end = True
                    break
                parts += more
            self._commit(parts)
            self._ping()
            self._retry_sinks()
            if end:
                return

    def _record(self, part: _Part, committed_at: float) -> Record:
        result = part.result
        inspector = self.inspector
        ok = part.error is None
        verdict = result.verdict if ok else "error"
        record = Record(
            **part.ident, verdict=verdict, arrived_at=part.arrived_at, committed_at=committed_at,
            latency_ms=(committed_at - part.arrived_at) * 1e3,
            score=result.score if ok else None, threshold=float(inspector.entry["threshold"]),
            criterion=inspector.criterion, criteria=json.dumps(result.criteria) if ok else None,
            model_sha256=self.model_sha256, error=part.error, read_at=part.read_at, inspected_at=part.inspected_at,
            batch_size=result.batch_size if result is not None else None, polarity=inspector.entry["polarity"],
            input_note=part.note.text if ok and part.note is not None else None,
        )
        return replace(record, sinks_pending=" ".join(s.name for s in self.sinks if s.wants(record)))

    def _commit(self, parts: list[_Part]) -> None:
        committed_at = time.time()
        written = self.ledger.record([self._record(p, committed_at) for p in parts])
        self.committed_mono = time.monotonic()
        if self.observer is not None:
            self.observer.committed([r for r in written if r is not None])
        done = []
        for part, record in zip(parts, written):
            if record is None:
                self._duplicate(part, "committed by a concurrent copy")
                continue
            with self._lock:
                self._counts[record.verdict] += 1
            _log_verdict(record)
            if record.input_note is not None:
                self._note_warnings(record.source if record.kind == "file" else f"frame {record.frame_index}",
                                    part.note)
            amap = getattr(part.result, "anomaly_map", None)
            keep = any(s.name == "heatmaps" and s.wants(record) for s in self.sinks)
            done.append(Done(record, part.original if keep else None, amap if keep else None))
        self._run_sinks(done)
        with self._lock:
            for part in parts:
                self._in_flight.discard(part.key)

    def _run_sinks(self, done: list[Done]) -> None:
        if not done:
            return
        kept = {d.record.id: d for d in done}
        # Each sink gets the rows as earlier sinks left them (the JSON line names the sorted file and heatmap).
        self._sink_rows([d.record for d in done],
                        lambda sink, mine: sink.write([Done(r, kept[r.id].image, kept[r.id].anomaly_map) for r in mine]))

    def _sink_rows(self, records: list[Record], call) -> set[int]:
        """Run each sink on the rows that wait for it; record what is done and why the rest is not.

        ``call(sink, rows)`` runs one sink. A row a sink leaves out stays
        pending for it, with the cause in ``sink_error``, and is retried
        while running. Returns the ids of the rows still pending.
        """
        pending = {r.id: r.pending for r in records}
        columns: dict[int, dict] = {r.id: {} for r in records}
        errors: dict[int, list[str]] = {r.id: [] for r in records}
        by_id = {r.id: r for r in records}
        for sink in self.sinks:
            # A row waits for the sinks whose outputs this one records (the JSON line names the file and overlay).
            mine = [by_id[i] for i in by_id if sink.name in pending[i] and not pending[i] & _WAITS_FOR[sink.name]]
            if not mine:
                continue
            failures = getattr(sink, "failures", None)
            if failures is not None:
                failures.clear()
            paused = self._paused(sink)
            try:
                if paused is not None:
                    updates, cause = {}, paused
                else:
                    updates, cause = call(sink, mine), None
            except (OSError, EdgeInspectError) as exc:
                updates, cause = {}, (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
            for row_id, values in updates.items():
                self._row_warned.discard((sink.name, row_id))
                pending[row_id].discard(sink.name)
                columns[row_id].update(values)
                by_id[row_id] = replace(by_id[row_id], **values)
            reasons = {r.id: cause or (failures or {}).get(r.id) or "not done" for r in mine if r.id not in updates}
            for row_id, reason in reasons.items():
                errors[row_id].append(f"{sink.name}: {reason}")
            self._outage(sink.name, len(mine), reasons, whole=cause is not None)
        left = {i for i in pending if pending[i]}
        self.ledger.finish_sinks({i: {**columns[i], "sinks_pending": " ".join(sorted(pending[i])),
                                      "sink_error": "; ".join(errors[i]) or None} for i in columns})
        if left:
            self._retry_ids |= left
            if self._retry_at == float("inf"):
                self._retry_at = time.monotonic() + self._retry_delay
        return left

    def _outage(self, name: str, tried: int, reasons: dict[int, str], *, whole: bool) -> None:
        """Log a sink's outage once when it starts and once when it ends, not once per part.

        An outage: the sink failed as a whole (``whole``) or for every row it
        was given. A row it leaves while doing others is said once per row.
        """
        if reasons and (whole or len(reasons) == tried):
            if name not in self._outages:
                self._outages[name] = reason = next(iter(reasons.values()))
                log.error("Sink %s failed for %d part(s): %s. Their verdicts are safe in the ledger; the sink is "
                          "retried while running, with backoff up to %.0f s.", name, len(reasons), reason, RETRY_MAX_S)
            return
        if name in self._outages:
            log.info("Sink %s works again (it had failed: %s).", name, self._outages.pop(name))
        for row_id, reason in reasons.items():
            if (name, row_id) not in self._row_warned:
                self._row_warned.add((name, row_id))
                log.warning("Sink %s left row %d pending: %s", name, row_id, reason)

    def _paused(self, sink) -> str | None:
        """The low-disk guard's reason to hold sorting and heatmaps back, or None (its outage is logged as a sink's)."""
        if self.disk_guard is None or sink.name not in ("sort", "heatmaps"):
            return None
        self._paused_by[sink.name] = reason = self.disk_guard(sink.folder)
        return reason

    @property
    def paused(self) -> str | None:
        """Why sorting and heatmaps are paused (low disk), while they are."""
        return next((r for r in self._paused_by.values() if r is not None), None)

    def _retry_sinks(self) -> None:
        """Try the failed sinks again once their backoff has passed (on the commit thread, as every sink)."""
        if not self._retry_ids or time.monotonic() < self._retry_at:
            return
        ids, self._retry_ids = sorted(self._retry_ids), set()
        self._retry_at = float("inf")
        records = [r for r in self.ledger.get_many(ids) if r.pending & {s.name for s in self.sinks}]
        left = self._sink_rows(records, lambda sink, mine: sink.replay(mine, self.inspector)) if records else set()
        if left:
            self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
            self._retry_at = time.monotonic() + self._retry_delay * (0.75 + 0.5 * random.random())
        else:
            self._retry_delay = RETRY_FIRST_S

    # --------------------------------------------------------------- replay

    def _replay(self) -> int:
        """Run the sinks that an earlier run left pending; returns the rows handled."""
        records = self.ledger.pending()
        if not records:
            return 0
        configured = {s.name for s in self.sinks}
        orphans = {name for r in records for name in r.pending} - configured
        if orphans:
            log.warning("Some parts wait for sink(s) %s, which this run does not use; they stay pending until a run "
                        "with them (%s).", ", ".join(sorted(orphans)),
                        ", ".join({"sort": "sinks.sort", "heatmaps": "sinks.heatmaps", "jsonl": "sinks.results"}[n]
                                  for n in sorted(orphans)))
        failed = [r for r in records if r.sink_error]
        if failed:
            log.info("Replaying the sinks of %d part(s): %d left pending by a sink that failed (first: row %d, %s), "
                     "%d by an interrupted run.", len(records), len(failed), failed[0].id, failed[0].sink_error,
                     len(records) - len(failed))
        else:
            log.info("Replaying the sinks of %d part(s) left pending by an interrupted run.", len(records))
        self._sink_rows(records, lambda sink, mine: sink.replay(mine, self.inspector))
        return len(records)


def printable(text: str) -> str:
    """``text`` with control characters escaped: a file name with a newline must not forge a log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _log_verdict(record: Record) -> None:
    name = Path(record.source).name if record.kind == "file" else f"{record.source} frame {record.frame_index}"
    name = printable(name)
    if record.verdict == "error":
        log.info("error  %s (#%d): %s", name, record.id, printable(record.error or ""))
    else:
        score, threshold = numbers.score_pair(record.score, record.threshold)
        log.info("%-5s  %s (#%d): score %s%s, threshold %s, %.0f ms", record.verdict, name, record.id, score,
                 _raw_note(record), threshold, record.latency_ms)


def _raw_note(record: Record) -> str:
    """`` (min -0.4127)``: the raw value beside a decision score that is not the value itself; else nothing."""
    if record.polarity == "high":
        return ""
    raw = record.raw_score
    return f" ({record.criterion} {numbers.score(raw)})" if raw is not None else ""


def default_ledger(folder: str | os.PathLike | None) -> Path:
    """``<folder>/.edge-inspect/ledger.sqlite`` (hidden: the hot folder skips it), or ``./edge-inspect-ledger.sqlite``."""
    from edge_inspect.config import CAMERA_LEDGER

    return Path(folder) / ".edge-inspect" / "ledger.sqlite" if folder is not None else Path(CAMERA_LEDGER)
