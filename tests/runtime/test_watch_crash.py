"""Crashes, restarts and signals: `edge-inspect watch` as a real process, killed and signalled for real.

The watcher's readiness and shutdown are observed through a real sd_notify
socket (an abstract AF_UNIX datagram socket passed as NOTIFY_SOCKET), the
verdicts through its SQLite ledger.
"""

import collections
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_inspect.inspector import Inspector
from edge_inspect.ledger import Ledger
from edge_inspect.sinks import JsonlSink, SortSink
from edge_inspect.sinks.jsonl import line
from edge_inspect.sources import HotFolder
from edge_inspect.watch import Watcher
from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.runtime.test_sinks import committed
from tests.runtime.test_watch import WAIT_S, count, rows, wait_for
from tests.support import write_parts

ROOT = Path(__file__).resolve().parents[2]


class NotifySocket:
    """What systemd would hear: a datagram socket in the abstract namespace, drained on a thread
    (as systemd does: a socket left unread fills up and blocks the sender)."""

    def __init__(self):
        self.address = f"@edge-inspect-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.messages: list[str] = []
        self._heard = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:  # closed
                return
            if not data:  # shut down
                return
            message = data.decode()
            with self._heard:
                self.messages.append(message)
                self._heard.notify_all()

    def wait_for(self, text: str, timeout: float = WAIT_S) -> None:
        with self._heard:
            if not self._heard.wait_for(lambda: any(text in m for m in self.messages), timeout):
                raise AssertionError(f"no {text!r} from the watcher; heard {self.messages[-5:]}")

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_watcher_left_behind():
    """A failing test must not leave a watcher running."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


class Watch:
    """`python -m edge_inspect.cli watch ...` as a child process, with its own notify socket."""

    def __init__(self, *args, log: Path):
        self.notify = NotifySocket()
        self.log = log
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.address, "COLUMNS": "200"}
        with open(log, "a") as out:  # a file, not a pipe: a full pipe would block the watcher's logging
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_inspect.cli", "watch", *map(str, args)],
                                         cwd=ROOT, env=env, stdout=out, stderr=out)
        _started.append(self.proc)
        try:
            self.notify.wait_for("READY=1")
        except AssertionError:
            self.proc.kill()
            raise AssertionError(f"the watcher never got ready: {log.read_text()[-3000:]}") from None

    def finish(self, signum=signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(signum)
        self.proc.wait(timeout=WAIT_S)
        self.notify.close()
        return self.proc.returncode, self.log.read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT_S)
        self.notify.close()


def feed(staging: Path, folder: Path, pause: float = 0.005) -> threading.Thread:
    """Rename the staged files into the watched folder one by one, on a thread."""
    def run():
        for path in sorted(staging.iterdir()):
            os.replace(path, folder / path.name)
            time.sleep(pause)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def check_consistent(folder: Path, names: list[str], results: Path | None, sort: bool) -> list[dict]:
    """Every file exactly one verdict; sort folders and JSONL agree with the ledger."""
    got = rows(folder / ".edge-inspect" / "ledger.sqlite")
    per_file = collections.Counter(Path(r["source"]).name for r in got)
    assert sorted(per_file) == sorted(names), "a file without a verdict, or a verdict for no file"
    assert set(per_file.values()) == {1}, f"files with several verdicts: {[n for n, c in per_file.items() if c > 1]}"
    assert all(r["sinks_pending"] == "" for r in got)
    if sort:
        assert not any(p.is_file() for p in folder.iterdir()), "files left unsorted"
        for r in got:
            assert Path(r["sorted_path"]).parent == folder / r["verdict"] and Path(r["sorted_path"]).is_file()
        on_disk = sorted(str(p) for v in ("ok", "ng", "error") for p in (folder / v).iterdir())
        assert on_disk == sorted(r["sorted_path"] for r in got)
    if results is not None:
        ids = [json.loads(text)["id"] for text in results.read_text().splitlines()]
        assert collections.Counter(ids) == collections.Counter(r["id"] for r in got), "JSONL and ledger disagree"
    return got


def staged(tmp_path: Path, n: int, seed: int):
    """An empty hot folder ``in/``, ``n`` parts waiting in ``staging/``, their names, and a results path."""
    folder, staging = tmp_path / "in", tmp_path / "staging"
    folder.mkdir()
    write_parts(staging, n, size=32, seed=seed)
    return folder, staging, sorted(p.name for p in staging.iterdir()), tmp_path / "verdicts.jsonl"


@pytest.mark.parametrize("sinks", [False, True], ids=["ledger-only", "sort-and-results"])
def test_kill_9_mid_burst_then_restart_gives_exactly_one_verdict_per_file(model_dir, tmp_path, sinks):  # noqa: F811
    folder, staging, names, results = staged(tmp_path, 200, seed=30)
    args = [folder, "--model", model_dir, "--settle", "0.3", "--batch-size", "4"]
    args += ["--sort", "--results", results] if sinks else []
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"

    first = Watch(*args, log=tmp_path / "first.log")
    writer = feed(staging, folder)
    wait_for(lambda: count(ledger_path) >= 25, what="25 verdicts")
    first.kill()
    at_kill = count(ledger_path)
    writer.join(WAIT_S)
    assert at_kill < len(names), "the burst was over before the kill"

    second = Watch(*args, log=tmp_path / "second.log")
    wait_for(lambda: count(ledger_path) >= len(names), what="every file's verdict")
    if sinks:
        wait_for(lambda: not any(p.is_file() for p in folder.iterdir()), what="the sort")
    code, err = second.finish()
    assert code == 0, err
    check_consistent(folder, names, results if sinks else None, sinks)


def test_restart_after_a_crash_between_commit_and_sinks(model_dir, tmp_path):  # noqa: F811
    """The state a crash leaves, built from its parts: committed rows whose sinks did not all run."""
    folder = tmp_path / "in"
    write_parts(folder, 3, size=32, seed=31)
    waiting, sunk, in_hand = sorted(folder.iterdir())
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    results = tmp_path / "verdicts.jsonl"
    with Ledger.open(ledger_path) as ledger:
        # Committed; the crash came before the move.
        a = committed(ledger, waiting, "ok", sinks="jsonl sort")
        # Committed, moved and its line written; the crash came before the ledger heard of it.
        b = committed(ledger, sunk, "ng", sinks="jsonl sort")
        (folder / "ng").mkdir()
        os.replace(sunk, folder / "ng" / sunk.name)
        results.write_bytes(line(b))
        # `in_hand` was being inspected: no row.
        inspector = Inspector.load(model_dir)
        sort = SortSink(folder)
        with HotFolder(folder, settle=0.0, exclude=sort.folders) as source:
            watcher = Watcher(source, inspector, ledger, sinks=[sort, JsonlSink(results)])
            thread = threading.Thread(target=watcher.run, daemon=True)
            thread.start()
            wait_for(lambda: count(ledger_path) == 3 and not any(p.is_file() for p in folder.iterdir()),
                     what="the replay and the new verdict")
            watcher.stop()
            thread.join(WAIT_S)
    got = check_consistent(folder, [waiting.name, sunk.name, in_hand.name], results, sort=True)
    assert [r["id"] for r in got[:2]] == [a.id, b.id]  # no new verdict for the committed two
    assert got[0]["sorted_path"] == str(folder / "ok" / waiting.name)
    assert got[1]["sorted_path"] == str(folder / "ng" / sunk.name)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_parts_in_hand_and_exits_0(model_dir, tmp_path, signum):  # noqa: F811
    folder, staging, names, results = staged(tmp_path, 60, seed=32)
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    watch = Watch(folder, "--model", model_dir, "--settle", "0.2", "--sort", "--results", results,
                  log=tmp_path / "watch.log")
    for name in names:
        os.replace(staging / name, folder / name)
    wait_for(lambda: count(ledger_path) >= 1, what="the first verdict")
    watch.proc.send_signal(signum)
    assert watch.proc.wait(timeout=WAIT_S) == 0, watch.log.read_text()
    watch.notify.wait_for("STOPPING=1")
    heard = watch.notify.messages
    assert heard[0].startswith("READY=1") and "WATCHDOG=1" in heard and heard.count("STOPPING=1") == 1
    watch.notify.close()
    got = rows(ledger_path)
    left = sorted(p.name for p in folder.iterdir() if p.is_file())
    # Nothing lost, nothing half done: each file is either sorted with its verdict, or untouched in the folder.
    assert sorted([Path(r["source"]).name for r in got] + left) == names
    inspected = check_consistent(folder, [Path(r["source"]).name for r in got], results, sort=False)
    for r in inspected:
        assert Path(r["sorted_path"]).parent == folder / r["verdict"]
    counts = collections.Counter(r["verdict"] for r in got)
    assert f"{counts['ok']} ok, {counts['ng']} ng, {counts['error']} error" in watch.log.read_text()  # the summary
    with sqlite3.connect(ledger_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
