"""Retention and the low-disk guard on real files, a real ledger and a real small file system."""

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from edge_inspect import retention
from edge_inspect.config import Retention
from edge_inspect.ledger import Ledger, Record, file_identity, frame_identity
from edge_inspect.retention import DiskGuard, Janitor, _size
from edge_inspect.sinks import Done, SortSink
from edge_inspect.sinks.heatmaps import heatmap_name
from tests.support.mounts import tmpfs

NOW = time.time()
DAY = 86400.0


def _committed(ledger: Ledger, path: Path, verdict: str, pending: str, committed_at: float) -> Record:
    """Commit a verdict for a real file, with its true identity, as the pipeline would."""
    data = path.read_bytes()
    st = path.stat()
    sha = hashlib.sha256(data).hexdigest()
    record = Record(identity=file_identity(path, st.st_size, st.st_mtime_ns, sha), kind="file", source=str(path),
                    verdict=verdict, arrived_at=committed_at, committed_at=committed_at, latency_ms=1.0,
                    size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha, score=0.5, threshold=1.0,
                    criterion="range", sinks_pending=pending)
    (written,) = ledger.record([record])
    return written


class Line:
    """A watched folder that sorts, a heatmaps folder and a ledger; parts go through them as the watcher does."""

    def __init__(self, tmp_path: Path, ledger: Ledger):
        self.folder = tmp_path / "in"
        self.folder.mkdir()
        self.heatmaps = tmp_path / "heatmaps"
        self.heatmaps.mkdir()
        self.ledger = ledger
        self.sort = SortSink(self.folder)
        self._n = 0

    def part(self, *, age: float = 0.0, size: int = 1000, verdict: str = "ng", sort: bool = True,
             overlay: bool = True, pending: str = "", record_sinks: bool = True, committed: float | None = None,
             name: str | None = None) -> Record:
        """A part ``age`` days old (its mtime), committed ``committed`` days ago (default ``age``).

        ``sort``/``overlay``: the sinks ran (the file moved into its sort folder, an overlay of ``size`` bytes
        written with the same mtime). ``pending``: the sinks still pending afterwards. ``record_sinks``: the
        ledger heard of the sinks' work (False: a crash before the sinks' columns were written).
        """
        self._n += 1
        path = self.folder / (name or f"part_{self._n:03d}.png")
        path.write_bytes(os.urandom(size))
        stamp = NOW - age * DAY
        os.utime(path, (stamp, stamp))
        sinks = " ".join(s for s, on in (("sort", sort), ("heatmaps", overlay)) if on)
        record = _committed(self.ledger, path, verdict, sinks, NOW - (age if committed is None else committed) * DAY)
        columns: dict = {"sinks_pending": pending}
        if sort:
            columns.update(self.sort.write([Done(record)])[record.id])
        if overlay:
            target = self.heatmaps / heatmap_name(record)
            target.write_bytes(os.urandom(size))
            os.utime(target, (stamp, stamp))
            columns["heatmap"] = str(target)
        if record_sinks:
            self.ledger.finish_sinks({record.id: columns})
        else:
            self.ledger.finish_sinks({record.id: {"sinks_pending": pending or sinks}})
        return self.ledger.get(record.id)

    def janitor(self, **caps) -> Janitor:
        return Janitor("line", Retention(**caps), self.ledger, sorted_root=self.folder, heatmaps=self.heatmaps,
                       hot_folder=self.folder)

    def sorted_files(self) -> set[str]:
        return {p.name for verdict in ("ok", "ng", "error") for p in (self.folder / verdict).iterdir()}

    def overlays(self) -> set[str]:
        return {p.name for p in self.heatmaps.iterdir()}


@pytest.fixture
def line(tmp_path):
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        yield Line(tmp_path, ledger)


def _overlay_of(record: Record) -> Path:
    return Path(record.heatmap)


# ---------------------------------------------------------------- age and size caps


