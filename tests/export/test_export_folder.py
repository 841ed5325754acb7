"""What an export does to the folders around it: the backup of an earlier export, the default precision,
and the record that lets calibrate name the model folders a new threshold has not reached."""

import datetime as dt
import hashlib
import json
import re
import shlex
import shutil

import pytest
from typer.testing import CliRunner

from edge_inspect.calibrate import load_calibration
from edge_inspect.card import load_card
from edge_inspect.cli import app
from edge_inspect.errors import ConfigError
from export.run_folder import RunFolder
from export.to_onnx import _replace, backup_path, export_run
from tests.runtime.conftest import conv_ae_run, tiny_base  # noqa: F401  (shared fixtures)

runner = CliRunner()


def _words(text: str) -> str:
    """The output with the terminal's line wrapping undone."""
    return " ".join(text.split())


def _contents(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_export_over_a_model_folder_keeps_the_old_one_as_a_dated_backup(conv_ae_run, tmp_path):  # noqa: F811
    out = tmp_path / "models" / "m"
    first = runner.invoke(app, ["export", str(conv_ae_run), "--out", str(out)])
    assert first.exit_code == 0, first.stderr
    assert "Kept the previous" not in first.stdout and sorted(p.name for p in out.parent.iterdir()) == ["m"]
    before = _contents(out)
    second = runner.invoke(app, ["export", str(conv_ae_run), "--out", str(out), "--precision", "int8", "--force"])
    assert second.exit_code == 0, second.stderr
    backups = [p for p in out.parent.iterdir() if p != out]
    assert len(backups) == 1 and re.fullmatch(r"m\.\d{4}-\d\d-\d\dT\d{6}", backups[0].name), backups
    assert _contents(backups[0]) == before  # the earlier export, whole
    assert load_card(out).precisions == ["fp32", "int8"]
    said = _words(second.stdout)
    assert f"Kept the previous model folder as {backups[0]}; remove it when no longer needed: " \
           f"rm -r {backups[0]}" in said


def test_backup_names_sort_in_time_and_never_collide(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    now = dt.datetime(2026, 11, 29, 14, 25, 1)
    first = backup_path(out, now)
    assert first == tmp_path / "m.2026-11-29T142501"
    first.mkdir()
    second = backup_path(out, now)  # a second export within the same second
    assert second == tmp_path / "m.2026-11-29T142501-2"
    later = backup_path(out, now + dt.timedelta(seconds=1))
    assert sorted([later.name, second.name, first.name]) == [first.name, second.name, later.name]


def test_a_failing_export_leaves_the_old_folder_in_place_and_intact(conv_ae_run, tmp_path, monkeypatch):  # noqa: F811
    import export.parity as parity

    out = tmp_path / "m"
    export_run(conv_ae_run, out)
    before = _contents(out)
    # int8 refused after the fp32 graph is already in the temporary folder: the export fails midway
    monkeypatch.setattr(parity, "MIN_AGREEMENT", 1.01)
    with pytest.raises(ConfigError, match="Nothing was written"):
        export_run(conv_ae_run, out, precisions=["int8"])
    assert _contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no backup, no temporary folder


def test_the_old_folder_comes_back_when_the_new_one_cannot_take_its_place(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.json").write_text("old")
    with pytest.raises(FileNotFoundError):
        _replace(tmp_path / ".m.tmp-gone", out)  # the second rename fails, after the first moved the old folder
    assert (out / "model.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_int8_is_the_default_precision_only_when_asked(conv_ae_run, tmp_path):  # noqa: F811
    from edge_inspect.inspector import Inspector

    result = runner.invoke(app, ["export", str(conv_ae_run), "--out", str(tmp_path / "a"), "--precision", "int8",
                                 "--force"])
    assert result.exit_code == 0, result.stderr
    assert load_card(tmp_path / "a").default_precision == "fp32"
    assert Inspector.load(tmp_path / "a", device="cpu").precision == "fp32"
    said = _words(result.stdout)
    assert "Default precision: fp32" in said and "make int8 the default with --default-precision" in said

    result = runner.invoke(app, ["export", str(conv_ae_run), "--out", str(tmp_path / "b"), "--precision", "int8",
                                 "--force", "--default-precision", "int8"])
    assert result.exit_code == 0, result.stderr
    assert load_card(tmp_path / "b").default_precision == "int8"
    assert Inspector.load(tmp_path / "b", device="cpu").precision == "int8"
    assert "Default precision: int8" in _words(result.stdout)

    result = runner.invoke(app, ["export", str(conv_ae_run), "--out", str(tmp_path / "c"), "--default-precision",
                                 "fp16"])
    assert result.exit_code == 1
    said = _words(result.stderr)
    assert "Default precision 'fp16' is not among the precisions written (fp32)" in said
    assert "--precision fp16" in said and not (tmp_path / "c").exists()


def test_calibrate_names_the_model_folder_that_lacks_the_new_threshold(conv_ae_run, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(conv_ae_run, run)
    RunFolder(run).exports_path.unlink(missing_ok=True)  # other tests export the shared run
    never = runner.invoke(app, ["calibrate", str(run)])
    assert never.exit_code == 0, never.stderr
    said = _words(never.stdout)
    assert f"The new thresholds are in {run / 'calibration.json'} only" in said
    assert f"edge-inspect export {run} --out MODEL_DIR" in said

    out = tmp_path / "models" / "m"
    exported = runner.invoke(app, ["export", str(run), "--out", str(out), "--precision", "int8", "--force",
                                   "--default-precision", "int8"])
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(RunFolder(run).exports_path.read_text())["exports"][0]["folder"] == str(out.resolve())

    moved = runner.invoke(app, ["calibrate", str(run), "--false-alarm-rate", "0.02"])
    assert moved.exit_code == 0, moved.stderr
    said = _words(moved.stdout)
    assert "The model folder exported from this run still decides with the old ones until exported again" in said
    command = re.search(rf"edge-inspect export {re.escape(str(run))} --out \S+ --precision int8 "
                        r"--default-precision int8( --force)?", said).group(0)
    assert load_card(out).calibration != load_calibration(run / "calibration.json")

    again = runner.invoke(app, shlex.split(command)[1:])  # the command as printed
    assert again.exit_code == 0, again.stderr
    assert load_card(out).calibration == load_calibration(run / "calibration.json")
    assert load_card(out).default_precision == "int8"
    same = runner.invoke(app, ["calibrate", str(run), "--false-alarm-rate", "0.02"])
    assert f"{out.resolve()} already carries this calibration" in _words(same.stdout)
