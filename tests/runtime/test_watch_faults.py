"""The watcher under faults found by trying it as an adversary: odd names, failing sinks, signals early.

Each test reproduces a failure that broke the promise (one verdict per part,
nothing lost) and asserts the promise itself, on real files, real processes
and real signals.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_inspect.ledger import Ledger
from edge_inspect.sinks import HeatmapSink, JsonlSink, SortSink
from edge_inspect.sources import HotFolder
from edge_inspect.watch import Watcher
from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.runtime.test_watch import WAIT_S, Running, count, inspector, rows, wait_for  # noqa: F401
from tests.runtime.test_watch_crash import NotifySocket
from tests.support import DEFECTS, make_part
from tests.support.mounts import tmpfs

ROOT = Path(__file__).resolve().parents[2]


def _png(seed: int, defect: str | None = None) -> bytes:
    import cv2
    import numpy as np

    ok, data = cv2.imencode(".png", make_part(np.random.default_rng(seed), 32, defect=defect)[0])
    assert ok
    return data.tobytes()


def _drop(folder: Path, name: bytes, data: bytes) -> Path:
    """Write a part under a temporary name and rename it in, by the bytes of its name."""
    staging = os.path.join(os.fsencode(folder.parent), b"staging-" + os.urandom(4).hex().encode())
    with open(staging, "wb") as handle:
        handle.write(data)
    target = os.path.join(os.fsencode(folder), name)
    os.replace(staging, target)
    return Path(os.fsdecode(target))


def test_a_name_that_is_not_utf8_gets_one_verdict_through_every_sink(inspector, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="edge_inspect.watch")
    folder = tmp_path / "in"
    folder.mkdir()
    results = tmp_path / "verdicts.jsonl"
    names = [b"bad\xff\xfe.png", b"caf\xe9.png", b"ok-\xc3\xa9.png", b"new\nline.png"]
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    for run in range(2):  # the second run must add nothing: identities found again
        with Ledger.open(ledger_path) as ledger, HotFolder(folder, settle=0.0) as source:
            sinks = [SortSink(folder), HeatmapSink(tmp_path / "maps"), JsonlSink(results)]
            running = Running(Watcher(source, inspector, ledger, sinks=sinks))
            if run == 0:
                for k, name in enumerate(names):
                    _drop(folder, name, _png(k, DEFECTS[0] if k % 2 else None))
            wait_for(lambda: count(ledger_path) == len(names), what="a verdict per name")
            wait_for(lambda: all(not r["sinks_pending"] for r in rows(ledger_path)), what="the sinks")
            running.stop()
    got = rows(ledger_path)
    assert len(got) == len(names)
    raw = {bytes(r["source_raw"]) if r["source_raw"] is not None else os.fsencode(r["source"]) for r in got}
    assert raw == {os.path.join(os.fsencode(folder), n) for n in names}
    assert {r["verdict"] for r in got} <= {"ok", "ng"}, [r["error"] for r in got]
    by_source = {r["source"]: r for r in got}
    bad = by_source[str(folder) + "/bad\\xff\\xfe.png"]
    assert bad["sorted_path"] == str(folder / bad["verdict"] / "bad%FF%FE.png")
    assert Path(bad["sorted_path"]).read_bytes() == _png(0)
    assert sorted(os.listdir(os.fsencode(folder))) == sorted([b".edge-inspect", b"error", b"ng", b"ok"])
    lines = [json.loads(text) for text in results.read_text(encoding="utf-8").splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(r["id"] for r in got)
    for r in got:
        if r["verdict"] == "ng":
            assert Path(r["heatmap"]).is_file()
    verdict_lines = [r.getMessage() for r in caplog.records if "(#" in r.getMessage()]
    assert len(verdict_lines) == len(names) and not any("\n" in m for m in verdict_lines), verdict_lines
    assert any("new\\nline.png" in m for m in verdict_lines)  # the newline shown escaped, not forging a line


def test_a_failed_sink_is_retried_while_running_and_its_outage_logged_once(inspector, tmp_path, caplog):  # noqa: F811
    """The heatmap folder replaced by a file: overlays fail; once it is back they are written, no restart."""
    folder, maps = tmp_path / "in", tmp_path / "maps"
    folder.mkdir()
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    caplog.set_level(logging.INFO, logger="edge_inspect.watch")
    with Ledger.open(ledger_path) as ledger, HotFolder(folder, settle=0.0) as source:
        sink = HeatmapSink(maps)
        maps.rmdir()
        maps.write_bytes(b"not a folder")
        running = Running(Watcher(source, inspector, ledger, sinks=[sink]))
        for k in range(3):
            _drop(folder, f"part-{k}.png".encode(), _png(40 + k, DEFECTS[k % len(DEFECTS)]))
        wait_for(lambda: count(ledger_path) == 3, what="three verdicts")
        ng = [r for r in rows(ledger_path) if r["verdict"] == "ng"]
        assert ng, "the defective parts must be ng for this test"
        wait_for(lambda: all(r["sink_error"] for r in rows(ledger_path) if r["verdict"] == "ng"),
                 what="the cause recorded")
        assert all("heatmaps: cannot write the overlay" in r["sink_error"] for r in rows(ledger_path)
                   if r["verdict"] == "ng")
        time.sleep(3.5)  # several retries: 1 s, 2 s...
        maps.unlink()
        maps.mkdir()
        wait_for(lambda: not any(r["sinks_pending"] for r in rows(ledger_path)), timeout=30,
                 what="the retry while running")
        running.stop()
    got = rows(ledger_path)
    assert all(r["sink_error"] is None for r in got)
    assert sorted(os.listdir(maps)) == sorted(Path(r["heatmap"]).name for r in got if r["verdict"] == "ng")
    said = [r.getMessage() for r in caplog.records if "Sink heatmaps" in r.getMessage()]
    assert len([m for m in said if m.startswith("Sink heatmaps failed")]) == 1, said
    assert len([m for m in said if "works again" in m]) == 1, said


def test_relative_sink_folders_are_recorded_absolute_and_replay_from_elsewhere(inspector, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    monkeypatch.chdir(tmp_path)
    with Ledger.open(ledger_path) as ledger, HotFolder("in", settle=0.0) as source:
        running = Running(Watcher(source, inspector, ledger, sinks=[SortSink("in"), HeatmapSink("maps")]))
        _drop(folder, b"part.png", _png(7, DEFECTS[1]))
        wait_for(lambda: count(ledger_path) == 1 and not rows(ledger_path)[0]["sinks_pending"], what="the sinks")
        running.stop()
    (row,) = rows(ledger_path)
    assert Path(row["source"]).is_absolute() and Path(row["sorted_path"]).is_absolute()
    if row["verdict"] == "ng":
        assert Path(row["heatmap"]).is_absolute()
        # The overlay lost: a replay started from another folder finds the part and writes it again.
        Path(row["heatmap"]).unlink()
        with Ledger.open(ledger_path) as ledger:
            ledger.finish_sinks({row["id"]: {"sinks_pending": "heatmaps", "heatmap": None}})
        monkeypatch.chdir("/")
        with Ledger.open(ledger_path) as ledger, HotFolder(folder, settle=0.0) as source:
            running = Running(Watcher(source, inspector, ledger, sinks=[HeatmapSink(tmp_path / "maps")]))
            wait_for(lambda: not rows(ledger_path)[0]["sinks_pending"], what="the replay")
            running.stop()
        assert Path(rows(ledger_path)[0]["heatmap"]).is_file()


def test_temporary_overlays_of_dead_processes_are_removed_at_start(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = maps / f".part-7.png.{int(dead.stdout)}.tmp"
    live = maps / f".part-8.png.{os.getpid()}.tmp"
    other = maps / "keep.png.123.tmp"
    for path in (left, live, other):
        path.write_bytes(b"half a png")
    HeatmapSink(maps)
    assert not left.exists() and live.exists() and other.exists()


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs."""
    with tmpfs(tmp_path / "disk", size="2m") as (folder, _):
        yield folder


