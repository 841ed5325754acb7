"""The ledger on real SQLite files: schema, WAL, uniqueness, atomic batches, refusals, queries."""

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edge_inspect.errors import InputError
from edge_inspect.ledger import (
    COLUMNS,
    SCHEMA_VERSION,
    Ledger,
    Record,
    file_identity,
    frame_identity,
    parse_since,
)

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
    assert json.loads(rows[1]["criteria"]) == {"range": 0.4}
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
        with Ledger.open(path, create=False) as reader:
            assert reader.counts()["ok"] == 1
        writer.execute("ROLLBACK")
        writer.close()
    assert os.path.exists(path)