def test_age_caps_delete_old_sorted_parts_and_overlays_and_log_one_line(line, caplog):
    old = [line.part(age=10, size=1000 + i) for i in range(3)]
    new = [line.part(age=1, size=500) for _ in range(2)]
    janitor = line.janitor(sorted_max_age="7d", heatmaps_max_age="5d")
    with caplog.at_level(logging.INFO, logger="edge_inspect.retention"):
        report = janitor.run_once(NOW)
    assert (report.sorted_deleted, report.sorted_bytes) == (3, 3003)
    assert (report.heatmaps_deleted, report.heatmaps_bytes) == (3, 3003)
    assert (report.rows_dropped, report.kept_pending, report.failed) == (0, 0, 0)
    assert line.sorted_files() == {Path(r.sorted_path).name for r in new}
    assert line.overlays() == {_overlay_of(r).name for r in new}
    # The ledger keeps where each file went, as history.
    assert line.ledger.get(old[0].id).sorted_path == old[0].sorted_path
    (message,) = [r.getMessage() for r in caplog.records]
    assert "Retention line: deleted 3 sorted part(s) (3.0 kB) and 3 overlay(s) (3.0 kB)" in message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edge_inspect.retention"):
        again = janitor.run_once(NOW)
    assert (again.sorted_deleted, again.heatmaps_deleted) == (0, 0)
    assert caplog.records == []  # nothing to do: nothing logged


def test_size_caps_delete_the_oldest_first_until_under_the_cap(line):
    # Five parts of 1000 bytes, 5, 4, 3, 2 and 1 days old: a 2500-byte cap keeps the two newest.
    parts = [line.part(age=age, size=1000) for age in (3, 5, 1, 4, 2)]
    report = line.janitor(sorted_max_bytes=2500, heatmaps_max_bytes=1000).run_once(NOW)
    assert (report.sorted_deleted, report.sorted_bytes) == (3, 3000)
    assert line.sorted_files() == {Path(parts[i].sorted_path).name for i in (2, 4)}
    assert (report.heatmaps_deleted, report.heatmaps_bytes) == (4, 4000)
    assert line.overlays() == {_overlay_of(parts[2]).name}


def test_age_and_size_caps_together_and_every_sort_folder_counts(line):
    ok = line.part(age=2, size=1000, verdict="ok", overlay=False)
    ng = line.part(age=3, size=1000, verdict="ng", overlay=False)
    error = line.part(age=9, size=1000, verdict="error", overlay=False)
    fresh = line.part(age=0.5, size=1000, verdict="ok", overlay=False)
    report = line.janitor(sorted_max_age="8d", sorted_max_bytes=2000).run_once(NOW)
    # error/ goes by age, then ng/ (the oldest left) by size: 2000 bytes remain, at the cap.
    assert report.sorted_deleted == 2
    assert not Path(error.sorted_path).exists() and not Path(ng.sorted_path).exists()
    assert Path(ok.sorted_path).exists() and Path(fresh.sorted_path).exists()


# ---------------------------------------------------------------- pending rows


def test_a_pending_rows_files_survive_every_cap(line):
    done = line.part(age=30, size=4000)
    # Sorted, its overlay still to make (the heatmaps sink reads the sorted file then).
    waiting = line.part(age=31, size=4000, overlay=False, pending="heatmaps")
    # Both sinks ran, but the process stopped before the ledger heard of it: only the row's id, size and mtime
    # say which files are its own.
    unrecorded = line.part(age=32, size=4000, record_sinks=False)
    # The overlay was written and recorded, the JSON line is still pending.
    overlay_pending = line.part(age=33, size=4000, sort=False, pending="jsonl")
    assert waiting.sorted_path and unrecorded.sorted_path is None and unrecorded.sinks_pending == "sort heatmaps"
    report = line.janitor(sorted_max_age=1, sorted_max_bytes=1, heatmaps_max_age=1, heatmaps_max_bytes=1,
                          ledger_max_age=1).run_once(NOW)
    assert not Path(done.sorted_path).exists() and not Path(done.heatmap).exists()
    assert Path(waiting.sorted_path).exists()
    assert line.sorted_files() == {Path(waiting.sorted_path).name, unrecorded.path.name}
    assert line.overlays() == {heatmap_name(unrecorded), heatmap_name(overlay_pending)}
    assert report.kept_pending == 4
    assert (report.sorted_deleted, report.heatmaps_deleted) == (1, 1)
    # Their rows stay too, though older than the cap; the finished one is dropped (its part left the folder).
    assert report.rows_dropped == 1 and line.ledger.get(done.id) is None
    assert {r.id for r in line.ledger.pending()} == {waiting.id, unrecorded.id, overlay_pending.id}