def _fill(folder: Path) -> Path:
    ballast = folder / "ballast"
    with open(ballast, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return ballast


def test_an_overlay_that_fills_the_disk_leaves_no_temporary_file(full_disk, model_dir):  # noqa: F811
    from edge_inspect.inspector import Inspector
    from edge_inspect.ledger import Record
    from edge_inspect.preprocess import decode_image
    from edge_inspect.sinks import Done

    maps = full_disk / "maps"
    sink = HeatmapSink(maps)
    _fill(full_disk)
    image = decode_image(_png(3, DEFECTS[0]))
    amap = Inspector.load(model_dir, anomaly_map=True).inspect(image).anomaly_map
    record = Record(identity="x", kind="file", source=str(full_disk / "p.png"), verdict="ng", arrived_at=0,
                    committed_at=0, latency_ms=0, id=5)
    assert sink.write([Done(record, image, amap)]) == {}
    assert "No space left" in sink.failures[5] or "Errno 28" in sink.failures[5], sink.failures
    assert os.listdir(maps) == []


def _watch_process(args, log: Path, notify: NotifySocket) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": notify.address, "COLUMNS": "200"}
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "edge_inspect", "watch", *map(str, args)], cwd=ROOT, env=env,
                                stdout=out, stderr=out)


@pytest.mark.parametrize("delay", [0.2, 0.5, 1.0])
def test_sigterm_while_starting_is_a_clean_stop(model_dir, tmp_path, delay):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    notify = NotifySocket()
    log = tmp_path / "watch.log"
    proc = _watch_process([folder, "--model", model_dir], log, notify)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()


def test_sighup_drains_and_exits_0(model_dir, tmp_path):  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    results = tmp_path / "verdicts.jsonl"
    notify = NotifySocket()
    log = tmp_path / "watch.log"
    proc = _watch_process([folder, "--model", model_dir, "--sort", "--results", results], log, notify)
    try:
        notify.wait_for("READY=1")
        for k in range(20):
            _drop(folder, f"p{k:02d}.png".encode(), _png(60 + k))
        ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
        wait_for(lambda: count(ledger_path) >= 1, what="the first verdict")
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "SIGHUP" in text and "exit 0" in text
    got = rows(ledger_path)
    assert got and all(not r["sinks_pending"] for r in got), "a part left with its sinks pending"
    assert len(results.read_text().splitlines()) == len(got)


def test_other_commands_keep_the_default_signal_actions(tmp_path):
    """Only watch catches stop signals early; `results` on a big ledger must still die on SIGTERM.

    Compared with what the process started with: under nohup, SIGHUP starts ignored and must stay so.
    """
    code = ("import sys, signal; sys.argv = ['edge-inspect', 'results', '/nonexistent'];\n"
            "before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)\n"
            "from edge_inspect.__main__ import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(signal.getsignal(signal.SIGTERM) == before[0], signal.getsignal(signal.SIGHUP) == before[1])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == ["True", "True"], out.stdout + out.stderr
