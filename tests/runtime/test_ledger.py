"""The ledger on real SQLite files: schema, WAL, uniqueness, atomic batches, refusals, queries; and its faults:
names that are not UTF-8, a version-1 file, a file deleted or replaced under the writer, damaged pages, a
read-only file or mount."""

import csv
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edge_inspect.errors import InputError, LedgerDamagedError, LedgerGoneError
from edge_inspect.ledger import (
    COLUMNS,
    SCHEMA_VERSION,
    Ledger,
    Record,
    file_identity,
    frame_identity,
    parse_since,
    path_columns,
)
from edge_inspect.ledger_repair import check, recover

ROOT = Path(__file__).resolve().parents[2]


def make_record(n: int, verdict: str = "ok", *, committed_at: float | None = None, **extra) -> Record:
    """A file row as the watch pipeline writes it, for part ``n``."""
    now = time.time() if committed_at is None else committed_at
    path = f"/line/part_{n:05d}.png"
    sha = f"{n:064x}"
    fields = dict(identity=file_identity(path, 100 + n, 10**18 + n, sha), kind="file", source=path,
                  verdict=verdict, arrived_at=now - 0.05, committed_at=now, latency_ms=50.0, size=100 + n,
                  mtime_ns=10**18 + n, sha256=sha, score=None if verdict == "error" else 0.1 * n, threshold=1.0,
                  criterion="range", criteria=json.dumps({"range": 0.1 * n}), model_sha256="ab" * 32,
                  error="cut short" if verdict == "error" else None)
    fields.update(extra)
    return Record(**fields)


def test_schema_version_wal_and_full_sync(tmp_path):
    path = tmp_path / "state" / "ledger.sqlite"
    with Ledger.open(path) as ledger:
        assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    columns = [row[1] for row in raw.execute("PRAGMA table_info(parts)")]
    assert sorted(columns) == sorted(COLUMNS)
    unique = [row for row in raw.execute("PRAGMA index_list(parts)") if row[2]]
    unique_columns = {raw.execute(f"PRAGMA index_info({row[1]!r})").fetchone()[2] for row in unique}
    assert unique_columns == {"identity"}
    raw.close()


