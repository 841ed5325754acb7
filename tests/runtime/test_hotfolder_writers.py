"""A hot folder against writers that pause, folders that vanish, and entries that are not files.

Writers are real processes holding real file descriptors: the hot folder
asks the kernel (a read lease, or /proc) whether any process still has a
file open for writing, so a thread of this process would not be the same
test.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_inspect.errors import ConfigError, SourceError
from edge_inspect.sources import HotFolder
from edge_inspect.sources.writers import WriteCheck, mount_fstype
from tests.runtime.test_hotfolder import Collector
from tests.support.users import run_as_nobody

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


class Writer:
    """A process that writes the first part of a file, holds it open until told, then writes the rest."""

    def __init__(self, path: Path, *, old_mtime: bool = False, link_into: Path | None = None):
        code = textwrap.dedent("""
            import os, sys
            path, rest, old, link = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
            data = bytes(range(256)) * 40
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data[:2138])
            if old:
                os.utime(fd, (1e9, 1e9))
            if link:
                os.link(path, link)
            print("ready", flush=True)
            sys.stdin.readline()
            os.write(fd, data[2138:])
            os.close(fd)
            print("closed", flush=True)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path), "rest", "1" if old_mtime else "0",
                                      str(link_into or "")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def finish(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "closed"
        self.proc.wait(10)


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "incoming"
    path.mkdir()
    return path


def test_the_kernel_tells_a_file_open_for_writing_from_a_closed_one(folder):
    check = WriteCheck(folder)
    assert check.can_tell, f"expected a local file system here, found {check.fstype}"
    writer = Writer(folder / "part.png")
    assert check.busy(folder / "part.png") is True
    writer.finish()
    assert check.busy(folder / "part.png") is False
    # Open for reading only is no writer.
    with open(folder / "part.png", "rb"):
        assert check.busy(folder / "part.png") is False


def test_the_proc_fallback_agrees_with_the_lease(folder):
    check = WriteCheck(folder)
    writer = Writer(folder / "part.png")
    assert check._by_proc(folder / "part.png") is True
    writer.finish()
    assert check._by_proc(folder / "part.png") is False


def test_mount_type_of_a_tmp_folder_is_found(folder):
    assert mount_fstype(folder) is not None


@pytest.mark.parametrize("mode", ["event", "poll"])
def test_an_old_file_still_open_at_start_waits_for_its_writer(folder, mode):
    """A camera writing slowly when the service starts: its mtime is old, yet it is not complete."""
    writer = Writer(folder / "slow.png", old_mtime=True)
    collector = Collector(HotFolder(folder, poll=0.05 if mode == "poll" else None, settle=0.2))
    try:
        time.sleep(1.5)  # several settle times: the old rule would have yielded it at once
        assert collector.names() == [], "a file still open for writing was yielded"
        writer.finish()
        collector.wait_for(lambda: collector.names() == ["slow.png"], "the finished file")
        assert collector.items[0].size == len(PAYLOAD)
    finally:
        collector.stop()


def test_a_file_found_by_the_rescan_waits_while_a_writer_pauses(folder, tmp_path):
    """A hard link raises no event in the folder; the rescan finds it while its writer is paused."""
    writer = Writer(tmp_path / "outside.png", link_into=folder / "linked.png")
    collector = Collector(HotFolder(folder, settle=0.1, rescan=0.2))
    try:
        time.sleep(1.5)  # seven rescans, each longer than the settle time
        assert collector.names() == [], "the rescan yielded a file still open for writing"
        writer.finish()
        collector.wait_for(lambda: collector.names() == ["linked.png"], "the finished file")
        assert collector.items[0].size == len(PAYLOAD)
    finally:
        collector.stop()


def test_a_settle_unsure_below_the_settle_time_is_refused(folder):
    with pytest.raises(ConfigError, match="at least the settle time"):
        HotFolder(folder, settle=5, settle_unsure=1)


@pytest.mark.parametrize("mode", ["event", "poll"])
@pytest.mark.parametrize("how", ["removed", "renamed", "replaced"])
def test_the_folder_removed_renamed_or_replaced_stops_the_source(folder, tmp_path, how, mode):
    collector = Collector(HotFolder(folder, poll=0.05 if mode == "poll" else None))
    try:
        time.sleep(0.3)
        if how == "removed":
            shutil.rmtree(folder)
        elif how == "renamed":
            folder.rename(tmp_path / "moved")
        else:
            folder.rename(tmp_path / "moved")
            folder.mkdir()
        if mode == "poll" and how != "replaced":
            # A share that cannot be listed may come back: polled on, logged once.
            time.sleep(1.0)
            assert collector.error is None
            return
        deadline = time.monotonic() + 10
        while collector.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert isinstance(collector.error, SourceError), collector.error
        assert str(folder) in str(collector.error)
        assert ("replaced" if how == "replaced" else "removed or renamed") in str(collector.error)
    finally:
        collector.stop()


def test_entries_that_are_not_files_are_logged_once_each(folder, tmp_path, caplog):
    (folder / "dir.png").mkdir()
    os.mkfifo(folder / "pipe.jpg")
    (folder / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "good.png").write_bytes(PAYLOAD)
    caplog.set_level(logging.WARNING, logger="edge_inspect.sources.hotfolder")
    collector = Collector(HotFolder(folder, settle=0.1, rescan=0.2))
    try:
        collector.wait_for(lambda: collector.names() == ["good.png"], "the one regular file")
        time.sleep(1.0)  # several rescans: each entry must still be logged once only
    finally:
        collector.stop()
    assert collector.names() == ["good.png"]
    lines = [r.getMessage() for r in caplog.records]
    for name, kind in [("dir.png", "a folder"), ("pipe.jpg", "FIFO"), ("broken.png", "broken symbolic link"),
                       ("loop.png", "cannot be followed")]:
        said = [text for text in lines if f" {name} is " in text]
        assert len(said) == 1, (name, lines)
        assert kind in said[0], said[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the hot folder as another user")
def test_where_writers_cannot_be_seen_a_file_waits_the_longer_settle(folder, tmp_path):
    """As a user who can neither lease root's files nor see root's descriptors, stillness is all there is."""
    folder.chmod(0o777)
    (folder / "quiet.png").write_bytes(PAYLOAD)
    os.utime(folder / "quiet.png", (time.time() - 1.0, time.time() - 1.0))
    code = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from edge_inspect.sources import HotFolder
        hot = HotFolder({str(folder)!r}, settle=0.2, settle_unsure=4.0)
        path = Path({str(folder / 'quiet.png')!r})
        assert hot.writers.busy(path) is None
        start = time.monotonic()
        still = time.time() - os.stat(path).st_mtime
        with hot:
            for item in hot:
                print(item.path.name, round(still, 2), round(time.monotonic() - start, 2), flush=True)
                break
    """)
    out = run_as_nobody(code, env={"HOME": "/nonexistent"}, timeout=60, reach=(folder / "quiet.png",))
    assert out.returncode == 0, out.stderr
    name, still, waited = out.stdout.split()
    # The file had been still for about 1 s when the watcher started (more if the process was slow to start): it
    # must wait for the rest of the 4 s of stillness, and not much longer.
    rest = 4.0 - float(still)
    assert float(still) < 3.5, f"the watcher started too late to tell: {out.stdout}"
    assert name == "quiet.png" and rest - 0.3 <= float(waited) <= rest + 1.0, out.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_service_user_with_cap_lease_alone_tells_a_paused_writer_from_a_finished_file(folder):
    """As the systemd unit runs it: another user, no capability but CAP_LEASE, files of the camera's user."""
    from tests.support.users import traversable

    writer = Writer(folder / "open.png")
    (folder / "done.png").write_bytes(PAYLOAD)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from edge_inspect.sources.writers import WriteCheck
        check = WriteCheck({str(folder)!r})
        print(check.busy(Path({str(folder / 'open.png')!r})), check.busy(Path({str(folder / 'done.png')!r})))
    """)
    root = Path(__file__).resolve().parents[2]
    try:
        with traversable(sys.executable, root / "edge_inspect", folder / "x"):
            out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                  "--inh-caps=-all,+lease", "--ambient-caps=+lease", "--bounding-set=-all,+lease",
                                  sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    finally:
        writer.finish()
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr
