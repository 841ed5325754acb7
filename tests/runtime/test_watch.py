"""The watch pipeline in-process: real hot folder, real SQLite ledger, real model, real files."""

import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspect.inspector import Inspector
from edge_inspect.ledger import Ledger
from edge_inspect.sinks import HeatmapSink, JsonlSink, SortSink
from edge_inspect.sources import Camera, FileItem, HotFolder
from edge_inspect.sources.writers import WriteCheck
from edge_inspect.watch import Watcher, image_dimensions, read_complete, read_file
from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.support import DEFECTS, make_part, write_parts
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 180.0  # generous: the machine may be loaded


@pytest.fixture(scope="module")
def inspector(model_dir):  # noqa: F811
    return Inspector.load(model_dir, batch_size=8, anomaly_map=True)


def wait_for(condition, timeout=WAIT_S, what="condition"):
    wait_until(condition, timeout, what, interval=0.05)


class Running:
    """A watcher running on a thread; ``stop()`` returns its summary (or raises its error)."""

    def __init__(self, watcher: Watcher):
        self.watcher = watcher
        self.summary = self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.summary = self.watcher.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self.error = exc

    def stop(self):
        self.watcher.stop()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the watcher did not stop"
        if self.error is not None:
            raise self.error
        return self.summary


def rows(ledger_path):
    conn = sqlite3.connect(ledger_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM parts ORDER BY id")]
    finally:
        conn.close()


def count(ledger_path):
    if not Path(ledger_path).exists():
        return 0
    conn = sqlite3.connect(ledger_path)
    try:
        return conn.execute("SELECT count(*) FROM parts").fetchone()[0]
    except sqlite3.OperationalError:  # created, schema not yet written
        return 0
    finally:
        conn.close()


def item(path) -> FileItem:
    st = os.stat(path)
    return FileItem(Path(path), st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------ bursts


def test_a_burst_through_the_hot_folder_gets_one_verdict_per_file(inspector, tmp_path):
    folder, staging = tmp_path / "in", tmp_path / "staging"
    write_parts(folder, 40, size=32, seed=20)                  # the backlog at start
    write_parts(staging, 260, size=32, seed=21, suffix=".jpg")  # the burst, renamed into place
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    with Ledger.open(ledger_path) as ledger, HotFolder(folder, settle=0.2) as source:
        running = Running(Watcher(source, inspector, ledger))
        for path in sorted(staging.iterdir()):
            os.replace(path, folder / path.name)
        wait_for(lambda: count(ledger_path) >= 300, what="300 verdicts")
        time.sleep(0.5)  # any late duplicate event would be committed by now
        summary = running.stop()
    got = rows(ledger_path)
    files = sorted(str(p) for p in folder.iterdir() if p.is_file())
    assert sorted(r["source"] for r in got) == files and len(files) == 300
    assert summary.total == 300 and summary.error == 0
    assert all(r["verdict"] in ("ok", "ng") and len(r["sha256"]) == 64 for r in got)
    assert all(r["arrived_at"] <= r["read_at"] <= r["inspected_at"] <= r["committed_at"] for r in got)
    assert max(r["batch_size"] for r in got) <= inspector.batch_size
    assert {r["model_sha256"] for r in got} == {inspector.card.data["files"][inspector.precision]["sha256"]}


def test_restart_with_backlog_and_repeated_items_add_no_verdict(inspector, tmp_path):
    folder = tmp_path / "in"
    write_parts(folder, 12, size=32, seed=22)
    items = [item(p) for p in sorted(folder.iterdir())]
    ledger_path = tmp_path / "ledger.sqlite"
    with Ledger.open(ledger_path) as ledger:
        first = Watcher(items + items[:5], inspector, ledger).run()  # the same file seen twice
        assert (first.total, first.duplicates) == (12, 5)
        with HotFolder(folder, settle=0.0) as source:                 # a restart: backlog + events
            running = Running(Watcher(source, inspector, ledger))
            wait_for(lambda: running.watcher._counts["duplicates"] >= 12, what="the backlog")
            second = running.stop()
    assert (second.total, second.duplicates) == (0, 12)
    assert count(ledger_path) == 12


def test_a_replaced_file_is_a_new_part(inspector, tmp_path):
    folder = tmp_path / "in"
    write_parts(folder, 1, size=32, seed=23)
    path = next(folder.iterdir())
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        Watcher([item(path)], inspector, ledger).run()
        cv2.imwrite(str(path), make_part(np.random.default_rng(4), size=32, defect=DEFECTS[0])[0])
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime on coarse clocks
        summary = Watcher([item(path), item(path)], inspector, ledger).run()
    got = rows(tmp_path / "ledger.sqlite")
    assert summary.total == 1 and summary.duplicates == 1
    assert [r["source"] for r in got] == [str(path)] * 2
    assert got[0]["sha256"] != got[1]["sha256"] and got[0]["mtime_ns"] != got[1]["mtime_ns"]


def png(seed: int) -> bytes:
    image, _ = make_part(np.random.default_rng(seed), size=32, defect=None)
    return cv2.imencode(".png", image)[1].tobytes()


class Reported(list):
    """Files as a hot folder reports them, with its check for open writers and its longer settle time."""

    def __init__(self, items, folder, settle_unsure=10.0):
        super().__init__(items)
        self.writers = WriteCheck(folder)
        self.settle_unsure = settle_unsure


def rewrite_slowly(path, data: bytes, written: int, after_s: float) -> threading.Thread:
    """Open ``path`` again (truncating it), write ``written`` bytes of ``data`` now and the rest ``after_s`` later."""
    handle = open(path, "wb")  # noqa: SIM115  (closed by the thread)
    handle.write(data[:written])
    handle.flush()

    def finish():
        time.sleep(after_s)
        handle.write(data[written:])
        handle.close()

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


def test_a_file_opened_again_after_its_close_is_read_once_its_writer_closes_it(tmp_path):
    """A file reported complete is truncated and rewritten before it is read: the read waits for the writer."""
    path = tmp_path / "part.png"
    path.write_bytes(png(1))
    second = png(2)
    writer = rewrite_slowly(path, second, len(second) // 3, after_s=0.3)
    assert read_file(path, 1 << 20)[0] == second[: len(second) // 3]  # what a plain read sees now
    data, st = read_complete(path, 1 << 20, WriteCheck(tmp_path), patience=10.0)
    writer.join()
    assert data == second and st.st_size == len(second)


def test_a_file_still_changing_when_patience_runs_out_is_left_for_its_next_version(tmp_path, caplog):
    path = tmp_path / "part.png"
    handle = open(path, "wb")  # noqa: SIM115
    stop = threading.Event()

    def keep_writing():
        while not stop.is_set():
            handle.write(b"x" * 100)
            handle.flush()
            time.sleep(0.01)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        assert read_complete(path, 1 << 30, WriteCheck(tmp_path), patience=0.3) is None
        assert "part.png: still being written 0.3 s after it was reported complete; its next" in caplog.text
    finally:
        stop.set()
        writer.join()
        handle.close()


def test_a_file_held_open_but_unchanged_is_read_when_patience_runs_out(tmp_path, caplog):
    """A writer that keeps a finished file open (no close to wait for): judged after the patience, not lost."""
    path = tmp_path / "part.png"
    path.write_bytes(png(3))
    with open(path, "ab"):
        assert WriteCheck(tmp_path).busy(path, scan=False) is True
        started = time.monotonic()
        data, _ = read_complete(path, 1 << 20, WriteCheck(tmp_path), patience=0.3)
        assert data == png(3) and time.monotonic() - started >= 0.3
    assert "part.png: still open for writing, unchanged, 0.3 s after it was reported complete; judged" in caplog.text


def test_the_watcher_judges_a_rewritten_file_on_its_complete_content(inspector, tmp_path):
    """As a hot folder reports it: complete at its close, then opened again and rewritten in pieces."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "part.png"
    path.write_bytes(png(1))
    reported = item(path)
    second = png(2)
    writer = rewrite_slowly(path, second, len(second) // 3, after_s=1.0)
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        summary = Watcher(Reported([reported], folder), inspector, ledger).run()
    writer.join()
    got = rows(tmp_path / "ledger.sqlite")
    assert summary.total == 1 and summary.error == 0, got
    assert got[0]["sha256"] == hashlib.sha256(second).hexdigest() and got[0]["size"] == len(second)


def test_a_lone_part_is_inspected_alone_at_once(inspector, tmp_path):
    """Dynamic batching: nothing waits for a batch to fill."""
    folder = tmp_path / "in"
    write_parts(folder, 1, size=32, seed=24)
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    with Ledger.open(ledger_path) as ledger, HotFolder(folder, settle=0.0) as source:
        running = Running(Watcher(source, inspector, ledger))
        wait_for(lambda: count(ledger_path) == 1, what="the verdict")
        running.stop()
    assert rows(ledger_path)[0]["batch_size"] == 1


# ------------------------------------------------------------------ errors


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming a size, and nothing else."""
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


def test_each_bad_input_gets_an_error_verdict_and_the_watcher_goes_on(inspector, tmp_path):
    folder = tmp_path / "in"
    write_parts(folder, 2, size=32, seed=25)
    good = sorted(folder.iterdir())
    bad = {
        "corrupt.png": os.urandom(600),
        "cut.jpg": cv2.imencode(".jpg", np.full((32, 32), 128, np.uint8))[1].tobytes()[:-40],
        "empty.png": b"",
        "notes.txt": b"shift 2: 412 parts\n",
        "huge.png": _png_header_only(20_000, 20_000),  # 400 MP claimed; the header alone says so
        "big.bmp": cv2.imencode(".bmp", np.zeros((64, 64), np.uint8))[1].tobytes(),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    (folder / "a-folder.png").mkdir()                     # an entry that is not a file
    os.symlink("loop.png", folder / "loop.png")            # an entry that cannot be opened, even by root
    items = [item(good[0])] + [item(folder / n) for n in bad] + [
        FileItem(folder / "a-folder.png", 4096, 1), FileItem(folder / "loop.png", 8, 1),
        FileItem(folder / "vanished.png", 1234, 5),        # deleted between its event and the read
        item(good[1])]
    ledger_path = tmp_path / "ledger.sqlite"
    with Ledger.open(ledger_path) as ledger:
        summary = Watcher(items, inspector, ledger, max_pixels=2000).run()
    reasons = {Path(r["source"]).name: r["error"] for r in rows(ledger_path) if r["verdict"] == "error"}
    verdicts = {Path(r["source"]).name: r["verdict"] for r in rows(ledger_path)}
    assert verdicts[good[0].name] in ("ok", "ng") and verdicts[good[1].name] in ("ok", "ng")
    assert summary.error == len(reasons) == len(bad) + 3
    assert "not a readable image" in reasons["corrupt.png"]
    assert "truncated JPEG" in reasons["cut.jpg"]
    assert "empty (0 bytes)" in reasons["empty.png"]
    assert "not a readable image" in reasons["notes.txt"]
    assert "400.0 megapixels" in reasons["huge.png"] and "not decoded" in reasons["huge.png"]
    assert "4096 x" not in reasons["big.bmp"] and "64 x 64" in reasons["big.bmp"]
    assert "not a regular file" in reasons["a-folder.png"]
    assert "cannot be opened" in reasons["loop.png"]
    assert "vanished before it could be read" in reasons["vanished.png"]
    unread = [r for r in rows(ledger_path) if Path(r["source"]).name in ("vanished.png", "loop.png")]
    assert all(r["sha256"] is None for r in unread)


def test_a_file_over_the_byte_limit_is_not_read(tmp_path):
    path = tmp_path / "raw.tif"
    path.write_bytes(b"\0" * 5000)
    with pytest.raises(Exception, match="5000 bytes, over the limit of 4096"):
        read_file(path, 4096)
    data, st = read_file(path, 5000)
    assert len(data) == st.st_size == 5000


def test_permission_denied_gets_an_error_verdict(model_dir, tmp_path):  # noqa: F811
    """A file the watcher's user cannot read. Root reads anything, so as root the watcher runs in a
    process whose bounding set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv): root then
    obeys the file's mode like any user."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: root can read a mode-000 file")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    folder = tmp_path / "in"
    write_parts(folder, 1, size=32, seed=26)
    denied = folder / "denied.png"
    shutil.copy(next(folder.iterdir()), denied)
    denied.chmod(0)
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from edge_inspect.inspector import Inspector
        from edge_inspect.ledger import Ledger
        from edge_inspect.sources import FileItem
        from edge_inspect.watch import Watcher
        folder = Path({str(folder)!r})
        items = [FileItem(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in sorted(folder.iterdir())]
        with Ledger.open({str(tmp_path / 'ledger.sqlite')!r}) as ledger:
            Watcher(items, Inspector.load({str(model_dir)!r}), ledger).run()
    """)
    proc = subprocess.run([*prefix, sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr
    got = {Path(r["source"]).name: r for r in rows(tmp_path / "ledger.sqlite")}
    assert got["denied.png"]["verdict"] == "error" and "permission denied" in got["denied.png"]["error"]
    assert got["part_00000.png"]["verdict"] in ("ok", "ng")


def test_image_dimensions_from_headers():
    image = np.zeros((37, 53, 3), np.uint8)
    for suffix in (".png", ".jpg", ".bmp", ".tif"):
        assert image_dimensions(cv2.imencode(suffix, image)[1].tobytes()) == (53, 37), suffix
    assert image_dimensions(b"GIF89a") is None
    assert image_dimensions(b"\x89PNG\r\n\x1a\n\0\0") is None  # cut short: decoding will say so


# ------------------------------------------------------------------ sinks and cameras


def test_sort_heatmaps_and_results_agree_with_the_ledger(inspector, tmp_path):
    folder = tmp_path / "in"
    write_parts(folder, 10, size=32, seed=27)
    write_parts(tmp_path / "def", 10, size=32, seed=28, defective=True)
    for path in (tmp_path / "def").iterdir():
        os.replace(path, folder / f"d{path.name}")
    (folder / "junk.png").write_bytes(b"junk")
    results, heat = tmp_path / "verdicts.jsonl", tmp_path / "heat"
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    with Ledger.open(ledger_path) as ledger:
        sort = SortSink(folder)
        with HotFolder(folder, settle=0.0, exclude=sort.folders) as source:
            running = Running(Watcher(source, inspector, ledger,
                                      sinks=[JsonlSink(results), HeatmapSink(heat), sort]))
            wait_for(lambda: count(ledger_path) == 21, what="21 verdicts")
            wait_for(lambda: not any(p.is_file() for p in folder.iterdir()), what="the sort")
            running.stop()
    got = rows(ledger_path)
    lines = [json.loads(text) for text in results.read_text().splitlines()]
    assert [line["id"] for line in lines] == [r["id"] for r in got]
    for row, line in zip(got, lines):
        assert row["sinks_pending"] == ""
        assert Path(row["sorted_path"]).parent == folder / row["verdict"]
        assert line["sorted_path"] == row["sorted_path"] and line["verdict"] == row["verdict"]
        assert (row["heatmap"] is not None) == (row["verdict"] == "ng") == (line["heatmap"] is not None)
    assert sorted(p.name for p in heat.iterdir()) == sorted(Path(r["heatmap"]).name for r in got if r["heatmap"])
    for verdict in ("ok", "ng", "error"):
        assert sorted(p.name for p in (folder / verdict).iterdir()) == sorted(
            Path(r["sorted_path"]).name for r in got if r["verdict"] == verdict)
    assert any(r["verdict"] == "ng" for r in got)


def test_camera_frames_each_get_a_verdict(inspector, tmp_path):
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    rng = np.random.default_rng(3)
    for _ in range(9):
        writer.write(cv2.cvtColor(make_part(rng, size=32)[0], cv2.COLOR_GRAY2BGR))
    writer.release()
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        summary = Watcher(Camera(str(video), every=2), inspector, ledger, sinks=[JsonlSink(tmp_path / "v.jsonl")]).run()
    got = rows(tmp_path / "ledger.sqlite")
    assert summary.total == len(got) == 5
    assert sorted(r["frame_index"] for r in got) == [0, 2, 4, 6, 8]  # two readers: the order may change
    assert {r["kind"] for r in got} == {"frame"} and {r["source"] for r in got} == {str(video)}
    assert all(r["sha256"] is None and r["frame_time"] <= r["committed_at"] for r in got)
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 5


# ------------------------------------------------------------------ sub-folders and input notes


def test_a_recursive_watch_sorts_sub_folder_parts_under_unique_flat_names(inspector, tmp_path):
    folder = tmp_path / "in"
    for sub in ("", "lineA", "lineA/deeper"):
        write_parts(folder / sub, 1, size=32, seed=30)  # part_00000.png three times, in three folders
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    with Ledger.open(ledger_path) as ledger:
        sort = SortSink(folder)
        with HotFolder(folder, settle=0.1, recursive=True, exclude=sort.folders) as source:
            running = Running(Watcher(source, inspector, ledger, sinks=[sort]))
            wait_for(lambda: count(ledger_path) == 3, what="the backlog")
            write_parts(folder / "lineB", 1, size=32, seed=31)  # a sub-folder made while watching
            wait_for(lambda: count(ledger_path) == 4, what="the part in the new sub-folder")
            wait_for(lambda: all(r["sinks_pending"] == "" for r in rows(ledger_path)), what="the sort")
            running.stop()
    got = {Path(r["source"]).relative_to(folder).as_posix(): Path(r["sorted_path"]) for r in rows(ledger_path)}
    assert {source: path.name for source, path in got.items()} == {
        "part_00000.png": "part_00000.png", "lineA/part_00000.png": "lineA~part_00000.png",
        "lineA/deeper/part_00000.png": "lineA~deeper~part_00000.png", "lineB/part_00000.png": "lineB~part_00000.png"}
    assert all(path.parent.parent == folder and path.is_file() for path in got.values())  # the sort folders stay flat
    assert not any(p.is_file() for p in (folder / "lineA").rglob("*"))


def _colour_part(seed: int, size: int = 32) -> np.ndarray:
    grey = make_part(np.random.default_rng(seed), size=size)[0]
    colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    colour[: size // 4, : size // 4] = (0, 0, 255)  # a red mark in a corner
    return colour


def write_noted_parts(folder: Path) -> dict[str, str | None]:
    """Parts far from the 32 px grey model's input, and one close to it: name -> the note each should get."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(33)
    cv2.imwrite(str(folder / "colour1.png"), _colour_part(1))
    cv2.imwrite(str(folder / "colour2.png"), _colour_part(2))
    cv2.imwrite(str(folder / "tiny.png"), cv2.resize(make_part(rng, size=32)[0], (8, 8)))
    cv2.imwrite(str(folder / "huge.png"), cv2.resize(make_part(rng, size=32)[0], (256, 256)))
    cv2.imwrite(str(folder / "grey-as-colour.png"), cv2.cvtColor(make_part(rng, size=32)[0], cv2.COLOR_GRAY2BGR))
    colour = "colour image (3 channels) converted to grey"
    return {"colour1.png": colour, "colour2.png": colour, "tiny.png": "8x8 scaled up 4.0x to 32x32",
            "huge.png": "256x256 scaled down 8.0x to 32x32", "grey-as-colour.png": None}


def test_parts_far_from_the_input_are_noted_in_the_ledger_and_the_results_and_warned_once(inspector, tmp_path,
                                                                                            caplog):
    folder = tmp_path / "in"
    expected = write_noted_parts(folder)
    results = tmp_path / "verdicts.jsonl"
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    with caplog.at_level("WARNING"), Ledger.open(ledger_path) as ledger:
        with HotFolder(folder, settle=0.0) as source:
            running = Running(Watcher(source, inspector, ledger, sinks=[JsonlSink(results)]))
            wait_for(lambda: count(ledger_path) == 5, what="5 verdicts")
            cv2.imwrite(str(folder / "colour3.png"), _colour_part(3))  # the same kind again, later
            wait_for(lambda: count(ledger_path) == 6, what="the sixth verdict")
            running.stop()
    expected["colour3.png"] = expected["colour1.png"]
    got = {Path(r["source"]).name: r for r in rows(ledger_path)}
    assert {name: r["input_note"] for name, r in got.items()} == expected
    assert all(r["verdict"] in ("ok", "ng") for r in got.values())  # noted, and inspected all the same
    lines = {Path(line["source"]).name: line for line in map(json.loads, results.read_text().splitlines())}
    assert {name: line["input_note"] for name, line in lines.items()} == expected
    warned = [r.getMessage() for r in caplog.records if "not as the model was trained" in r.getMessage()]
    assert len(warned) == 3, warned  # colour, smaller, larger: once each
    assert sum(f"{folder / 'colour'}" in m for m in warned) == 1
    assert any(f"{folder / 'tiny.png'} is inspected" in m for m in warned)
    assert any(f"{folder / 'huge.png'} is inspected" in m and "(the model takes 32x32 grey images)" in m
               for m in warned)
