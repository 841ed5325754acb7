"""The hot folder on a real filesystem, with real writer threads, in event (inotify) and poll mode.

Waits poll for a condition with generous deadlines, so that a loaded
machine slows the tests down without failing them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edge_inspect.errors import ConfigError, SourceError
from edge_inspect.sources import FileItem, HotFolder

DEADLINE_S = 60.0
MODES = {
    "event": dict(poll=None, settle=0.5),
    # Poll pauses of the slow writer (0.1 s) stay well below `settle`.
    "poll": dict(poll=0.05, settle=1.5),
}


class Collector:
    """Iterates a hot folder on a thread of its own, recording what it yields and when.

    Enters the hot folder's context first, as the watch pipeline does: in
    event mode, watching starts there, before the collector thread runs.
    """

    def __init__(self, hot: HotFolder):
        self.hot = hot.__enter__()
        self.items: list[FileItem] = []
        self.received: dict[Path, list[float]] = {}
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for item in self.hot:
                with self._lock:
                    self.items.append(item)
                    self.received.setdefault(item.path, []).append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001  (the test asserts on it)
            self.error = exc

    def names(self) -> list[str]:
        with self._lock:
            return [i.path.relative_to(self.hot.folder).as_posix() for i in self.items]

    def wait_for(self, predicate, what: str, deadline: float = DEADLINE_S):
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if predicate():
                return
            if self.error is not None:
                raise AssertionError(f"the hot folder failed while waiting for {what}") from self.error
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; yielded so far: {self.names()}")

    def stop(self):
        self.hot.stop()
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive(), "the iterator did not return after stop()"
        self.hot.__exit__(None, None, None)


@pytest.fixture
def watched(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    collectors = []

    def start(**kwargs) -> Collector:
        collector = Collector(HotFolder(folder, **kwargs))
        collectors.append(collector)
        return collector

    yield folder, start
    for collector in collectors:
        collector.stop()


def _write_slowly(path: Path, chunks: int, pause: float, done: dict):
    with open(path, "wb") as f:
        for k in range(chunks):
            f.write(bytes([k]) * 4096)
            f.flush()
            if k == chunks - 1:
                # Just before the close: the close event may reach the collector before this thread runs again.
                done["last_written_at"] = time.monotonic()
            time.sleep(pause)


def _wait_started(collector: Collector):
    """Give the hot folder a file, to prove it is watching."""
    probe = collector.hot.folder / "probe.bin"
    probe.write_bytes(b"probe")
    collector.wait_for(lambda: "probe.bin" in collector.names(), "the start probe")


@pytest.mark.parametrize("mode", MODES)
def test_a_file_written_slowly_in_chunks_is_yielded_once_complete(watched, mode):
    folder, start = watched
    collector = start(**MODES[mode])
    _wait_started(collector)
    target, done = folder / "slow.png", {}
    writer = threading.Thread(target=_write_slowly, args=(target, 12, 0.1, done))
    writer.start()
    writer.join(DEADLINE_S)
    collector.wait_for(lambda: target in collector.received, "the slow file")
    # One more file after it: once that one is through, a late duplicate would be too.
    (folder / "after.png").write_bytes(b"after")
    collector.wait_for(lambda: "after.png" in collector.names(), "the file after")

    assert collector.names().count("slow.png") == 1
    item = next(i for i in collector.items if i.path == target)
    assert item.size == 12 * 4096 == target.stat().st_size
    assert item.mtime_ns == target.stat().st_mtime_ns
    assert collector.received[target][0] >= done["last_written_at"]


@pytest.mark.parametrize("mode", MODES)
def test_rename_into_place_yields_once_and_partial_hidden_excluded_names_never(watched, mode):
    folder, start = watched
    (folder / "ok").mkdir()
    os.mkfifo(folder / "pipe.png")  # not a regular file: never yielded (reading it would block)
    collector = start(**MODES[mode], exclude=["ok"])
    _wait_started(collector)

    with open(folder / "x.tmp", "wb") as f:
        f.write(b"x" * 1000)
    os.rename(folder / "x.tmp", folder / "x.png")
    for name in ("y.png.part", "z.tmp", ".hidden.png", "w.crdownload", "v.png~", "ok/sorted.png"):
        (folder / name).write_bytes(b"never")
    outside = folder.parent / "staged.png"
    outside.write_bytes(b"moved in from another folder")
    os.rename(outside, folder / "staged.png")
    (folder / "last.png").write_bytes(b"last")
    collector.wait_for(lambda: "last.png" in collector.names(), "the last file")

    names = collector.names()
    assert sorted(names) == ["last.png", "probe.bin", "staged.png", "x.png"]
    x = next(i for i in collector.items if i.path.name == "x.png")
    assert (x.size, x.path) == (1000, folder / "x.png")


@pytest.mark.parametrize("mode", MODES)
def test_a_burst_of_files_is_yielded_completely(watched, mode):
    folder, start = watched
    kwargs = dict(MODES[mode], settle=0.2) if mode == "poll" else MODES[mode]
    collector = start(**kwargs)
    _wait_started(collector)
    expected = {f"part-{k:04d}.png" for k in range(300)}

    def burst():
        for name in sorted(expected):
            (folder / name).write_bytes(name.encode() * 50)

    writer = threading.Thread(target=burst)
    writer.start()
    writer.join(DEADLINE_S)
    collector.wait_for(lambda: expected <= set(collector.names()), "all 300 files")
    assert set(collector.names()) == expected | {"probe.bin"}
    for item in collector.items:
        assert item.size == item.path.stat().st_size


def _backlog(folder: Path) -> list[str]:
    """Files with mtimes out of name order; the two 'b' and 'a' share theirs."""
    now = time.time()
    ages = {"c.png": 300, "b.png": 200, "a.png": 200, "d.bin": 100}
    for name, age in ages.items():
        (folder / name).write_bytes(name.encode())
        os.utime(folder / name, (now - age, now - age))
    return ["c.png", "a.png", "b.png", "d.bin"]


@pytest.mark.parametrize("mode", MODES)
def test_backlog_is_yielded_first_oldest_first_ties_by_name(watched, mode):
    folder, start = watched
    expected = _backlog(folder)
    collector = start(**dict(MODES[mode], settle=0.1))
    collector.wait_for(lambda: len(collector.names()) >= 4, "the backlog")
    (folder / "new.png").write_bytes(b"new")
    collector.wait_for(lambda: "new.png" in collector.names(), "the new file")
    assert collector.names() == [*expected, "new.png"]


@pytest.mark.parametrize("mode", MODES)
def test_without_backlog_only_new_files_are_yielded(watched, mode):
    folder, start = watched
    _backlog(folder)
    collector = start(**dict(MODES[mode], settle=0.1), backlog=False)
    if mode == "event":
        _wait_started(collector)
    else:
        time.sleep(0.5)  # a few scans see the old files first
    (folder / "new.png").write_bytes(b"new")
    collector.wait_for(lambda: "new.png" in collector.names(), "the new file")
    (folder / "a.png").write_bytes(b"rewritten")  # an old file rewritten counts as new
    collector.wait_for(lambda: "a.png" in collector.names(), "the rewritten file")
    assert set(collector.names()) - {"probe.bin"} == {"new.png", "a.png"}


def test_event_mode_yields_a_file_written_just_before_the_start(watched):
    """No close event will come for it: it is yielded once it has held still for `settle`."""
    folder, start = watched
    (folder / "just-now.png").write_bytes(b"written a moment before the service started")
    collector = start(poll=None, settle=0.3)
    collector.wait_for(lambda: "just-now.png" in collector.names(), "the recent backlog file")
    assert collector.names() == ["just-now.png"]


def test_recursive_watch_skips_excluded_and_hidden_folders(watched):
    folder, start = watched
    for sub in ("lineA", "ok", ".edge-inspect", "lineA/ng"):
        (folder / sub).mkdir()
    (folder / "lineA" / "old.png").write_bytes(b"old")
    os.utime(folder / "lineA" / "old.png", (time.time() - 60, time.time() - 60))
    collector = start(poll=None, settle=0.1, recursive=True, exclude=[folder / "ok", "lineA/ng"])
    collector.wait_for(lambda: "lineA/old.png" in collector.names(), "the backlog in a sub-folder")
    (folder / "lineA" / "new.png").write_bytes(b"new")
    (folder / "ok" / "sorted.png").write_bytes(b"sorted")
    (folder / "lineA" / "ng" / "sorted.png").write_bytes(b"sorted")
    (folder / ".edge-inspect" / "ledger.sqlite").write_bytes(b"state")
    os.rename(folder / "lineA" / "old.png", folder / "ok" / "old.png")  # sorted away: no new arrival
    (folder / "last.png").write_bytes(b"last")
    collector.wait_for(lambda: "last.png" in collector.names(), "the last file")
    assert sorted(collector.names()) == ["last.png", "lineA/new.png", "lineA/old.png"]


@pytest.mark.parametrize("mode", MODES)
def test_stop_from_another_thread_ends_the_iteration(watched, mode):
    folder, start = watched
    collector = start(**MODES[mode])
    if mode == "event":
        _wait_started(collector)
    collector.stop()  # joins with a deadline and asserts the thread ended
    assert collector.error is None


def test_stop_from_a_signal_handler_ends_iteration_on_the_main_thread(tmp_path):
    hot = HotFolder(tmp_path)
    previous = signal.signal(signal.SIGALRM, lambda *_: hot.stop())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        items = list(hot)  # blocks until the handler stops it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert items == []


def test_context_manager_joins_the_observer_thread(tmp_path):
    def watchdog_threads():
        return [t for t in threading.enumerate() if type(t).__module__.startswith("watchdog") and t.is_alive()]

    before = set(watchdog_threads())
    with HotFolder(tmp_path) as hot:
        assert set(watchdog_threads()) - before  # watching from the start of the block
        (tmp_path / "a.png").write_bytes(b"a")
        first = next(iter(hot))
    assert first.path == tmp_path / "a.png"
    assert set(watchdog_threads()) - before == set()


def test_the_folder_removed_while_watched_raises_source_error(watched):
    folder, start = watched
    collector = start(poll=None)
    _wait_started(collector)
    (folder / "probe.bin").unlink()
    folder.rmdir()
    collector.wait_for(lambda: collector.error is not None, "the error")
    assert isinstance(collector.error, SourceError)
    assert "removed" in str(collector.error)


def test_a_missing_folder_or_a_file_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        HotFolder(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(SourceError, match="is a file, not a folder"):
        HotFolder(tmp_path / "file.png", poll=1.0)


# ---------------------------------------------------------------- safety rescan (event mode)


def _link_in(folder: Path, name: str, content: bytes) -> Path:
    """Make ``folder/name`` appear through a hard link, which raises no close or move event.

    The file is written in a sibling folder (the same filesystem), outside the watch.
    """
    staging = folder.parent / "staging"
    staging.mkdir(exist_ok=True)
    source = staging / f"{name.replace('/', '_')}-{time.monotonic_ns()}"
    source.write_bytes(content)
    os.link(source, folder / name)
    return folder / name


def test_the_rescan_yields_a_hard_linked_file_but_never_ignored_or_excluded_ones(watched):
    folder, start = watched
    (folder / "ok").mkdir()
    collector = start(poll=None, settle=0.2, rescan=0.3, exclude=["ok"])
    _wait_started(collector)
    _link_in(folder, ".hidden.png", b"never")
    _link_in(folder, "y.png.part", b"never")
    _link_in(folder, "ok/sorted.png", b"never")
    linked = _link_in(folder, "linked.png", b"L" * 321)
    collector.wait_for(lambda: "linked.png" in collector.names(), "the hard-linked file")
    _link_in(folder, "second.png", b"second")  # once the next rescan is through, a late duplicate would be too
    collector.wait_for(lambda: "second.png" in collector.names(), "the second hard-linked file")

    assert sorted(collector.names()) == ["linked.png", "probe.bin", "second.png"]
    item = next(i for i in collector.items if i.path == linked)
    assert (item.size, item.mtime_ns) == (321, linked.stat().st_mtime_ns)


def test_the_rescan_does_not_yield_again_a_file_an_event_yielded(watched):
    folder, start = watched
    collector = start(poll=None, settle=0.2, rescan=0.3)
    _wait_started(collector)
    (folder / "a.png").write_bytes(b"a" * 100)
    collector.wait_for(lambda: "a.png" in collector.names(), "the file written in place")
    # Each hard-linked file proves that a rescan ran after a.png was yielded.
    for k in range(3):
        _link_in(folder, f"marker-{k}.png", b"marker")
        collector.wait_for(lambda k=k: f"marker-{k}.png" in collector.names(), f"marker {k}")
    assert collector.names().count("a.png") == 1
    assert collector.names().count("probe.bin") == 1


def test_the_rescan_yields_again_a_file_changed_without_an_event(watched):
    folder, start = watched
    collector = start(poll=None, settle=0.2, rescan=0.3)
    _wait_started(collector)
    target = folder / "a.png"
    target.write_bytes(b"first")
    collector.wait_for(lambda: "a.png" in collector.names(), "the first version")

    target.unlink()  # replaced by another file under the same name, through a hard link
    _link_in(folder, "a.png", b"the second version, longer")
    collector.wait_for(lambda: collector.names().count("a.png") == 2, "the second version")
    later = target.stat().st_mtime_ns + 5_000_000_000
    os.utime(target, ns=(later, later))  # only the mtime changes: still a change (no event for it)
    collector.wait_for(lambda: collector.names().count("a.png") == 3, "the touched file")

    versions = [(i.size, i.mtime_ns) for i in collector.items if i.path == target]
    assert [size for size, _ in versions] == [5, 26, 26]
    assert versions[2][1] == later != versions[1][1]


def test_without_rescan_a_hard_linked_file_is_not_yielded(watched):
    folder, start = watched
    collector = start(poll=None, settle=0.1, rescan=None)
    _wait_started(collector)
    _link_in(folder, "linked.png", b"no event for me")
    end = time.monotonic() + 1.5
    while time.monotonic() < end and "linked.png" not in collector.names():
        time.sleep(0.05)
    (folder / "after.png").write_bytes(b"after")  # still watching
    collector.wait_for(lambda: "after.png" in collector.names(), "the file after")
    assert sorted(collector.names()) == ["after.png", "probe.bin"]


def test_the_rescan_without_backlog_leaves_the_files_there_at_start(watched):
    folder, start = watched
    _backlog(folder)
    collector = start(poll=None, settle=0.1, backlog=False, rescan=0.3)
    _wait_started(collector)
    _link_in(folder, "linked.png", b"new")
    collector.wait_for(lambda: "linked.png" in collector.names(), "the hard-linked file")
    _link_in(folder, "second.png", b"new")
    collector.wait_for(lambda: "second.png" in collector.names(), "the second hard-linked file")
    assert sorted(collector.names()) == ["linked.png", "probe.bin", "second.png"]


def test_rescan_must_be_positive_or_none(tmp_path):
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="rescan interval"):
            HotFolder(tmp_path, rescan=bad)


_CHILD = textwrap.dedent("""
    import logging, signal, sys
    from edge_inspect.sources import HotFolder

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    hot = HotFolder(sys.argv[1], settle=0.1, rescan=3600)  # no periodic rescan within the test
    signal.signal(signal.SIGTERM, lambda *_: hot.stop())
    with hot:
        for item in hot:
            print(item.path.name, flush=True)