def test_ledger_drop_keeps_pending_rows_whatever_it_is_asked(line):
    done = line.part(age=3)
    pending = line.part(age=3, overlay=False, pending="heatmaps")
    assert line.ledger.drop([done.id, pending.id, 999]) == 1
    assert line.ledger.get(done.id) is None and line.ledger.get(pending.id) is not None
    assert line.ledger.drop([]) == 0


def test_ledger_drop_keeps_the_newest_row_so_that_ids_never_come_back(line):
    """The JSONL sink's replay, overlay names and sorted names rely on a row id never being given twice."""
    rows = [line.part(age=3) for _ in range(3)]
    assert line.ledger.drop(r.id for r in rows) == 2
    assert line.ledger.get(rows[-1].id) is not None
    assert line.part().id == rows[-1].id + 1


# ---------------------------------------------------------------- ledger rows


def test_rows_are_dropped_only_once_their_part_left_the_folder(line):
    sorted_away = line.part(age=40, overlay=False)
    still_here = line.part(age=40, sort=False, overlay=False)  # no sort: the part stays in the watched folder
    replaced = line.part(age=40, sort=False, overlay=False)
    replaced.path.write_bytes(b"another part under the same name")  # the old part is gone
    deleted = line.part(age=40, sort=False, overlay=False)
    deleted.path.unlink()
    pending = line.part(age=40, overlay=False, pending="jsonl")
    frame = line.ledger.record([Record(identity=frame_identity("rtsp://cam", NOW - 40 * DAY, 7), kind="frame",
                                       source="rtsp://cam", verdict="ok", arrived_at=NOW - 40 * DAY,
                                       committed_at=NOW - 40 * DAY, latency_ms=1.0, frame_index=7)])[0]
    recent = line.part(age=40, committed=2, overlay=False)  # an old file, committed lately
    report = line.janitor(ledger_max_age="30d").run_once(NOW)
    assert report.rows_dropped == 4
    gone = {r.id for r in (sorted_away, replaced, deleted, frame)}
    for record in (sorted_away, still_here, replaced, deleted, pending, recent, frame):
        assert (line.ledger.get(record.id) is None) == (record.id in gone), record
    # No file is touched by the row cap.
    assert Path(sorted_away.sorted_path).exists() and still_here.path.exists()


def test_no_file_row_is_dropped_while_the_watched_folder_is_missing(line, caplog):
    part = line.part(age=40, sort=False, overlay=False)
    part.path.unlink()
    janitor = Janitor("line", Retention(ledger_max_age="30d"), line.ledger, sorted_root=None, heatmaps=None,
                      hot_folder=line.folder.parent / "unmounted")
    with caplog.at_level(logging.WARNING, logger="edge_inspect.retention"):
        assert janitor.run_once(NOW).rows_dropped == 0
        janitor.run_once(NOW)
    assert line.ledger.get(part.id) is not None
    assert len([r for r in caplog.records if "is missing" in r.getMessage()]) == 1  # once, not every pass


def test_row_batches_are_bounded_and_rows_kept_do_not_hold_back_the_rest(line, monkeypatch):
    monkeypatch.setattr(retention, "ROWS_PER_PASS", 3)
    kept = [line.part(age=40, sort=False, overlay=False) for _ in range(4)]  # still in the folder
    droppable = [line.part(age=40, overlay=False) for _ in range(4)]
    line.part(age=1)
    janitor = line.janitor(ledger_max_age="30d")
    dropped = [janitor.run_once(NOW).rows_dropped for _ in range(4)]
    assert dropped == [0, 2, 2, 0]  # rows 1-3 kept, then 4 kept and 5-6 dropped, 7-8, then nothing left
    assert all(line.ledger.get(r.id) is not None for r in kept)
    assert all(line.ledger.get(r.id) is None for r in droppable)


# ---------------------------------------------------------------- what is never touched


