"""Calibration of a run and its evaluation: files written, AUCs, modes, bad input."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_inspect.calibrate import load_calibration
from edge_inspect.cli import app
from edge_inspect.errors import InputError, ModelCardError
from edge_inspect.kernels import CRITERIA
from export.evaluate import criterion_metrics, evaluate
from export.scoring import calibrate_run

runner = CliRunner()


def test_train_leaves_a_label_free_calibration(trained_run):
    cal = load_calibration(trained_run / "calibration.json")
    assert cal["mode"] == "label-free" and cal["default_criterion"] == "smooth_range"
    assert set(cal["criteria"]) == set(CRITERIA)
    split = json.loads((trained_run / "split.json").read_text())
    assert cal["n_normal"] == len(split["val"])


def test_evaluate_writes_every_output_and_separates_big_defects(trained_run, big_defects, tmp_path):
    result = evaluate(trained_run, big_defects / "ok", big_defects / "def", out_dir=tmp_path / "report")
    for name in ("report.md", "metrics.csv", "metrics.json", "roc.png", "pr.png", "histograms.png", "gallery.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    assert result.n_normal == 16 and result.n_anomalous == 16 and result.prevalence == 0.5
    assert result.metrics["mse"]["auc_roc"] > 0.8 and result.metrics["range"]["auc_roc"] > 0.8
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["prevalence"] == 0.5 and set(metrics["criteria"]) == set(CRITERIA)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "oracle" in report and "range (default)" in report


def test_metrics_at_threshold_and_oracle():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.7, 0.9])
    m = criterion_metrics(labels, scores, threshold=0.65)
    assert m["false_alarm_rate"] == 0.0 and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 6) and m["f1"] == pytest.approx(0.8)
    assert m["auc_roc"] == pytest.approx(8 / 9)
    assert m["accuracy_oracle"] == pytest.approx(5 / 6) and m["f1_oracle"] == pytest.approx(6 / 7)


def test_few_shot_calibration_says_so(trained_run, big_defects, tmp_path):
    result = runner.invoke(app, ["calibrate", str(trained_run), "--anomalous", str(big_defects / "def")])
    assert result.exit_code == 0, result.output + result.stderr
    assert "few-shot" in result.output
    assert load_calibration(trained_run / "calibration.json")["mode"] == "few-shot"
    calibrate_run(trained_run)  # back to label-free for the other tests
    assert load_calibration(trained_run / "calibration.json")["mode"] == "label-free"


def test_bad_input_gets_clear_errors(trained_run, big_defects, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="No anomalous images"):
        evaluate(trained_run, big_defects / "ok", empty)
    with pytest.raises(InputError, match="No normal images"):
        evaluate(trained_run, tmp_path / "missing", big_defects / "def")
    uncalibrated = tmp_path / "uncalibrated"
    uncalibrated.mkdir()
    for name in ("model.keras", "config.json", "split.json"):
        (uncalibrated / name).write_bytes((trained_run / name).read_bytes())
    with pytest.raises(ModelCardError, match="edge-inspect calibrate"):
        evaluate(uncalibrated, big_defects / "ok", big_defects / "def")
    with pytest.raises(ModelCardError, match="not a run folder"):
        calibrate_run(tmp_path)


def test_evaluate_cli_prints_the_table(trained_run, big_defects, tmp_path):
    result = runner.invoke(app, ["evaluate", str(trained_run), "--normal", str(big_defects / "ok"),
                                 "--anomalous", str(big_defects / "def"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output + result.stderr
    assert "AUC-ROC" in result.output and "range" in result.output and "oracle" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--normal", str(big_defects / "ok"), "--anomalous", str(big_defects / "def")])
    assert result.exit_code == 1 and "not a trained run folder" in result.stderr


def test_evaluate_without_out_writes_into_the_runs_eval_folder(trained_run, big_defects, tmp_path):
    import shutil

    run = shutil.copytree(trained_run, tmp_path / "run")
    result = runner.invoke(app, ["evaluate", str(run), "--normal", str(big_defects / "ok"), "--anomalous", str(big_defects / "def")])
    assert result.exit_code == 0, result.output + result.stderr
    assert {"metrics.json", "report.html", "roc.png"} <= {p.name for p in (run / "eval").iterdir()}