""")


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1].startswith(("T", "t"))


def test_an_inotify_queue_overflow_rescans_at_once_and_warns_once(tmp_path):
    """A real overflow: the watching process is stopped (SIGSTOP) while more
    close events than the kernel queues arrive, then a file whose own event
    is dropped. Once it runs again, the overflow's rescan finds that file."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    out_path, err_path = tmp_path / "yielded.txt", tmp_path / "log.txt"
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    with open(out_path, "w") as out, open(err_path, "w") as err:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(folder)], stdout=out, stderr=err)

    def names() -> list[str]:
        return out_path.read_text().split()

    def wait_for(predicate, what):
        end = time.monotonic() + DEADLINE_S
        while not predicate():
            assert child.poll() is None, f"the watching process ended: {err_path.read_text()}"
            assert time.monotonic() < end, f"timed out waiting for {what}; log: {err_path.read_text()}"
            time.sleep(0.02)

    try:
        # The watch starts before the backlog scan: yielded either way, the probe proves it watches.
        (folder / "probe.bin").write_bytes(b"probe")
        wait_for(lambda: "probe.bin" in names(), "the start probe")
        os.kill(child.pid, signal.SIGSTOP)
        wait_for(lambda: _stopped(child.pid), "the watching process to stop")
        flood = [folder / ".flood-a", folder / ".flood-b"]  # alternating names: the kernel merges no two
        for k in range(queued + 1000):
            os.close(os.open(flood[k % 2], os.O_WRONLY | os.O_CREAT))
        (folder / "lost.png").write_bytes(b"its close event finds the queue full")
        os.kill(child.pid, signal.SIGCONT)
        wait_for(lambda: "lost.png" in names(), "the file whose event was dropped")
        (folder / "after.png").write_bytes(b"after")
        wait_for(lambda: "after.png" in names(), "the file after")
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.terminate()
        child.wait(DEADLINE_S)

    assert child.returncode == 0, err_path.read_text()
    assert names() == ["probe.bin", "lost.png", "after.png"]
    log_lines = err_path.read_text().splitlines()
    warnings = [line for line in log_lines if line.startswith("WARNING edge_inspect") and "overflow" in line]
    assert len(warnings) == 1, log_lines


