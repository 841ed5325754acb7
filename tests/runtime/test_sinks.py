"""Sinks on the real file system: JSONL appends and replay, sorting moves, heatmap overlays."""

import hashlib
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspect.ledger import Ledger, Record, file_identity
from edge_inspect.sinks import Done, HeatmapSink, JsonlSink, SortSink
from edge_inspect.sinks.heatmaps import heatmap_name
from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.support import DEFECTS, make_part, write_parts


def committed(ledger: Ledger, path, verdict: str, sinks: str = "") -> Record:
    """Commit a verdict for a real file, with its true identity, as the pipeline would."""
    data = path.read_bytes()
    st = path.stat()
    sha = hashlib.sha256(data).hexdigest()
    now = time.time()
    record = Record(identity=file_identity(path, st.st_size, st.st_mtime_ns, sha), kind="file", source=str(path),
                    verdict=verdict, arrived_at=now, committed_at=now, latency_ms=1.0, size=st.st_size,
                    mtime_ns=st.st_mtime_ns, sha256=sha, score=2.0 if verdict == "ng" else 0.5, threshold=1.0,
                    criterion="range", sinks_pending=sinks)
    (written,) = ledger.record([record])
    return written


@pytest.fixture
def line(tmp_path):
    """A watched folder with 6 parts and an open ledger beside it."""
    folder = tmp_path / "in"
    write_parts(folder, 6, size=32, seed=5)
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        yield folder, ledger


def _ids(path):
    return [json.loads(text)["id"] for text in path.read_text().splitlines()]


# ---------------------------------------------------------------- JSONL


def test_jsonl_lines_carry_the_row_and_replay_adds_only_missing_ids(line, tmp_path):
    folder, ledger = line
    records = [committed(ledger, p, "ok") for p in sorted(folder.iterdir())]
    out = tmp_path / "out" / "verdicts.jsonl"
    sink = JsonlSink(out)
    assert sink.write([Done(r) for r in records[:4]]) == {r.id: {} for r in records[:4]}
    first = json.loads(out.read_text().splitlines()[0])
    assert first["id"] == records[0].id and first["sha256"] == records[0].sha256 and first["verdict"] == "ok"
    assert "identity" not in first and "sinks_pending" not in first
    # After a crash: rows 3..6 pending, lines for 3 and 4 already written and synced.
    assert sink.replay(records[2:]) == {r.id: {} for r in records[2:]}
    assert _ids(out) == [r.id for r in records]
    sink.close()


def test_jsonl_cuts_a_partial_last_line(line, tmp_path):
    folder, ledger = line
    records = [committed(ledger, p, "ok") for p in sorted(folder.iterdir())[:3]]
    out = tmp_path / "verdicts.jsonl"
    sink = JsonlSink(out)
    sink.write([Done(r) for r in records[:2]])
    sink.close()
    with open(out, "ab") as handle:
        handle.write(b'{"id": 3, "kind": "fi')  # a write cut short by a power loss
    sink = JsonlSink(out)
    assert out.read_bytes().endswith(b"}\n")
    sink.replay(records[2:])
    assert _ids(out) == [r.id for r in records]
    sink.close()


def test_jsonl_tail_scan_reads_back_across_blocks(line, tmp_path):
    folder, ledger = line
    path = folder / "part_00000.png"
    base = committed(ledger, path, "ok")
    sink = JsonlSink(tmp_path / "v.jsonl")
    # 3,000 lines (well over one 64 KiB block) with consecutive ids, then find the last 1,500.
    records = [Record(**{**base.__dict__, "id": i, "source": f"/x/{i}.png"}) for i in range(1, 3001)]
    sink.write([Done(r) for r in records])
    assert sink.ids_from(1501) == set(range(1501, 3001))
    sink.close()


# ---------------------------------------------------------------- sort


