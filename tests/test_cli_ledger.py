"""`edge-inspect ledger check|recover`, and `edge-inspect results` on damaged and read-only ledgers (CliRunner)."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_inspect.cli import app
from edge_inspect.errors import InputError
from edge_inspect.ledger import Ledger
from edge_inspect.watch import default_ledger
from tests.runtime.test_ledger import fill, overwrite_pages, table_leaves

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Messages on one line each, whatever COLUMNS was when the CLI module was imported."""
    from edge_inspect import cli

    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "width", 400)


@pytest.fixture
def damaged(tmp_path):
    """A watched folder whose ledger has 3000 rows and two pages of them overwritten: (folder, ledger, rows)."""
    folder = tmp_path / "parts"
    folder.mkdir()
    path = default_ledger(folder)
    written = fill(path, 3000)
    leaves = table_leaves(path)
    overwrite_pages(path, leaves[len(leaves) // 2:len(leaves) // 2 + 2])
    return folder, path, written


def test_check_a_healthy_ledger_by_its_folder(tmp_path):
    folder = tmp_path / "parts"
    fill(default_ledger(folder), 40)
    result = runner.invoke(app, ["ledger", "check", str(folder)])
    assert result.exit_code == 0, result.output
    assert f"Ledger {default_ledger(folder)} is healthy: 40 parts (32 ok, 8 ng, 0 error)." in result.stdout


def test_check_and_results_on_a_damaged_ledger(damaged):
    folder, path, _ = damaged
    before = path.read_bytes()
    result = runner.invoke(app, ["ledger", "check", str(folder)])
    assert result.exit_code == 2, result.output
    assert f"Ledger {path} is damaged: SQLite's integrity check reports" in result.stdout
    assert "malformed" in result.stdout or "Page" in result.stdout
    assert f"edge-inspect ledger recover {path}" in result.stdout

    result = runner.invoke(app, ["results", str(folder)])
    assert result.exit_code == 1
    assert result.stdout == ""  # no counts from a damaged file
    assert result.stderr.startswith(f"Error: Ledger {path} is damaged: SQLite reports 'database disk image is "
                                    "malformed'. Nothing was changed.")
    assert f"edge-inspect ledger recover {path}" in result.stderr and "Traceback" not in result.output
    assert path.read_bytes() == before


def test_recover_then_check_and_results(damaged):
    folder, path, written = damaged
    result = runner.invoke(app, ["ledger", "recover", str(folder)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    match = re.search(r"(\d+) parts salvaged, (\d+) lost\.", out)
    assert match and int(match[1]) + int(match[2]) == 3000 and 0 < int(match[2]) < 60
    first, last = map(int, re.search(r"Lost rows \(ids\): (\d+)-(\d+)\.", out).groups())
    assert last - first + 1 == int(match[2])
    assert f"#{first} {written[first].source}" in out
    assert "inspected again at the next start" in out
    kept = re.search(r"The damaged file is kept as (\S+) ", out)[1]
    assert kept.startswith(f"{path}.damaged-")

    assert runner.invoke(app, ["ledger", "check", str(path)]).exit_code == 0
    result = runner.invoke(app, ["results", str(folder), "--last", "1"])
    assert result.exit_code == 0, result.output
    assert f"{match[1]} parts" in result.stdout
    assert Path(kept).is_file()
    with Ledger.open(path, readonly=True) as ledger:
        assert ledger.get(first) is None and ledger.get(last + 1) == written[last + 1]


def test_ledger_command_errors(tmp_path):
    fill(tmp_path / "l.sqlite", 10)
    result = runner.invoke(app, ["ledger", "recover", str(tmp_path / "l.sqlite")])
    assert result.exit_code == 1 and "is healthy" in result.stderr and "nothing to recover" in result.stderr
    assert [p.name for p in tmp_path.iterdir() if "damaged" in p.name] == []
    result = runner.invoke(app, ["ledger", "check", str(tmp_path / "missing.sqlite")])
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: No ledger at {tmp_path / 'missing.sqlite'}")
    notes = tmp_path / "notes.txt"
    notes.write_text("shift log " * 100)
    for command in ("check", "recover"):
        result = runner.invoke(app, ["ledger", command, str(notes)])
        assert result.exit_code == 1 and "not an edge-inspect ledger" in result.stderr
    assert notes.read_text() == "shift log " * 100


def test_results_and_check_read_a_ledger_on_a_read_only_mount(tmp_path):
    from tests.support.mounts import tmpfs

    with tmpfs(tmp_path / "card") as (card, make_read_only):
        path = card / "ledger.sqlite"
        fill(path, 25)
        make_read_only()
        result = runner.invoke(app, ["results", "--ledger", str(path), "--last", "2"])
        assert result.exit_code == 0, result.output
        assert "25 parts" in result.stdout and "Last 2 parts" in result.stdout
        result = runner.invoke(app, ["ledger", "check", str(path)])
        assert result.exit_code == 0 and "is healthy: 25 parts" in result.stdout
        with pytest.raises(InputError, match="cannot be written"):  # what watch would meet: refused at open
            Ledger.open(path)