# ------------------------------------------------------------------ sub-folders


@pytest.mark.parametrize("mode", MODES)
def test_recursive_yields_sub_folders_created_after_the_start_at_any_depth(watched, tmp_path, mode):
    """No rescan in event mode: the new folders' own watches (and their settled contents) find every file."""
    folder, start = watched
    (folder / "old").mkdir()
    (folder / "old" / "backlog.png").write_bytes(b"backlog")
    collector = start(**MODES[mode], recursive=True, rescan=None)
    collector.wait_for(lambda: "old/backlog.png" in collector.names(), "the backlog in a sub-folder")
    _wait_started(collector)
    (folder / "lineA").mkdir()
    (folder / "lineA" / "first.png").write_bytes(b"written at once, perhaps before the folder is watched")
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / "deep" / "er" / "nested.png").write_bytes(b"two levels down")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "moved.png").write_bytes(b"moved in")
    collector.wait_for(lambda: {"lineA/first.png", "deep/er/nested.png"} <= set(collector.names()), "the new folders")
    os.replace(staging / "moved.png", folder / "deep" / "er" / "moved.png")
    (folder / "lineA" / "later.png").write_bytes(b"later")
    (folder / "old" / "again.png").write_bytes(b"again")
    collector.wait_for(lambda: {"deep/er/moved.png", "lineA/later.png", "old/again.png"} <= set(collector.names()),
                       "the files after the new folders")
    time.sleep(0.3 if mode == "event" else 2.0)  # a second yield of any file would have come by now
    assert sorted(collector.names()) == sorted(["old/backlog.png", "probe.bin", "lineA/first.png", "deep/er/nested.png",
                                                "deep/er/moved.png", "lineA/later.png", "old/again.png"])