def test_sort_moves_by_verdict_and_never_overwrites(line):
    folder, ledger = line
    sink = SortSink(folder)
    paths = sorted(p for p in folder.iterdir() if p.is_file())
    records = [committed(ledger, p, v) for p, v in zip(paths, ["ok", "ng", "error", "ok", "ok", "ok"])]
    # A part of the same name was sorted earlier: the new one must not replace it.
    (folder / "ok" / paths[0].name).write_bytes(b"an earlier part")
    updates = sink.write([Done(r) for r in records[:3]])
    assert updates[records[0].id]["sorted_path"] == str(folder / "ok" / f"{paths[0].stem}-{records[0].id}.png")
    assert (folder / "ok" / paths[0].name).read_bytes() == b"an earlier part"
    assert updates[records[1].id]["sorted_path"] == str(folder / "ng" / paths[1].name)
    assert updates[records[2].id]["sorted_path"] == str(folder / "error" / paths[2].name)
    for record in records[:3]:
        moved = updates[record.id]["sorted_path"]
        assert hashlib.sha256(Path(moved).read_bytes()).hexdigest() == record.sha256
        assert not os.path.exists(record.source)
    assert sorted(p.name for p in sink.folders) == ["error", "ng", "ok"]


def test_sort_replay_after_a_crash_moves_each_file_once(line):
    folder, ledger = line
    sink = SortSink(folder)
    paths = sorted(p for p in folder.iterdir() if p.is_file())
    moved, linked, waiting, gone = (committed(ledger, p, "ok") for p in paths[:4])
    # Crash after the move: the file is in ok/ already, the ledger did not hear of it.
    os.replace(moved.source, folder / "ok" / paths[0].name)
    # Crash between link and unlink: both names exist.
    os.link(linked.source, folder / "ok" / paths[1].name)
    # The file vanished before the sort.
    os.unlink(gone.source)
    updates = sink.replay([moved, linked, waiting, gone])
    assert updates[moved.id]["sorted_path"] == str(folder / "ok" / paths[0].name)
    assert updates[linked.id]["sorted_path"] == str(folder / "ok" / paths[1].name)
    assert updates[waiting.id]["sorted_path"] == str(folder / "ok" / paths[2].name)
    assert updates[gone.id] == {"sorted_path": None}
    assert sorted(p.name for p in (folder / "ok").iterdir()) == [p.name for p in paths[:3]]
    assert not any(p.exists() for p in paths[:4])
    assert paths[4].exists() and paths[5].exists()


def test_sort_keeps_a_sub_folder_in_the_name_and_replays_it_once(line):
    """A recursive watch: parts of one name from the folder and two sub-folders land apart, in flat sort folders."""
    folder, ledger = line
    sink = SortSink(folder)
    name = sorted(p for p in folder.iterdir() if p.is_file())[0].name
    for sub in ("lineA", "lineA/deeper", os.fsdecode(b"cam\xff")):
        (folder / sub).mkdir(parents=True)
        (folder / sub / name).write_bytes((folder / name).read_bytes() + sub.encode("utf-8", "surrogateescape"))
    top, a, deeper, odd = (committed(ledger, folder / sub / name, "ok") for sub in
                           ("", "lineA", "lineA/deeper", os.fsdecode(b"cam\xff")))
    os.replace(a.source, folder / "ok" / f"lineA~{name}")  # a crash after this move, before the ledger heard of it
    updates = sink.replay([top, a, deeper, odd])
    assert {r.id: Path(updates[r.id]["sorted_path"]).name for r in (top, a, deeper, odd)} == {
        top.id: name, a.id: f"lineA~{name}", deeper.id: f"lineA~deeper~{name}", odd.id: f"cam%FF~{name}"}
    assert sorted(p.name for p in (folder / "ok").iterdir()) == sorted(
        [name, f"lineA~{name}", f"lineA~deeper~{name}", f"cam%FF~{name}"])
    assert not any(p.is_file() for sub in ("lineA", os.fsdecode(b"cam\xff")) for p in (folder / sub).rglob("*"))