def test_symlinks_foreign_files_and_everything_outside_are_left_alone(line, tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.png"
    victim.write_bytes(b"x" * 5000)
    os.utime(victim, (NOW - 90 * DAY, NOW - 90 * DAY))
    sorted_part = line.part(age=90, size=100, verdict="ok")
    # Links in the sort folders and the heatmaps folder, named like parts and overlays.
    (line.folder / "ok" / "link.png").symlink_to(victim)
    (line.heatmaps / "link-12.png").symlink_to(victim)
    # ng/ replaced by a link to a folder outside: never entered.
    (line.folder / "ng").rmdir()
    (line.folder / "ng").symlink_to(outside, target_is_directory=True)
    # Files a user put beside the overlays, and a sub-folder of the sort folder.
    foreign = [line.heatmaps / "notes.txt", line.heatmaps / "logo.png", line.heatmaps / "plot-3.PNG",
               line.heatmaps / ".part-5.png.123.tmp", line.folder / "error" / "nested" / "deep.png"]
    for path in foreign:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"y" * 5000)
        os.utime(path, (NOW - 90 * DAY, NOW - 90 * DAY))
    with caplog.at_level(logging.WARNING, logger="edge_inspect.retention"):
        report = line.janitor(sorted_max_age=1, sorted_max_bytes=1, heatmaps_max_age=1,
                              heatmaps_max_bytes=1).run_once(NOW)
    assert [r.getMessage() for r in caplog.records] == [
        f"Retention line: {line.folder / 'ng'} is a symbolic link or not a folder; the files in it are left alone."]
    assert victim.read_bytes() == b"x" * 5000
    assert (line.folder / "ok" / "link.png").is_symlink() and (line.heatmaps / "link-12.png").is_symlink()
    assert all(path.exists() for path in foreign)
    assert (report.sorted_deleted, report.heatmaps_deleted) == (1, 1)
    assert not Path(sorted_part.sorted_path).exists() and not Path(sorted_part.heatmap).exists()


def test_a_file_that_cannot_be_deleted_is_counted_and_logged_and_the_next_pass_takes_it(line, monkeypatch, caplog):
    parts = [line.part(age=10, overlay=False) for _ in range(3)]
    real_unlink, refused = os.unlink, Path(parts[1].sorted_path).name

    def unlink(name, *args, **kwargs):
        if name == refused:
            raise PermissionError(13, "Permission denied")
        return real_unlink(name, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    janitor = line.janitor(sorted_max_age="7d")
    with caplog.at_level(logging.WARNING, logger="edge_inspect.retention"):
        report = janitor.run_once(NOW)
    assert (report.sorted_deleted, report.failed) == (2, 1)
    assert any("could not be deleted" in r.getMessage() and refused in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert janitor.run_once(NOW).sorted_deleted == 1
    assert line.sorted_files() == set()


def test_due_after_each_interval_and_nothing_without_caps(line, caplog):
    line.part(age=400)
    janitor = line.janitor(interval="10m")
    assert janitor.due(NOW)
    with caplog.at_level(logging.DEBUG, logger="edge_inspect.retention"):
        report = janitor.run_once(NOW)
    assert (report.sorted_deleted, report.heatmaps_deleted, report.rows_dropped) == (0, 0, 0)
    assert caplog.records == [] and len(line.sorted_files()) == 1
    assert not janitor.due(NOW + 599)
    assert janitor.due(NOW + 600)
    assert janitor.due(NOW - 3600)  # the clock was set back


# ---------------------------------------------------------------- the low-disk guard


def test_disk_guard_on_a_small_file_system_filled_then_freed(tmp_path):
    with tmpfs(tmp_path / "disk", size="4m") as (folder, _):
        guard = DiskGuard(2 * 1024 * 1024)
        st = os.statvfs(folder)
        assert guard.free(folder) == st.f_bavail * st.f_frsize
        assert guard.free(folder / "not" / "yet") == guard.free(folder)  # the nearest existing parent
        assert guard.low(folder) is None
        ballast = folder / "ballast"
        ballast.write_bytes(b"\0" * (3 * 1024 * 1024))
        assert guard.low(folder) is None  # the answer is kept for a second
        time.sleep(1.1)
        reason = guard.low(folder)
        assert reason is not None and reason.startswith("low disk: ")
        assert f"free at {folder}, below disk.min_free 2.1 MB; sorting and heatmaps paused" in reason
        ballast.unlink()
        assert guard.low(folder) == reason
        time.sleep(1.1)
        assert guard.low(folder) is None


def test_disk_guard_off_at_zero_and_sizes_for_people(tmp_path):
    assert DiskGuard(0).low(tmp_path) is None
    assert DiskGuard(1 << 62).low(tmp_path / "missing").startswith("low disk: ")
    assert [_size(n) for n in (512, 412_000_000, 1 << 30, 25 * 10**9)] == ["512 B", "412 MB", "1.1 GB", "25.0 GB"]
