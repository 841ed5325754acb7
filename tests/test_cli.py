"""The command line through typer's CliRunner: help, exit codes and messages."""

import json

from typer.testing import CliRunner

from edge_inspect.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "demo"):
        assert command in result.output


def test_train_help_has_an_example():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert "edge-inspect train --model conv-ae" in result.output
    for flag in ("--size", "--epochs", "--batch-size", "--lr", "--seed", "--resume", "--preset"):
        assert flag in result.output


def test_train_on_a_missing_folder_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["train", "--model", "vae", "--normal", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_rejects_an_unknown_model(tmp_path):
    result = runner.invoke(app, ["train", "--model", "gan", "--normal", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "conv-ae" in result.output + result.stderr


def test_train_succeeds_and_summarises(normal_dir, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", "conv-ae", "--normal", str(normal_dir), "--out", str(run),
                                 "--size", "32", "--epochs", "1", "--batch-size", "8"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "skipped files" in result.output and "best validation loss" in result.output
    assert json.loads((run / "config.json").read_text())["train"]["size"] == 32


def test_resume_without_checkpoint_exits_1(normal_dir, tmp_path):
    result = runner.invoke(app, ["train", "--model", "conv-ae", "--normal", str(normal_dir), "--out", str(tmp_path / "r"), "--resume"])
    assert result.exit_code == 1 and "Cannot resume" in result.stderr


def test_train_defaults_to_the_linear_ae(normal_dir, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--normal", str(normal_dir), "--out", str(run), "--size", "32",
                                 "--components", "16"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "Trained linear-ae" in result.output and "16 components, closed form" in result.output
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["model"] == "linear-ae" and config["train"]["augment"] == "d4"
    assert "near-duplicate" in config["split"]["rule"]
    assert json.loads((run / "calibration.json").read_text())["default_criterion"] == "smooth_range"


def test_demo_runs_the_main_job_end_to_end(tmp_path):
    """Without the line (--no-line): the test parts go through the lean runtime in one batch. The line: tests/test_demo.py."""
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--count", "80", "--size", "32", "--components", "32",
                                 "--no-line"])
    assert result.exit_code == 0, result.output + result.stderr
    assert (out / "runs" / "linear-ae" / "eval" / "report.md").is_file()
    assert (out / "models" / "linear-ae" / "model.onnx").is_file()
    assert not (out / "line").exists()
    text = " ".join(result.output.split())
    assert "The lean runtime on the test parts" in text, text
    assert "ok parts" in text and "ng parts" in text
    report = (out / "runs" / "linear-ae" / "eval" / "report.html").resolve()
    assert result.output.splitlines()[-1] == f"Report: {report} (open it in a browser)"
    again = runner.invoke(app, ["demo", "--out", str(out)])
    assert again.exit_code == 1 and "already holds files" in again.stderr
