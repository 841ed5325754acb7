"""What the runtime commands say about parts they would otherwise pass over in silence.

Sub-folders of a hot folder (`watch --recursive`, or a warning naming the
folder), and images far from the model's input (`input_note` in `predict
--json`, the ledger, the JSON lines and `results`, with one warning per
kind). `watch` runs as a real process on a real folder, stopped by SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_inspect.cli import app
from tests.runtime.conftest import model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.runtime.test_watch import WAIT_S, count, rows, wait_for, write_noted_parts
from tests.runtime.test_watch_crash import NotifySocket
from tests.support import write_parts

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
WARNED = "not as the model was trained"


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Log lines unwrapped, whatever COLUMNS was when the CLI module was imported."""
    from edge_inspect import cli

    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "width", 400)


class Watch:
    """`python -m edge_inspect watch ARGS` with its own notify socket and log file."""

    def __init__(self, args, log: Path):
        self.notify = NotifySocket()
        self.log = log
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.address, "COLUMNS": "400"}
        with open(log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_inspect", "watch", *map(str, args)], cwd=ROOT,
                                         env=env, stdout=out, stderr=out)
        try:
            self.notify.wait_for("READY=1")
        except AssertionError:
            self.proc.kill()
            raise AssertionError(f"watch never got ready: {log.read_text()[-3000:]}") from None

    def finish(self) -> str:
        """SIGTERM; the log, once the process exited 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=WAIT_S)
        finally:
            self.notify.close()
            if self.proc.poll() is None:
                self.proc.kill()
        text = self.log.read_text()
        assert code == 0, text[-3000:]
        return text


def test_predict_notes_colour_tiny_and_huge_images_and_warns_once_per_kind(model_dir, tmp_path):  # noqa: F811
    expected = write_noted_parts(tmp_path / "parts")
    result = runner.invoke(app, ["predict", "--model", str(model_dir), str(tmp_path / "parts"), "--json",
                                 "--batch-size", "2"])
    assert result.exit_code == 0, result.output + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {Path(line["source"]).name: line["input_note"] for line in lines} == expected
    assert all(line["verdict"] in ("ok", "ng") for line in lines)
    warned = [line for line in result.stderr.splitlines() if WARNED in line]
    assert len(warned) == 3, result.stderr  # colour, smaller, larger: once each, though two images are colour
    assert sum("colour" in line and "colour image (3 channels) converted to grey" in line for line in warned) == 1
    assert any("tiny.png is inspected" in line and "8x8 scaled up 4.0x to 32x32" in line for line in warned)
    assert any("huge.png is inspected" in line and "256x256 scaled down 8.0x to 32x32" in line for line in warned)


def test_watch_recursive_inspects_sub_folders_made_later_and_results_show_the_notes(model_dir, tmp_path):  # noqa: F811
    folder = tmp_path / "hot"
    write_parts(folder, 1, size=32, seed=50)
    write_parts(folder / "sub", 1, size=32, seed=51)
    results = tmp_path / "verdicts.jsonl"
    watch = Watch([folder, "--model", model_dir, "--recursive", "--sort", "--results", results, "--settle", "0.2"],
                  tmp_path / "watch.log")
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    try:
        wait_for(lambda: count(ledger_path) == 2, what="the backlog, sub-folder included")
        expected = write_noted_parts(folder / "cam2" / "today")  # two levels down, made while watching
        wait_for(lambda: count(ledger_path) == 2 + len(expected), what="the parts in the new sub-folders")
        wait_for(lambda: all(r["sinks_pending"] == "" for r in rows(ledger_path)), what="the sort and the lines")
    finally:
        log = watch.finish()
    assert "2 files waiting at start" in log
    assert "holds image files" not in log
    got = {Path(r["source"]).relative_to(folder).as_posix(): r for r in rows(ledger_path)}
    assert set(got) == {"part_00000.png", "sub/part_00000.png", *(f"cam2/today/{name}" for name in expected)}
    assert {name: got[f"cam2/today/{name}"]["input_note"] for name in expected} == expected
    assert Path(got["sub/part_00000.png"]["sorted_path"]).name == "sub~part_00000.png"
    assert Path(got["cam2/today/tiny.png"]["sorted_path"]).name == "cam2~today~tiny.png"
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert {Path(line["source"]).name: line["input_note"] for line in lines if "cam2" in line["source"]} == expected
    assert sum(WARNED in line for line in log.splitlines()) == 3, log

    shown = runner.invoke(app, ["results", str(folder), "--last", "20"])
    assert shown.exit_code == 0, shown.output + shown.stderr
    assert "Input notes (inspected, but not as the model was trained):" in shown.stdout
    tiny = got["cam2/today/tiny.png"]["id"]
    assert f"#{tiny} tiny.png: 8x8 scaled up 4.0x to 32x32" in shown.stdout
    assert "grey-as-colour.png:" not in shown.stdout


def test_watch_without_recursive_names_a_sub_folder_of_images_once(model_dir, tmp_path):  # noqa: F811
    """The observed case: hot/sub/part.jpeg was never inspected, and nothing said so."""
    folder = tmp_path / "hot"
    write_parts(folder, 2, size=32, seed=52)
    write_parts(folder / "sub", 2, size=32, seed=53, suffix=".jpeg")
    watch = Watch([folder, "--model", model_dir, "--settle", "0.2"], tmp_path / "watch.log")
    ledger_path = folder / ".edge-inspect" / "ledger.sqlite"
    try:
        wait_for(lambda: count(ledger_path) == 2, what="the two parts in the folder itself")
        write_parts(folder / "sub", 3, size=32, seed=54, suffix=".jpeg")  # more there: no second warning
    finally:
        log = watch.finish()
    warned = [line for line in log.splitlines() if "holds image files" in line]
    assert len(warned) == 1, log
    assert f"Hot folder {folder}: its sub-folder sub holds image files (part_0000" in warned[0]
    assert "--recursive" in warned[0] and "recursive = true" in warned[0]
    assert sorted(Path(r["source"]).name for r in rows(ledger_path)) == ["part_00000.png", "part_00001.png"]


def test_watch_recursive_refuses_a_camera(tmp_path):
    result = runner.invoke(app, ["watch", "--camera", "0", "--recursive", "--model", str(tmp_path / "m")])
    assert result.exit_code == 1 and "a camera has none. Drop --recursive." in result.stderr, result.stderr