def test_a_second_verdict_for_an_identity_cannot_be_inserted(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        first, again, other = ledger.record([make_record(1), make_record(1, "ng"), make_record(2)])
        assert first.id is not None and again is None and other.id != first.id
        assert ledger.record([make_record(1)]) == [None]
        assert ledger.counts() == {"ok": 2, "ng": 0, "error": 0}
    # The constraint is in the file, not only in the code.
    raw = sqlite3.connect(tmp_path / "l.sqlite")
    with pytest.raises(sqlite3.IntegrityError):
        raw.execute("INSERT INTO parts (identity, kind, source, verdict, arrived_at, committed_at, latency_ms) "
                    "VALUES (?, 'file', 'x', 'ok', 0, 0, 0)", (first.identity,))


def test_identity_covers_content_and_kind():
    base = file_identity("/a/p.png", 10, 5, "00" * 32)
    assert base != file_identity("/a/p.png", 10, 5, "11" * 32)  # same name, new content
    assert base != file_identity("/a/p.png", 10, 6, "00" * 32)
    assert file_identity("/a/p.png", 10, 5, None) != base        # unread file
    assert frame_identity("0", 1.5, 3) != frame_identity("0", 1.5, 4) != frame_identity("1", 1.5, 4)


def test_a_batch_is_written_whole_or_not_at_all(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(InputError, match="Cannot write to the ledger"):
            ledger.record([make_record(1), make_record(2, verdict="maybe")])  # CHECK constraint fails
        assert ledger.counts() == {"ok": 0, "ng": 0, "error": 0}
        assert [r.id for r in ledger.record([make_record(1)])] == [1]


def test_committed_verdicts_survive_kill_9(tmp_path):
    """A writer killed with SIGKILL right after its commits: every committed row is there on reopening."""
    path = tmp_path / "l.sqlite"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tests.runtime.test_ledger import make_record
        from edge_inspect.ledger import Ledger
        ledger = Ledger.open({str(path)!r})
        n = 0
        while True:
            ledger.record([make_record(n), make_record(n + 1)])
            n += 2
            print(n, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in proc.stdout:
            if int(line) >= 40:
                committed = int(line)
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    with Ledger.open(path) as ledger:
        rows = list(ledger.rows())
    assert len(rows) >= committed and len(rows) % 2 == 0  # whole batches only
    assert len({r.identity for r in rows}) == len(rows)


def test_refuses_what_is_not_a_ledger(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database, but long enough to look like a header to SQLite " * 20)
    with pytest.raises(InputError, match="not an edge-inspect ledger"):
        Ledger.open(text)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE orders (id INTEGER)").connection.commit()
    with pytest.raises(InputError, match="not an edge-inspect ledger.*orders"):
        Ledger.open(other)
    newer = tmp_path / "newer.sqlite"
    with Ledger.open(newer):
        pass
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(InputError, match=f"schema version {SCHEMA_VERSION + 1}.*Upgrade edge-inspect"):
        Ledger.open(newer)
    with pytest.raises(InputError, match="No ledger at"):
        Ledger.open(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()
    with pytest.raises(InputError, match="is a folder"):
        Ledger.open(tmp_path)


def test_pending_sinks_and_finish(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        a, b, c = ledger.record([make_record(1, sinks_pending="sort jsonl"), make_record(2, sinks_pending="jsonl"),
                                 make_record(3)])
        assert [r.id for r in ledger.pending()] == [a.id, b.id]
        assert ledger.pending()[0].pending == {"sort", "jsonl"}
        ledger.finish_sinks({a.id: {"sinks_pending": "jsonl", "sorted_path": "/line/ok/part_00001.png"},
                             b.id: {"sinks_pending": ""}})
        assert [(r.id, r.sinks_pending) for r in ledger.pending()] == [(a.id, "jsonl")]
        assert ledger.get(a.id).sorted_path == "/line/ok/part_00001.png"
        assert ledger.get(c.id) == replace(c, sinks_pending="")
        with pytest.raises(ValueError):
            ledger.finish_sinks({a.id: {"verdict": "ng"}})
        assert ledger.seen_file("/line/part_00002.png", 102, 10**18 + 2)
        assert not ledger.seen_file("/line/part_00002.png", 103, 10**18 + 2)
        assert ledger.known(b.identity) and not ledger.known("file:-:0:0:/nowhere")


def test_counts_last_since_and_csv(tmp_path):
    now = time.time()
    verdicts = ["ok", "ng", "ok", "error", "ok", "ng"]
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.record([make_record(i, v, committed_at=now - 3600 * (len(verdicts) - i))
                       for i, v in enumerate(verdicts)])
        expected = {v: verdicts.count(v) for v in ("ok", "ng", "error")}
        assert ledger.counts() == expected
        recent = verdicts[-2:]
        assert ledger.counts(now - 2.5 * 3600) == {v: recent.count(v) for v in ("ok", "ng", "error")}
        last = ledger.last(3)
        assert [r.source for r in last] == [f"/line/part_{i:05d}.png" for i in (3, 4, 5)]
        n = ledger.write_csv(tmp_path / "out.csv", since=now - 3.5 * 3600)
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert n == len(rows) == 3
    assert [r["verdict"] for r in rows] == verdicts[-3:]
    assert rows[0]["error"] == "cut short" and rows[0]["score"] == ""
    assert "criteria" not in rows[0] and rows[1]["criteria.range"] == "0.4"  # one column per criterion
    assert "identity" not in rows[0] and rows[0]["id"] == "4"


def test_parse_since():
    now = 1_700_000_000.0
    assert parse_since("30m", now) == now - 1800
    assert parse_since("12h", now) == now - 12 * 3600
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("2024-05-01T08:00:00+00:00", now) == 1714550400.0
    midnight = parse_since("today", now)
    assert 0 <= now - midnight < 86400 and time.localtime(midnight)[3:6] == (0, 0, 0)
    with pytest.raises(InputError, match="not a time"):
        parse_since("yesterday", now)


def test_rows_are_readable_while_another_process_writes(tmp_path):
    """WAL: a reader (edge-inspect results) is not blocked by a writer's open transaction."""
    path = tmp_path / "l.sqlite"
    with Ledger.open(path) as ledger:
        ledger.record([make_record(1)])
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE parts SET error = 'x'")
        with Ledger.open(path, readonly=True) as reader:
            assert reader.counts()["ok"] == 1
        writer.execute("ROLLBACK")
        writer.close()
    assert os.path.exists(path)


# ------------------------------------------------------------------ helpers for the faults

#: A file name whose bytes are not UTF-8, as Python hands it over (lone surrogates, via surrogateescape).
ODD_NAME = os.fsdecode(b"bad\xff\xfe.jpeg")
#: The text the ledger shows for it, which is also a perfectly valid name of its own.
ODD_TEXT = "bad\\xff\\xfe.jpeg"


def file_record(path: Path, verdict: str = "ok", **extra) -> Record:
    """The row the watch pipeline writes for a real file: its identity from its stat and bytes."""
    import hashlib

    st = os.stat(path)
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    now = time.time()
    fields = dict(identity=file_identity(path, st.st_size, st.st_mtime_ns, sha), kind="file", source=str(path),
                  verdict=verdict, arrived_at=now - 0.05, committed_at=now, latency_ms=50.0, size=st.st_size,
                  mtime_ns=st.st_mtime_ns, sha256=sha, score=0.5, threshold=1.0, criterion="range")
    fields.update(extra)
    return Record(**fields)


def fill(path: Path, n: int, batch: int = 500) -> dict[int, Record]:
    """A closed ledger of ``n`` rows (every 5th ng, every 7th with the jsonl sink pending, every 11th with an
    input note); returns id -> row."""
    written = {}
    with Ledger.open(path) as ledger:
        for start in range(0, n, batch):
            rows = ledger.record([make_record(i, "ng" if i % 5 == 0 else "ok",
                                              sinks_pending="jsonl" if i % 7 == 0 else "",
                                              input_note="colour image (3 channels) converted to grey"
                                              if i % 11 == 0 else None)
                                  for i in range(start, min(n, start + batch))])
            written.update((r.id, r) for r in rows)
    assert not Path(f"{path}-wal").exists()  # checkpointed at close: the file's pages hold every row
    return written


def pages(path: Path) -> tuple[int, list[int]]:
    """The page size and each page's b-tree type: 0x0D table leaf, 0x05 table interior, 0x0A/0x02 index."""
    data = Path(path).read_bytes()
    size = int.from_bytes(data[16:18], "big")
    return size, [data[i * size + (100 if i == 0 else 0)] for i in range(len(data) // size)]


def overwrite_pages(path: Path, numbers, seed: int = 0) -> None:
    """Overwrite whole pages (numbered from 0) with seeded random bytes, in place, as a failing card would."""
    size, _ = pages(path)
    rng = random.Random(seed)
    with open(path, "r+b") as handle:
        for number in numbers:
            handle.seek(number * size)
            handle.write(rng.randbytes(size))
        handle.flush()
        os.fsync(handle.fileno())


def table_leaves(path: Path) -> list[int]:
    """The pages holding rows of ``parts`` (the only table with rows beyond page 0, sqlite_master)."""
    return [i for i, kind in enumerate(pages(path)[1]) if kind == 0x0D and i > 0]


def rightmost_leaf(path: Path) -> int:
    """The page holding the highest ids: the right-most child of the table's root (an interior page here)."""
    with sqlite3.connect(path) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'parts'").fetchone()[0] - 1
    conn.close()
    data = Path(path).read_bytes()
    size = int.from_bytes(data[16:18], "big")
    assert data[root * size] == 0x05, "expected an interior root: fill more rows"
    return int.from_bytes(data[root * size + 8:root * size + 12], "big") - 1


#: The schema edge-inspect wrote as version 1, before source_raw and sink_error.
V1_SCHEMA = """
CREATE TABLE parts (
    id INTEGER PRIMARY KEY, identity TEXT NOT NULL UNIQUE, kind TEXT NOT NULL CHECK (kind IN ('file', 'frame')),
    source TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, sha256 TEXT, frame_index INTEGER, frame_time REAL,
    verdict TEXT NOT NULL CHECK (verdict IN ('ok', 'ng', 'error')), score REAL, threshold REAL, criterion TEXT,
    criteria TEXT, model_sha256 TEXT, error TEXT, arrived_at REAL NOT NULL, read_at REAL, inspected_at REAL,
    committed_at REAL NOT NULL, latency_ms REAL NOT NULL, batch_size INTEGER,
    sinks_pending TEXT NOT NULL DEFAULT '', sorted_path TEXT, heatmap TEXT
);
CREATE INDEX parts_file ON parts (source, size, mtime_ns);
CREATE INDEX parts_committed ON parts (committed_at);
CREATE INDEX parts_pending ON parts (id) WHERE sinks_pending != '';
PRAGMA user_version = 1;
"""


def write_v1_ledger(path: Path, records: list[Record]) -> None:
    """A ledger as edge-inspect wrote it with schema version 1, in WAL mode."""
    columns = [c for c in COLUMNS if c not in ("id", "source_raw", "sink_error", "polarity", "input_note")]
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_SCHEMA)
    conn.executemany(f"INSERT INTO parts ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                     [tuple(getattr(r, c) for c in columns) for r in records])
    conn.commit()
    conn.close()


# ------------------------------------------------------------------ names that are not UTF-8


def test_path_columns_and_identities_for_any_name():
    assert path_columns("/line/part.png") == ("/line/part.png", None)
    assert path_columns(b"/line/caf\xc3\xa9.png") == ("/line/café.png", None)
    odd = f"/line/{ODD_NAME}"
    assert path_columns(odd) == (f"/line/{ODD_TEXT}", b"/line/bad\xff\xfe.jpeg")
    assert path_columns(os.fsencode(odd)) == path_columns(odd) == path_columns(Path(odd))
    # A UTF-8 name keeps the version-1 identity: rows written before the upgrade are still known.
    assert file_identity("/a/p.png", 10, 5, "00" * 32) == f"file:{'00' * 32}:10:5:/a/p.png"
    identities = {file_identity(p, 10, 5, "00" * 32) for p in (odd, f"/line/{ODD_TEXT}", "/line/bad\udcff.jpeg",
                                                                 "/line/bad\ud800.jpeg")}
    assert len(identities) == 4  # the byte 0xff and the four characters \xff are different names
    for identity in identities:
        identity.encode("utf-8")  # storable as SQLite text
    assert file_identity(os.fsencode(odd), 10, 5, None) == file_identity(odd, 10, 5, None)


def test_a_file_name_that_is_not_utf8_gets_one_verdict_and_is_recognised(tmp_path):
    odd = tmp_path / ODD_NAME
    odd.write_bytes(b"not an image")
    twin = tmp_path / ODD_TEXT  # the name SQLite shows for the odd one: must not pass for it
    twin.write_bytes(b"not an image")
    os.utime(twin, ns=(odd.stat().st_atime_ns, odd.stat().st_mtime_ns))
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        (stored,) = ledger.record([file_record(odd, "error", error=f"{odd.name}: not a readable image",
                                               sinks_pending="jsonl")])
        assert stored.source == str(tmp_path / ODD_TEXT) and stored.source_raw == os.fsencode(odd)
        assert stored.path == odd and stored.path.read_bytes() == b"not an image"
        assert stored.error == f"{ODD_TEXT}: not a readable image"
        assert ledger.get(stored.id) == stored
        assert ledger.known(file_record(odd).identity)
        assert ledger.seen_file(odd, stored.size, stored.mtime_ns)
        assert ledger.seen_file(os.fsencode(odd), stored.size, stored.mtime_ns)
        assert not ledger.known(file_record(twin).identity)
        assert not ledger.seen_file(twin, stored.size, stored.mtime_ns)
        (other,) = ledger.record([file_record(twin)])
        assert other is not None and other.source_raw is None and other.path == twin
        assert ledger.seen_file(twin, stored.size, stored.mtime_ns)
        assert ledger.record([file_record(odd, "ok")]) == [None]  # still one verdict per part

        line = stored.to_dict()
        assert "source_raw" not in line and line["sink_error"] is None and line["source"] == stored.source
        assert json.loads(json.dumps(line))["error"] == f"{ODD_TEXT}: not a readable image"
        assert ledger.write_csv(tmp_path / "out.csv") == 2
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert "source_raw" not in rows[0] and "sink_error" in rows[0]
    assert [r["source"] for r in rows] == [str(tmp_path / ODD_TEXT)] * 2
    raw = sqlite3.connect(tmp_path / "l.sqlite")
    assert raw.execute("SELECT source_raw FROM parts ORDER BY id").fetchall() == [(os.fsencode(odd),), (None,)]
    raw.close()


def test_any_text_with_lone_surrogates_is_stored_and_sink_errors_are_kept(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        frame = ledger.record([Record(identity=frame_identity("rtsp://cam/\udcff", 1.5, 3), kind="frame",
                                      source="rtsp://cam/\udcff", verdict="error", arrived_at=1.0, committed_at=2.0,
                                      latency_ms=1e3, error="odd \ud800 text", criteria='{"range": 1}')])[0]
        assert (frame.source, frame.error, frame.source_raw) == ("rtsp://cam/\\xff", "odd \\ud800 text", None)
        assert ledger.known(frame_identity("rtsp://cam/\udcff", 1.5, 3))
        ledger.finish_sinks({frame.id: {"sinks_pending": "sort", "sink_error": f"cannot move {ODD_NAME}: EROFS"}})
        again = ledger.get_many([frame.id])[0]
        assert again.sink_error == f"cannot move {ODD_TEXT}: EROFS" and again.pending == {"sort"}
        assert ledger.pending() == [again]
        with pytest.raises(ValueError, match="only sinks_pending, sorted_path, heatmap, sink_error"):
            ledger.finish_sinks({frame.id: {"error": "x"}})


def test_get_many_in_id_order(tmp_path):
    written = fill(tmp_path / "l.sqlite", 1200)
    with Ledger.open(tmp_path / "l.sqlite", readonly=True) as ledger:
        wanted = [1100, 3, 999, 3, 5000, 600]
        assert ledger.get_many(wanted) == [written[i] for i in (3, 600, 999, 1100)]
        assert ledger.get_many([]) == []
        assert [r.id for r in ledger.get_many(range(1, 1201))] == list(range(1, 1201))  # more than one chunk


# ------------------------------------------------------------------ version 1


def test_a_version_1_ledger_is_migrated_in_place_with_its_rows(tmp_path, caplog):
    path = tmp_path / "l.sqlite"
    old = [make_record(1), make_record(2, "ng", sinks_pending="sort"), make_record(3, "error")]
    write_v1_ledger(path, old)
    expected = [replace(r, id=i) for i, r in enumerate(old, 1)]

    # Read-only (edge-inspect results): read as it is, not migrated.
    with Ledger.open(path, readonly=True) as ledger:
        assert list(ledger.rows()) == expected
        assert ledger.seen_file(old[0].source, old[0].size, old[0].mtime_ns)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1

    with caplog.at_level("INFO", logger="edge_inspect.ledger"), Ledger.open(path) as ledger:
        assert list(ledger.rows()) == expected
        assert [r.id for r in ledger.pending()] == [2]
        assert all(ledger.known(r.identity) for r in old)  # identities unchanged: nothing inspected twice
        odd = tmp_path / ODD_NAME
        odd.write_bytes(b"x")
        (new,) = ledger.record([file_record(odd)])
        assert new.id == 4 and ledger.get(4).path == odd
        ledger.finish_sinks({2: {"sinks_pending": "", "sink_error": None, "sorted_path": "/line/ng/part_2.png"}})
    assert "upgraded from version 1 to 4" in caplog.text
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert sorted(row[1] for row in raw.execute("PRAGMA table_info(parts)")) == sorted(COLUMNS)
    assert raw.execute("SELECT count(*) FROM parts").fetchone()[0] == 4
    raw.close()


def test_a_version_3_ledger_gains_input_note_in_place_and_keeps_its_rows(tmp_path, caplog):
    """Version 4 added the input note: a version-3 ledger (as the last release wrote it) keeps every row."""
    path = tmp_path / "l.sqlite"
    old = [make_record(1), make_record(2, "ng", sinks_pending="jsonl"), make_record(3, "error")]
    with Ledger.open(path) as ledger:
        ledger.record(old)
    raw = sqlite3.connect(path)
    for column in ("polarity", "input_note"):
        raw.execute(f"ALTER TABLE parts DROP COLUMN {column}")
    raw.execute("PRAGMA user_version = 3")
    raw.commit()
    raw.close()
    expected = [replace(r, id=i) for i, r in enumerate(old, 1)]

    with Ledger.open(path, readonly=True) as ledger:  # edge-inspect results: read as it is, the note NULL
        assert list(ledger.rows()) == expected
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3

    note = "1024x1024 scaled down 32.0x to 32x32"
    with caplog.at_level("INFO", logger="edge_inspect.ledger"), Ledger.open(path) as ledger:
        assert list(ledger.rows()) == expected
        assert all(ledger.known(r.identity) for r in old)
        (new,) = ledger.record([make_record(4, input_note=note)])
        assert ledger.get(new.id).input_note == note and ledger.get(1).input_note is None
        assert new.to_dict()["input_note"] == note
        assert [r.id for r in ledger.pending()] == [2]
    assert "upgraded from version 3 to 4" in caplog.text
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT id, input_note FROM parts ORDER BY id").fetchall() == [
        (1, None), (2, None), (3, None), (4, note)]
    raw.close()


# ------------------------------------------------------------------ the file deleted or replaced


def test_a_deleted_ledger_takes_no_write(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger.open(path) as ledger:
        (first,) = ledger.record([make_record(1, sinks_pending="jsonl")])
        os.unlink(path)
        with pytest.raises(LedgerGoneError, match=r"l\.sqlite was deleted or renamed while the watcher was running.*"
                                                  r"inspected again; nothing was written\. Move the ledger back"
                                                  ) as caught:
            ledger.record([make_record(2)])
        assert isinstance(caught.value, InputError) and str(path) in str(caught.value)
        with pytest.raises(LedgerGoneError):
            ledger.finish_sinks({first.id: {"sinks_pending": ""}})
        # The connection still reads the deleted file: nothing went into it.
        assert ledger.counts()["ok"] == 1 and [r.id for r in ledger.pending()] == [first.id]
    assert not path.exists()


def test_a_renamed_ledger_takes_no_write_and_moved_back_has_every_verdict(tmp_path):
    path, moved = tmp_path / "l.sqlite", tmp_path / "moved.sqlite"
    with Ledger.open(path) as ledger:
        ledger.record([make_record(1)])
        os.rename(path, moved)
        with pytest.raises(LedgerGoneError, match="deleted or renamed.*leaving l.sqlite-wal where it is"):
            ledger.record([make_record(2)])
    os.rename(moved, path)  # its log waited at the old name
    with Ledger.open(path) as ledger:
        assert [r.identity for r in ledger.rows()] == [make_record(1).identity]
        assert ledger.record([make_record(2)])[0].id == 2


def test_a_replaced_ledger_takes_no_write_and_its_log_stays_out_of_the_new_file(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger.open(tmp_path / "backup.sqlite") as backup:
        backup.record([make_record(7)])
    with Ledger.open(path) as ledger:
        ledger.record([make_record(1)])
        os.replace(tmp_path / "backup.sqlite", path)
        with pytest.raises(LedgerGoneError, match="l.sqlite was replaced by another file.*nothing was written"):
            ledger.record([make_record(2)])
    # The old file's log (row 1) was set aside at close: SQLite would have replayed it into the new file.
    assert check(path) == []
    with Ledger.open(path, readonly=True) as now:
        assert [r.identity for r in now.rows()] == [make_record(7).identity]
    assert [p.name.split("-")[-1] for p in sorted(tmp_path.glob("l.sqlite.replaced-*"))] == ["shm", "wal"]


# ------------------------------------------------------------------ damaged files


def test_a_damaged_ledger_is_refused_at_open_and_left_as_it_is(tmp_path):
    path = tmp_path / "l.sqlite"
    fill(path, 3000)
    leaves = table_leaves(path)
    overwrite_pages(path, leaves[len(leaves) // 2:len(leaves) // 2 + 2])
    damaged = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(LedgerDamagedError, match=rf"{path} is damaged: SQLite reports 'database disk image is "
                                                     rf"malformed'\. Nothing was changed.*edge-inspect ledger "
                                                     rf"recover {path} ") as caught:
            Ledger.open(path, readonly=readonly)
        assert isinstance(caught.value, InputError)
    assert path.read_bytes() == damaged


def test_a_damaged_first_page_is_damage_not_a_foreign_file(tmp_path):
    """Page 0 holds the list of tables: with it overwritten (header kept), the file is a damaged ledger."""
    path = tmp_path / "l.sqlite"
    fill(path, 500)
    data = bytearray(path.read_bytes())
    data[100:pages(path)[0]] = random.Random(3).randbytes(pages(path)[0] - 100)
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerDamagedError, match="is damaged.*edge-inspect ledger recover"):
        Ledger.open(path, create=False)
    assert check(path) != []
    with pytest.raises(InputError, match="too damaged to recover.*Nothing was changed"):
        recover(path)
    assert path.read_bytes() == bytes(data)
    assert not list(tmp_path.glob("*.damaged-*"))


def test_reads_on_a_ledger_damaged_after_open_raise_a_clear_error(tmp_path):
    """Pages go bad under an open ledger: every query says so, none leaks a raw sqlite3 error."""
    path = tmp_path / "l.sqlite"
    written = fill(path, 20000, batch=2000)  # more pages than SQLite's page cache holds
    with Ledger.open(path) as ledger:
        kinds = pages(path)[1]
        overwrite_pages(path, table_leaves(path)[10:12] + [i for i, k in enumerate(kinds) if k == 0x0A])
        probe = written[15]
        for query in (ledger.counts, ledger.pending, lambda: list(ledger.rows()),
                      lambda: ledger.get_many(range(1, 3000)), lambda: ledger.known(probe.identity),
                      lambda: ledger.seen_file(probe.source, probe.size, probe.mtime_ns),
                      lambda: ledger.write_csv(tmp_path / "out.csv")):
            with pytest.raises(LedgerDamagedError, match="is damaged.*Nothing was changed.*ledger recover"):
                query()


def test_check_finds_nothing_in_a_healthy_ledger_and_refuses_what_is_not_one(tmp_path):
    fill(tmp_path / "l.sqlite", 300)
    assert check(tmp_path / "l.sqlite") == []
    notes = tmp_path / "notes.txt"
    notes.write_text("shift log " * 200)
    with pytest.raises(InputError, match="not an edge-inspect ledger"):
        check(notes)
    with pytest.raises(InputError, match="No ledger at"):
        check(tmp_path / "missing.sqlite")
    with pytest.raises(InputError, match="healthy.*nothing to recover, and nothing was changed"):
        recover(tmp_path / "l.sqlite")
    assert sorted(p.name for p in tmp_path.iterdir() if "damaged" in p.name) == []


def test_recover_salvages_every_readable_row_and_keeps_the_damaged_file(tmp_path):
    path = tmp_path / "l.sqlite"
    written = fill(path, 3000)
    leaves = table_leaves(path)
    overwrite_pages(path, leaves[len(leaves) // 2:len(leaves) // 2 + 2])
    damaged_bytes = path.read_bytes()
    problems = check(path)
    assert problems and all(isinstance(p, str) for p in problems)

    report = recover(path)
    assert report.path == path and report.problems == tuple(problems)
    assert report.damaged.parent == tmp_path and report.damaged.name.startswith("l.sqlite.damaged-")
    assert report.damaged.read_bytes() == damaged_bytes
    lost = report.lost
    assert report.salvaged + len(lost) == 3000
    assert 0 < len(lost) < 60 and lost == tuple(range(lost[0], lost[-1] + 1))  # two adjacent pages of rows
    assert report.lost_sources == {i: written[i].source for i in lost}  # named by the intact file index

    assert check(path) == []
    with Ledger.open(path) as ledger:
        rows = list(ledger.rows())
        assert [r.id for r in rows] == [i for i in written if i not in lost]
        assert all(r == written[r.id] for r in rows)  # ids, verdicts, pending sinks: all as they were
        assert [r.id for r in ledger.pending()] == [i for i, r in written.items() if r.sinks_pending and i not in lost]
        assert not ledger.known(written[lost[0]].identity)  # inspected again if still in the folder
        assert ledger.known(written[lost[-1] + 1].identity)
        assert ledger.record([make_record(9999)])[0].id == 3001
    with pytest.raises(LedgerDamagedError):
        Ledger.open(report.damaged, readonly=True)


def test_recover_when_the_highest_ids_are_lost(tmp_path):
    """The table's right-most page is gone, so max(id) fails: the indexes still say which ids existed."""
    path = tmp_path / "l.sqlite"
    written = fill(path, 3000)
    overwrite_pages(path, [rightmost_leaf(path)], seed=5)
    report = recover(path)
    assert report.lost and report.lost[-1] == 3000
    assert report.salvaged + len(report.lost) == 3000
    assert report.lost == tuple(range(report.lost[0], 3001))
    with Ledger.open(path) as ledger:
        assert [r.id for r in ledger.rows()] == list(range(1, report.lost[0]))
        assert ledger.record([make_record(9999)])[0].id == report.lost[0]  # lost ids are free again
    assert all(written[i].source == report.lost_sources[i] for i in report.lost)


# ------------------------------------------------------------------ read-only


def test_a_ledger_on_a_read_only_mount_is_refused_for_writing_and_read_read_only(tmp_path):
    from tests.support.mounts import tmpfs

    with tmpfs(tmp_path / "card") as (card, make_read_only):
        path = card / "ledger.sqlite"
        written = fill(path, 50)
        make_read_only()
        with pytest.raises(InputError, match=rf"Ledger {path} cannot be written \(SQLite says: .*\)\. .*chmod, chown"
                                             rf".*folder {card} as well.*ledger\.sqlite-wal and ledger\.sqlite-shm"):
            Ledger.open(path)
        with Ledger.open(path, readonly=True) as ledger:
            assert list(ledger.rows()) == list(written.values())
            assert ledger.counts() == {"ok": 40, "ng": 10, "error": 0}
            with pytest.raises(InputError, match="opened read-only"):
                ledger.record([make_record(99)])
        assert check(path) == []
        assert sorted(p.name for p in card.iterdir()) == ["ledger.sqlite"]


def test_a_ledger_another_user_cannot_write_is_refused_at_open(tmp_path):
    """As ``nobody``: the file and folder belong to root (root ignores file modes, so the test needs a real user)."""
    from tests.support.users import run_as_nobody

    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    path = folder / "ledger.sqlite"
    fill(path, 5)
    code = textwrap.dedent(f"""
        from edge_inspect.errors import InputError
        from edge_inspect.ledger import Ledger
        try:
            Ledger.open({str(path)!r})
        except InputError as exc:
            print("refused:", exc)
        with Ledger.open({str(path)!r}, readonly=True) as ledger:
            print("read:", sum(ledger.counts().values()))
    """)
    with Ledger.open(path) as watcher:  # a watcher holds it open: its -wal and -shm exist
        watcher.record([make_record(5)])
        done = run_as_nobody(code, reach=(path,))
    assert done.returncode == 0, done.stderr
    assert f"refused: Ledger {path} cannot be written" in done.stdout and "chmod, chown" in done.stdout
    assert "read: 6" in done.stdout
    # Closed cleanly, no -shm: a reader that cannot create one is told why.
    done = run_as_nobody(code, reach=(path,))
    assert f"Cannot open the ledger {path} for reading" in done.stderr and "-shm" in done.stderr


def test_recover_a_file_cut_short(tmp_path):
    """The second half of the file gone: the rows in the first half are saved, and the report says that how
    many rows followed is unknown (the table's last pages and the indexes went with it)."""
    path = tmp_path / "l.sqlite"
    written = fill(path, 3000)
    size = pages(path)[0]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 // size * size])
    report = recover(path)
    assert 0 < report.salvaged < 3000 and report.unknown_from is not None
    with Ledger.open(path) as ledger:
        rows = list(ledger.rows())
    assert all(r == written[r.id] for r in rows) and len(rows) == report.salvaged
    assert sorted({r.id for r in rows} | set(report.lost)) == list(range(1, report.unknown_from))
    assert report.damaged.read_bytes() == data[:len(data) // 2 // size * size]


def test_retention_never_drops_a_row_a_network_sink_has_not_had(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        rows = ledger.record([make_record(k) for k in range(6)])
        assert ledger.cursor("mqtt", start_at="start") == 0
        ledger.advance("mqtt", rows[2].id)
        assert ledger.drop([r.id for r in rows]) == 3  # up to the cursor; never the last row either
        assert [r.id for r in ledger.after(0, 10)] == [r.id for r in rows[3:]]
        ledger.advance("mqtt", rows[1].id)  # a cursor never moves back
        assert ledger.cursor("mqtt") == rows[2].id
        assert ledger.undelivered(rows[2].id)[0] == 3
