"""Training commands: quiet by default, loud with --debug, and bad arguments caught before TensorFlow loads.

Each test runs the real command line in a fresh interpreter, with an
environment that does not quiet TensorFlow itself (no TF_CPP_MIN_LOG_LEVEL).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_inspect.synthetic import write_parts

ROOT = Path(__file__).resolve().parents[2]

#: What TensorFlow, absl, oneDNN and tf2onnx print when nobody quiets them.
NOISE = re.compile(
    r"oneDNN|absl|cpu_feature_guard|TensorFlow binary is optimized|Using tensorflow=|Using opset|"
    r"values for constant folding|Optimizing ONNX|After optimization|cuda_|cuDNN|^[IWEF]\d{4} ",
    re.MULTILINE,
)


def _clean_env() -> dict:
    """The environment of a user's shell: nothing set to quiet TensorFlow."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_inspect", *args], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A conv-ae (which needs TensorFlow) trained by the CLI at 32 px for one epoch: (run folder, the process)."""
    base = tmp_path_factory.mktemp("quiet")
    write_parts(base / "ok", 60, size=32, seed=11)
    run = base / "run"
    proc = _cli("train", "--model", "conv-ae", "--normal", str(base / "ok"), "--out", str(run), "--size", "32",
                "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.3")
    assert proc.returncode == 0, proc.stderr
    return run, proc


def test_train_and_export_print_no_tensorflow_start_up_lines(trained, tmp_path):
    run, train = trained
    export = _cli("export", str(run), "--out", str(tmp_path / "model"))
    assert export.returncode == 0, export.stderr
    for name, proc in (("train", train), ("export", export)):
        noise = NOISE.findall(proc.stdout + proc.stderr)
        assert not noise, f"{name} printed {noise}:\n{proc.stderr}"
    assert "Trained conv-ae" in train.stdout and (tmp_path / "model" / "model.onnx").is_file()


def test_debug_shows_tensorflow_and_tf2onnx_lines(trained, tmp_path):
    run, _ = trained
    proc = _cli("--debug", "export", str(run), "--out", str(tmp_path / "model"))
    assert proc.returncode == 0, proc.stderr
    assert NOISE.search(proc.stderr), proc.stderr[-2000:]
    assert "Using tensorflow=" in proc.stderr  # tf2onnx's log, at INFO


def _invoke_each(cases: dict[str, list[str]]) -> dict:
    """Run each command line through the typer app in one fresh interpreter; exit codes, stderr, modules loaded."""
    code = textwrap.dedent(f"""
        import json, sys
        from typer.testing import CliRunner
        from edge_inspect.cli import app

        results = {{}}
        for name, args in {cases!r}.items():
            result = CliRunner().invoke(app, args)
            results[name] = [result.exit_code, " ".join(result.stderr.split())]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx"))
        print(json.dumps({{"results": results, "heavy": heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_bad_arguments_fail_with_the_fix_before_tensorflow_loads(trained, tmp_path):
    run, _ = trained
    ok = run.parent / "ok"
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.txt").write_text("not an image")
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(run / "config.json", untrained)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "model.keras").unlink()
    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(run, uncalibrated)
    (uncalibrated / "calibration.json").unlink()
    missing = str(tmp_path / "missing")

    cases = {
        "criterion": ["calibrate", str(run), "--criterion", "rnage"],
        "false alarms": ["calibrate", str(run), "--false-alarm-rate", "1.5"],
        "k": ["calibrate", str(run), "--rule", "mad", "--k", "0"],
        "calibrate anomalous": ["calibrate", str(run), "--anomalous", missing],
        "untrained": ["calibrate", str(untrained)],
        "unfinished": ["calibrate", str(unfinished)],
        "evaluate normal": ["evaluate", str(run), "--normal", missing, "--anomalous", str(ok)],
        "evaluate empty": ["evaluate", str(run), "--normal", str(ok), "--anomalous", str(tmp_path / "no-images")],
        "uncalibrated": ["evaluate", str(uncalibrated), "--normal", str(ok), "--anomalous", str(ok)],
        "opset": ["export", str(run), "--out", str(tmp_path / "m"), "--opset", "9"],
        "export untrained": ["export", missing, "--out", str(tmp_path / "m")],
        "train folder": ["train", "--model", "conv-ae", "--normal", missing, "--out", str(tmp_path / "r1")],
        "train size": ["train", "--model", "conv-ae", "--normal", str(ok), "--out", str(tmp_path / "r2"),
                       "--size", "8"],
        "train split": ["train", "--normal", str(ok), "--out", str(tmp_path / "r3"), "--val-fraction", "1.5"],
        "train out": ["train", "--model", "conv-ae", "--normal", str(ok), "--out", str(run)],
    }
    expected = {
        "criterion": ["Unknown default criterion 'rnage'", "Did you mean 'range'?", "smooth_range"],
        "false alarms": ["false_alarm_rate must be in (0, 0.5), found 1.5", "0.05 flags 5 %"],
        "k": ["k must be a finite number > 0", "3 is usual"],
        "calibrate anomalous": ["--anomalous: image folder", "does not exist", "defective part images"],
        "untrained": ["is not a trained run folder", "model.npz or model.keras", "edge-inspect train"],
        "unfinished": ["did not finish", "--resume"],
        "evaluate normal": ["--normal: image folder", "does not exist"],
        "evaluate empty": ["--anomalous: image folder", "holds no image", ".png"],
        "uncalibrated": ["no calibration.json", f"edge-inspect calibrate {uncalibrated}"],
        "opset": ["Unsupported opset 9", "Expected 13 to 18"],
        "export untrained": ["does not exist", "edge-inspect train"],
        "train folder": ["--normal: image folder", "does not exist"],
        "train size": ["At 'size': 8 is out of range; expected 16 pixels or more"],
        "train split": ["At 'val_fraction'", "between 0 and 1"],
        "train out": ["already holds files", "--resume", "new --out folder"],
    }
    answer = _invoke_each(cases)
    for name, (exit_code, stderr) in answer["results"].items():
        assert exit_code == 1 and stderr.startswith("Error:"), (name, exit_code, stderr)
        for text in expected[name]:
            assert text in stderr, (name, text, stderr)
    assert answer["heavy"] == [], answer["heavy"]
