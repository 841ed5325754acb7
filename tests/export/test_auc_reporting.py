"""What evaluate, export --anomalous, benchmark and few-shot calibrate say about how well a model separates.

A model worse than chance is made for real, without mocks: a separating
model evaluated with the normal and defective folders swapped ranks every
good part above the defects; "defects" that are copies of the run's own
held-out normals score exactly like them (AUC-ROC 0.5).
"""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_inspect.calibrate import load_calibration
from edge_inspect.cli import app

runner = CliRunner()


def _words(text: str) -> str:
    """The output with the terminal's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """trained_run exported at fp32, to a folder of its own."""
    from export.to_onnx import export_run

    out = tmp_path_factory.mktemp("exported") / "model"
    export_run(trained_run, out)
    return out


@pytest.fixture(scope="module")
def held_out_copies(trained_run, tmp_path_factory):
    """Copies of the run's held-out normal images: "defects" the model cannot tell from good parts."""
    split = json.loads((trained_run / "split.json").read_text())
    folder = tmp_path_factory.mktemp("same-as-normal")
    for i, rel in enumerate(split["val"]):
        shutil.copy(Path(split["root"]) / rel, folder / f"{i:03d}_{Path(rel).name}")
    return folder


def test_evaluate_warns_when_the_folders_are_swapped(trained_run, big_defects, tmp_path):
    right = runner.invoke(app, ["evaluate", str(trained_run), "--normal", str(big_defects / "ok"),
                                "--anomalous", str(big_defects / "def"), "--out", str(tmp_path / "right")])
    assert right.exit_code == 0, right.output + right.stderr
    assert json.loads((tmp_path / "right" / "metrics.json").read_text())["criteria"]["smooth_range"]["auc_roc"] > 0.6
    assert "Warning" not in right.stderr and "AUC-ROC of the default criterion" not in right.output + right.stderr

    swapped = runner.invoke(app, ["evaluate", str(trained_run), "--normal", str(big_defects / "def"),
                                  "--anomalous", str(big_defects / "ok"), "--out", str(tmp_path / "swapped")])
    assert swapped.exit_code == 0, swapped.stderr  # a warning, not a failure
    measured = json.loads((tmp_path / "swapped" / "metrics.json").read_text())["criteria"]["smooth_range"]["auc_roc"]
    assert measured < 0.5
    said = _words(swapped.stderr)
    assert f"Warning: AUC-ROC of the default criterion smooth_range is {measured:.3f} on 16 normal, 16 defective " \
           "images, below 0.6: worse than chance" in said
    assert "does not tell the defects from good parts" in said
    assert "more --epochs" in said and "--size" in said and "not swapped" in said


def test_export_warns_when_fp32_cannot_tell_the_defects_apart(trained_run, big_defects, held_out_copies, tmp_path):
    same = runner.invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "a"),
                               "--anomalous", str(held_out_copies)])
    assert same.exit_code == 0, same.stderr
    assert "AUC-ROC of fp32, criterion smooth_range: 0.500" in _words(same.stdout)
    said = _words(same.stderr)
    assert "Warning: AUC-ROC of the default criterion smooth_range is 0.500" in said and "near chance" in said
    assert "worse than chance" not in said

    right = runner.invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "b"),
                                "--anomalous", str(big_defects / "def")])
    assert right.exit_code == 0, right.stderr
    assert "AUC-ROC of fp32, criterion smooth_range" in _words(right.stdout)
    assert "Warning" not in right.stderr


def test_benchmark_warns_when_the_labels_are_swapped(exported, big_defects, tmp_path):
    right, swapped = tmp_path / "right", tmp_path / "swapped"
    for root, ok, ng in ((right, "ok", "def"), (swapped, "def", "ok")):
        shutil.copytree(big_defects / ok, root / "ok")
        shutil.copytree(big_defects / ng, root / "ng")
    result = runner.invoke(app, ["benchmark", "--model", str(exported), "--data", str(right), "--batch-size", "8"])
    assert result.exit_code == 0, result.stderr
    assert "Warning" not in result.stderr
    result = runner.invoke(app, ["benchmark", "--model", str(exported), "--data", str(swapped), "--batch-size", "8"])
    assert result.exit_code == 0, result.stderr
    said = _words(result.stderr)
    assert "Warning: AUC-ROC of the default criterion smooth_range is" in said
    assert "on 32 images (fp32), below 0.6: worse than chance" in said


def test_few_shot_calibrate_shows_each_criterion_auc_and_why_one_won(trained_run, big_defects, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # calibrating rewrites the run: not the shared one
    result = runner.invoke(app, ["calibrate", str(run), "--anomalous", str(big_defects / "def")])
    assert result.exit_code == 0, result.stderr
    cal = load_calibration(run / "calibration.json")
    out = _words(result.stdout)
    assert f"Calibration (few-shot, rule quantile, {cal['n_normal']} normal, 16 defective images)" in out
    rows = {line.split("│")[1].split()[0]: line for line in result.stdout.splitlines() if line.startswith("│ ")}
    for name, entry in cal["criteria"].items():
        assert f"{entry['auc']:.3f}" in rows[name], name
    best = cal["default_criterion"]
    assert cal["criteria"][best]["auc"] == max(entry["auc"] for entry in cal["criteria"].values())
    assert f"Default criterion {best}: the highest AUC-ROC ({cal['criteria'][best]['auc']:.3f}) on 16 defective " \
           f"against {cal['n_normal']} held-out normal images" in out

    asked = runner.invoke(app, ["calibrate", str(run), "--anomalous", str(big_defects / "def"), "--criterion", "mean"])
    assert asked.exit_code == 0, asked.stderr
    assert "Default criterion mean" in _words(asked.stdout) and "as asked with --criterion" in _words(asked.stdout)

    label_free = runner.invoke(app, ["calibrate", str(run)])
    assert "normal images)" in _words(label_free.stdout) and "defective" not in label_free.stdout