def test_sort_leaves_a_replaced_file_alone(line):
    """The name now holds new content (a new part): the row's file is gone, the new one is not moved."""
    folder, ledger = line
    sink = SortSink(folder)
    path = sorted(p for p in folder.iterdir() if p.is_file())[0]
    record = committed(ledger, path, "ok")
    cv2.imwrite(str(path), make_part(np.random.default_rng(9), size=32, defect=DEFECTS[0])[0])
    assert sink.replay([record]) == {record.id: {"sorted_path": None}}
    assert path.exists() and not any((folder / "ok").iterdir())


# ---------------------------------------------------------------- heatmaps


def test_heatmap_written_atomically_under_a_stable_name(line, tmp_path):
    folder, ledger = line
    path = sorted(folder.iterdir())[0]
    record = committed(ledger, path, "ng")
    sink = HeatmapSink(tmp_path / "heat")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    amap = np.linspace(0, 0.3, 16 * 16, dtype=np.float32).reshape(16, 16)
    updates = sink.write([Done(record, image, amap)])
    target = tmp_path / "heat" / f"{path.stem}-{record.id}.png"
    assert updates == {record.id: {"heatmap": str(target)}}
    overlay = cv2.imread(str(target))
    assert overlay.shape[1] == 512 and 32 < overlay.shape[0] < 512  # the 32 px part on a 512 px canvas, the banner below
    assert sorted(os.listdir(tmp_path / "heat")) == [target.name]  # no temporary left behind
    assert sink.wants(record) and not sink.wants(Record(**{**record.__dict__, "verdict": "ok"}))
    assert heatmap_name(Record(**{**record.__dict__, "kind": "frame", "frame_index": 7})) == f"frame-7-{record.id}.png"


def test_heatmap_replay_reads_the_file_again(line, tmp_path, model_dir):  # noqa: F811
    from edge_inspect.inspector import Inspector

    folder, ledger = line
    paths = sorted(folder.iterdir())
    sorted_away, changed = committed(ledger, paths[0], "ng"), committed(ledger, paths[1], "ng")
    (folder / "ng").mkdir()
    os.replace(paths[0], folder / "ng" / paths[0].name)
    sorted_away = Record(**{**sorted_away.__dict__, "sorted_path": str(folder / "ng" / paths[0].name)})
    paths[1].write_bytes(paths[2].read_bytes())  # other content under the name: no overlay from it
    inspector = Inspector.load(model_dir, anomaly_map=True)
    sink = HeatmapSink(tmp_path / "heat")
    updates = sink.replay([sorted_away, changed], inspector)
    target = tmp_path / "heat" / f"{paths[0].stem}-{sorted_away.id}.png"
    assert updates == {sorted_away.id: {"heatmap": str(target)}, changed.id: {}}
    assert cv2.imread(str(target)) is not None
    assert os.listdir(tmp_path / "heat") == [target.name]


def test_names_that_fill_name_max_still_fit_with_their_row_id():
    from edge_inspect.sinks.base import NAME_MAX, fit_name, safe_name, split_name

    long_utf8 = "é" * 127 + ".png"  # 258 bytes: over NAME_MAX once the id is added
    stem, suffix = split_name(long_utf8)
    name = fit_name(stem, f"-1234{suffix}")
    assert len(name.encode()) <= NAME_MAX and name.endswith("-1234.png") and name.startswith("é")
    name.encode("utf-8")  # cut at a character boundary: valid UTF-8
    escaped = safe_name(os.fsdecode(b"\xff" * 250 + b".jpg"))  # 750 bytes once escaped
    assert len(fit_name(*split_name(escaped)).encode()) <= NAME_MAX
    assert split_name("a." + "x" * 100) == ("a." + "x" * 100, "")  # no 100-byte 'suffix'