@pytest.mark.parametrize("mode", MODES)
def test_without_recursive_each_sub_folder_of_images_is_named_once(watched, mode, caplog):
    folder, start = watched
    (folder / "lineA").mkdir()
    (folder / "lineA" / "part.jpeg").write_bytes(b"not inspected")
    for quiet in ("ok", ".edge-inspect", "notes"):  # excluded, hidden, no images: nothing to say
        (folder / quiet).mkdir()
        (folder / quiet / ("readme.txt" if quiet == "notes" else "part.png")).write_bytes(b"x")
    (folder / "top.png").write_bytes(b"top")
    with caplog.at_level("WARNING", logger="edge_inspect.sources.hotfolder"):
        collector = start(**MODES[mode], rescan=0.2, exclude=[folder / "ok"])
        collector.wait_for(lambda: "top.png" in collector.names(), "the backlog")
        collector.wait_for(lambda: "lineA" in caplog.text, "the warning at start")
        (folder / "lineA" / "more.png").write_bytes(b"more")
        (folder / "lineB" / "deeper").mkdir(parents=True)
        (folder / "lineB" / "deeper" / "part.tif").write_bytes(b"two levels down")
        collector.wait_for(lambda: "lineB" in caplog.text, "the warning for a sub-folder made later")
        time.sleep(1.0)  # several rescans or polls
        (folder / "last.png").write_bytes(b"last")
        collector.wait_for(lambda: "last.png" in collector.names(), "the last file")
    warnings = [r.getMessage() for r in caplog.records if "holds image files" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert warnings[0] == (f"Hot folder {folder}: its sub-folder lineA holds image files (part.jpeg, perhaps more) "
                           "that are not inspected: only the files directly in the folder are. To inspect "
                           "sub-folders too, watch with --recursive, or set recursive = true in the source's "
                           f"configuration; or move the images into {folder}.")
    assert "sub-folder lineB holds image files (deeper/part.tif" in warnings[1]
    assert sorted(collector.names()) == ["last.png", "top.png"]


def test_without_recursive_a_sub_folder_moved_in_is_named_at_once(watched, tmp_path, caplog):
    folder, start = watched
    staging = tmp_path / "batch"
    staging.mkdir()
    (staging / "part.png").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="edge_inspect.sources.hotfolder"):
        collector = start(poll=None, settle=0.1, rescan=None)
        _wait_started(collector)
        os.rename(staging, folder / "batch")
        collector.wait_for(lambda: "sub-folder batch holds image files" in caplog.text, "the warning")
