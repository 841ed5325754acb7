"""`edge-inspect watch` and `edge-inspect results` through typer's CliRunner."""

import csv
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edge_inspect.cli import app
from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.support import DEFECTS, make_part, write_parts

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Tables as wide as their content, whatever COLUMNS was when the CLI module was imported."""
    from edge_inspect import cli

    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "width", 200)


def _video(path: Path, frames: int) -> Path:
    """An MJPG video of synthetic parts, every third one defective."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    rng = np.random.default_rng(8)
    for i in range(frames):
        image = make_part(rng, size=32, defect=DEFECTS[i % len(DEFECTS)] if i % 3 == 0 else None)[0]
        writer.write(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def watched(model_dir, tmp_path_factory):  # noqa: F811
    """A camera watched to the end of its video file: (ledger path, results file, frames inspected)."""
    root = tmp_path_factory.mktemp("watched")
    video = _video(root / "line.avi", 12)
    ledger, results = root / "state" / "ledger.sqlite", root / "verdicts.jsonl"
    result = runner.invoke(app, ["watch", "--camera", str(video), "--model", str(model_dir), "--ledger", str(ledger),
                                 "--results", str(results), "--every", "2"])
    assert result.exit_code == 0, result.output + result.stderr
    return ledger, results, 6, result


def _counts(ledger):
    with sqlite3.connect(ledger) as conn:
        return dict(conn.execute("SELECT verdict, count(*) FROM parts GROUP BY verdict").fetchall())


def test_watch_a_camera_to_the_end_of_its_video(watched):
    ledger, results, frames, result = watched
    counts = _counts(ledger)
    assert sum(counts.values()) == frames
    assert len(results.read_text().splitlines()) == frames
    summary = f"{counts.get('ok', 0)} ok, {counts.get('ng', 0)} ng, {counts.get('error', 0)} error"
    assert summary in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "a folder to watch or --camera URI"),
    (["FOLDER", "--camera", "0"], "exactly one of them"),
    (["--camera", "0", "--sort"], "Drop --sort"),
    (["FOLDER", "--every", "3"], "do not apply to a folder"),
    (["FOLDER", "--results", "FOLDER/verdicts.jsonl"], "--results: FOLDER/verdicts.jsonl lies in the watched folder"),
    (["FOLDER", "--ledger", "FOLDER/ledger.sqlite"], "--ledger: FOLDER/ledger.sqlite lies in the watched folder"),
    (["FOLDER", "--heatmaps", "FOLDER"], "is the watched folder itself"),
    (["FOLDER/missing"], "does not exist"),
])
def test_watch_refuses_bad_settings_before_loading_anything(tmp_path, args, message):
    folder = tmp_path / "in"
    folder.mkdir()
    args = [a.replace("FOLDER", str(folder)) for a in args]
    result = runner.invoke(app, ["watch", *args, "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 1
    assert message.replace("FOLDER", str(folder)) in " ".join(result.stderr.split())
    assert not (folder / ".edge-inspect").exists()


def test_watch_a_missing_video_file_fails_at_once(model_dir, tmp_path):  # noqa: F811
    result = runner.invoke(app, ["watch", "--camera", str(tmp_path / "none.avi"), "--model", str(model_dir),
                                 "--ledger", str(tmp_path / "l.sqlite")])
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_files_the_watcher_writes_may_sit_where_the_hot_folder_does_not_look(tmp_path):
    from edge_inspect import config

    for allowed in (tmp_path / ".verdicts.jsonl", tmp_path / "logs" / "verdicts.jsonl", tmp_path / "v.jsonl.tmp"):
        config.validate({"sources": {"a": {"kind": "folder", "path": str(tmp_path), "model": "m",
                                           "sinks": {"results": str(allowed)}}}})


def test_results_counts_rate_and_last_parts(watched):
    ledger, _, frames, _ = watched
    counts = _counts(ledger)
    result = runner.invoke(app, ["results", "--ledger", str(ledger), "--last", "3"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"{frames} parts" in out
    decided = counts.get("ok", 0) + counts.get("ng", 0)
    assert f"{counts.get('ng', 0) / decided:.2%}" in out
    assert "Last 3 parts" in out
    with sqlite3.connect(ledger) as conn:
        last = [row[0] for row in conn.execute("SELECT frame_index FROM parts ORDER BY id DESC LIMIT 3")]
    for index in last:
        assert f"#{index}" in out


def test_results_of_a_watched_folder_argument(model_dir, tmp_path):  # noqa: F811
    """`results DIR` reads DIR/.edge-inspect/ledger.sqlite, where watch keeps it by default."""
    from edge_inspect.inspector import Inspector
    from edge_inspect.ledger import Ledger
    from edge_inspect.sources import FileItem
    from edge_inspect.watch import Watcher, default_ledger

    folder = tmp_path / "in"
    write_parts(folder, 3, size=32, seed=12)
    (folder / "bad.png").write_bytes(b"not an image")
    items = [FileItem(p, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())]
    with Ledger.open(default_ledger(folder)) as ledger:
        Watcher(items, Inspector.load(model_dir), ledger).run()
    result = runner.invoke(app, ["results", str(folder)])
    assert result.exit_code == 0, result.stderr
    assert "4 parts" in result.stdout and "bad.png" in result.stdout and "not a readable image" in result.stdout


def test_results_csv_export_and_since(watched, tmp_path):
    ledger, _, frames, _ = watched
    out = tmp_path / "verdicts.csv"
    result = runner.invoke(app, ["results", "--ledger", str(ledger), "--csv", str(out), "--last", "0"])
    assert result.exit_code == 0, result.stderr
    assert f"Wrote {frames} parts to {out}" in result.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with sqlite3.connect(ledger) as conn:
        expected = conn.execute("SELECT id, verdict, frame_index FROM parts ORDER BY id").fetchall()
    assert [(int(r["id"]), r["verdict"], int(r["frame_index"])) for r in rows] == expected
    assert {"score", "threshold", "criterion", "model_sha256", "latency_ms", "committed_at"} <= set(rows[0])
    future = runner.invoke(app, ["results", "--ledger", str(ledger), "--since", "2999-01-01", "--csv", str(out)])
    assert future.exit_code == 0 and "0 parts" in future.stdout
    with open(out, newline="") as handle:
        assert list(csv.reader(handle))[1:] == []


def test_results_errors(tmp_path, watched):
    ledger = watched[0]
    notes = tmp_path / "notes.txt"
    notes.write_text("shift log " * 100)
    result = runner.invoke(app, ["results", "--ledger", str(notes)])
    assert result.exit_code == 1 and "not an edge-inspect ledger" in result.stderr
    result = runner.invoke(app, ["results", str(tmp_path)])
    assert result.exit_code == 1 and "No ledger at" in result.stderr
    result = runner.invoke(app, ["results", str(tmp_path), "--ledger", str(ledger)])
    assert result.exit_code == 1 and "not both" in result.stderr
    result = runner.invoke(app, ["results", "--ledger", str(ledger), "--since", "last week"])
    assert result.exit_code == 1 and "not a time" in result.stderr
