"""The runtime commands through typer's CliRunner: export, predict, benchmark."""

import json
import re
import shutil

import cv2
import pytest
from typer.testing import CliRunner

from edge_inspect.cli import app
from edge_inspect.kernels import CRITERIA
from tests.runtime.conftest import conv_ae_run, model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.support import write_parts

runner = CliRunner()
RESULT_KEYS = {"source", "verdict", "score", "raw_score", "threshold", "criterion", "polarity", "criteria",
               "latency_ms", "batch_size", "error", "model", "model_sha256", "precision", "inspected_at",
               "input_note"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """ok/: 6 normal parts, ng/: 6 with injected defects, 32 px."""
    root = tmp_path_factory.mktemp("parts")
    write_parts(root / "ok", 6, size=32, seed=40)
    write_parts(root / "ng", 6, size=32, seed=41, defective=True)
    return root


def _lines(output):
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_predict_json_lines(model_dir, parts):  # noqa: F811
    result = runner.invoke(app, ["predict", "--model", str(model_dir), str(parts), "--json", "--batch-size", "4"])
    assert result.exit_code == 0, result.output + result.stderr
    lines = _lines(result.stdout)
    assert len(lines) == 12
    for line in lines:
        assert set(line) == RESULT_KEYS
        assert line["verdict"] in ("ok", "ng") and line["error"] is None and line["criterion"] == "smooth_range"
        assert list(line["criteria"]) == list(CRITERIA)
        assert line["verdict"] == ("ng" if line["score"] > line["threshold"] else "ok")
    defect = [line["score"] for line in lines if "/ng/" in line["source"]]
    normal = [line["score"] for line in lines if "/ok/" in line["source"]]
    assert sum(defect) / len(defect) > sum(normal) / len(normal)
    assert "6 ok" in result.stderr or "ng" in result.stderr


def test_predict_unreadable_file_gets_an_error_line(model_dir, parts, tmp_path):  # noqa: F811
    folder = shutil.copytree(parts / "ng", tmp_path / "mixed")
    (folder / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = runner.invoke(app, ["predict", "--model", str(model_dir), str(folder), str(tmp_path / "gone.png"), "--json"])
    assert result.exit_code == 1
    lines = _lines(result.stdout)
    errors = {line["source"]: line["error"] for line in lines if line["verdict"] == "error"}
    assert len(lines) == 8 and len(errors) == 2
    assert "JPEG" in errors[str(folder / "cut.jpg")] and "truncated" in errors[str(folder / "cut.jpg")]
    assert "cannot be read" in errors[str(tmp_path / "gone.png")]
    assert "6 ok" not in result.stderr and "2 error" in result.stderr


def test_predict_table_criterion_and_heatmaps(model_dir, parts, tmp_path):  # noqa: F811
    out = tmp_path / "heat"
    result = runner.invoke(app, ["predict", "--model", str(model_dir), str(parts / "ng"), "--criterion", "mse",
                                 "--heatmaps", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    text = " ".join(result.stdout.split())  # the title may wrap
    assert "criterion mse" in text and "verdict" in text
    ng = int(re.search(r"(\d+) ng", result.stderr).group(1))
    written = sorted(out.glob("*.png"))
    assert 0 < len(written) == ng < 6  # overlays of NG parts only, unless asked
    result = runner.invoke(app, ["predict", "--model", str(model_dir), str(parts / "ng"), "--criterion", "mse",
                                 "--heatmaps", str(tmp_path / "all"), "--heatmaps-all"])
    assert result.exit_code == 0, result.output + result.stderr
    assert len(list((tmp_path / "all").glob("*.png"))) == 6
    height, width, channels = cv2.imread(str(written[0])).shape
    assert channels == 3 and width == 512 and 32 < height < width  # the part at its size on a canvas, a banner below


def test_predict_errors(model_dir, parts, tmp_path):  # noqa: F811
    result = runner.invoke(app, ["predict", "--model", str(model_dir), str(parts), "--criterion", "sharpness"])
    assert result.exit_code == 1 and "Unknown criterion 'sharpness'" in result.stderr
    result = runner.invoke(app, ["predict", "--model", str(tmp_path), str(parts)])
    assert result.exit_code == 1 and "not a model folder" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["predict", "--model", str(model_dir), str(empty)])
    assert result.exit_code == 1 and "No image to inspect" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_on_cuda_without_cuda_is_a_clear_error(model_dir, parts):  # noqa: F811
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = runner.invoke(app, ["predict", "--model", str(model_dir), str(parts), "--device", "cuda"])
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "no CUDA execution provider" in result.stderr


def test_predict_refuses_a_tampered_model(model_dir, parts, tmp_path):  # noqa: F811
    copy = shutil.copytree(model_dir, tmp_path / "m")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-100] ^= 1
    (copy / "model.onnx").write_bytes(bytes(data))
    result = runner.invoke(app, ["predict", "--model", str(copy), str(parts), "--precision", "fp32"])
    assert result.exit_code == 1 and "does not match its model card" in result.stderr


def test_benchmark_table_has_a_row_per_precision_and_auc(model_dir, parts):  # noqa: F811
    result = runner.invoke(app, ["benchmark", "--model", str(model_dir), "--data", str(parts), "--batch-size", "4"])
    assert result.exit_code == 0, result.output + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("│ fp32") or line.startswith("│ int8")]
    assert len(rows) == 2
    assert "AUC of criterion smooth_range on 12 images" in result.stdout.replace("\n", " ")
    assert "images/s" in result.stdout


def test_export_command(conv_ae_run, tmp_path):  # noqa: F811
    result = runner.invoke(app, ["export", str(conv_ae_run), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output + result.stderr
    assert (tmp_path / "m" / "model.onnx").is_file() and "keras, " in result.stdout
    result = runner.invoke(app, ["export", str(conv_ae_run), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.stderr  # the same model's folder is replaced, whole
    names = sorted(p.name for p in tmp_path.iterdir())  # the earlier export kept as a dated backup, no temporary folder
    assert len(names) == 2 and names[0] == "m" and names[1].startswith("m.20"), names
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "m2")])
    assert result.exit_code == 1 and "is not a trained run folder" in result.stderr
    result = runner.invoke(app, ["export", str(conv_ae_run), "--out", str(tmp_path / "m3"), "--opset", "7"])
    assert result.exit_code == 1 and "Unsupported opset 7" in result.stderr
