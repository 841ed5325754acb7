"""ONNX export: parity with Keras for every model kind, int8, bad input (the rewrites: test_graph_rewrites.py)."""

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest

from edge_inspect.card import METADATA_KEY, load_card
from edge_inspect.errors import ConfigError, ModelCardError
from export.parity import FP32_TOLERANCE
from export.to_onnx import export_run
from tests.runtime.conftest import conv_ae_run, model_dir, tiny_base, tiny_run  # noqa: F401  (shared fixtures)

#: The newest ONNX IR version that onnxruntime 1.18, the oldest the runtime accepts, can load. The
#: onnx package stamps its own (14 with onnx 1.23), which onnxruntime-gpu 1.31 refused on a GPU.
OLDEST_RUNTIME_IR = 10


@pytest.mark.parametrize("kind", ["linear-ae", "conv-ae", "vae", "dilated-vae"])
def test_each_model_kind_exports_with_parity(kind, tiny_base, tmp_path):  # noqa: F811
    out = tmp_path / "model"
    report = export_run(tiny_run(kind, tiny_base), out)
    parity = report.files["fp32"]["parity"]
    assert parity["reference"] == ("fit" if kind == "linear-ae" else "keras") and parity["images"] >= 10
    assert parity["max_abs_diff"] <= FP32_TOLERANCE
    assert parity["verdicts_identical"]
    card = load_card(out)
    assert card.model_kind == kind and card.precisions == ["fp32"]
    trained = card.data["model"]
    assert trained["trained_file"] == ("model.npz" if kind == "linear-ae" else "model.keras")
    assert trained["trained_sha256"] == hashlib.sha256((tiny_run(kind, tiny_base) / trained["trained_file"]).read_bytes()).hexdigest()
    graph = onnx.load(out / "model.onnx")
    assert [i.name for i in graph.graph.input] == ["image"] and [o.name for o in graph.graph.output] == ["reconstruction"]
    assert "ConvTranspose" not in {n.op_type for n in graph.graph.node}  # rewritten to Conv + pixel shuffle
    assert graph.ir_version <= OLDEST_RUNTIME_IR
    embedded = json.loads({p.key: p.value for p in graph.metadata_props}[METADATA_KEY])
    assert embedded == json.loads(json.dumps(card.facts()))


def test_card_records_what_the_runtime_needs(model_dir):  # noqa: F811
    card = json.loads((model_dir / "model.json").read_text())
    assert card["schema"] == 1 and card["model"]["kind"] == "conv-ae"
    assert card["input"] == {"name": "image", "shape": ["batch", 32, 32], "dtype": "float32", "layout": "NHW",
                             "range": [0.0, 1.0]}
    assert card["preprocessing"]["interpolation"] == "area" and card["preprocessing"]["color"] == "gray"
    entry = card["calibration"]["criteria"][card["calibration"]["default_criterion"]]
    assert {"polarity", "threshold", "center"} <= set(entry)
    assert {"tensorflow", "tf2onnx", "onnx", "edge_inspect"} <= set(card["versions"])
    assert card["training"]["data"]["n_val"] >= 10 and card["opset"] == 17
    assert set(card["files"]) == {"fp32", "int8"}
    assert len(card["files"]["fp32"]["sha256"]) == 64


def test_int8_export_reports_score_change_and_agreement(model_dir):  # noqa: F811
    parity = json.loads((model_dir / "model.json").read_text())["files"]["int8"]["parity"]
    assert parity["reference"] == "fp32"
    assert 0.0 <= parity["verdict_agreement"] <= 1.0
    assert parity["score_change"]["max_abs"] >= 0.0
    assert "not measured" in parity["auc"]  # label-free calibration: no defective images
    quantised = onnx.load(model_dir / "model.int8.onnx")
    assert quantised.ir_version <= OLDEST_RUNTIME_IR
    ops = {n.op_type for n in quantised.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "ConvTranspose" not in ops
    # the decoder's pixel shuffles move uint8 values: no Dequantize before them, no Quantize after
    producer = {o: n.op_type for n in quantised.graph.node for o in n.output}
    consumers = {i: n.op_type for n in quantised.graph.node for i in n.input}
    *inner, last = [n for n in quantised.graph.node if n.op_type == "DepthToSpace"]
    assert len(inner) == 2
    assert all(producer[n.input[0]] == "QuantizeLinear" and consumers[n.output[0]] == "DequantizeLinear" for n in inner)
    # the last one moved past the one-channel output Conv and its Sigmoid: it shuffles the output's phases
    assert producer[last.input[0]] == "DequantizeLinear" and consumers[last.output[0]] == "Slice"


def test_int8_with_anomalous_images_reports_auc_change(conv_ae_run, defect_dir, tmp_path):  # noqa: F811
    report = export_run(conv_ae_run, tmp_path / "m", precisions=["int8"], anomalous_dir=defect_dir, force=True)
    auc = report.files["int8"]["parity"]["auc"]
    assert set(auc) >= {"fp32", "int8", "change"} and auc["anomalous"] == 12
    assert auc["change"] == pytest.approx(auc["int8"] - auc["fp32"])


def test_fp16_export_keeps_fp32_input_and_output(conv_ae_run, tmp_path):  # noqa: F811
    from edge_inspect.inspector import Inspector

    report = export_run(conv_ae_run, tmp_path / "m", precisions=["fp16"], force=True)
    parity = report.files["fp16"]["parity"]
    assert parity["max_abs_diff"] < 5e-3 and parity["score_change"]["max_abs"] < 5e-3
    assert onnx.load(tmp_path / "m" / "model.fp16.onnx").ir_version <= OLDEST_RUNTIME_IR
    inspector = Inspector.load(tmp_path / "m", device="cpu")
    assert inspector.precision == "fp32"  # fp32 stays the default unless --default-precision names another
    assert Inspector.load(tmp_path / "m", device="cpu", precision="fp16").precision == "fp16"
    assert inspector.inspect(np.zeros((32, 32), np.uint8)).verdict in ("ok", "ng")


def test_int8_refused_when_verdicts_disagree(conv_ae_run, tmp_path, monkeypatch):  # noqa: F811
    import export.parity as parity

    monkeypatch.setattr(parity, "MIN_AGREEMENT", 1.01)  # no graph can agree with fp32 that well
    with pytest.raises(ConfigError, match="agree with fp32 on .* under the required"):
        export_run(conv_ae_run, tmp_path / "m", precisions=["int8"])
    assert not (tmp_path / "m").exists()  # never half-written
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ModelCardError, match="is not a run folder"):
        export_run(tmp_path, tmp_path / "out")


def test_missing_calibration(conv_ae_run, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(conv_ae_run, run)
    (run / "calibration.json").unlink()
    with pytest.raises(ModelCardError, match="no calibration.json.*edge-inspect calibrate"):
        export_run(run, tmp_path / "out")


def test_unsupported_opset(conv_ae_run, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="Unsupported opset 9"):
        export_run(conv_ae_run, tmp_path / "out", opset=9)


@pytest.mark.parametrize("key", ["trained_sha256", "keras_sha256"])  # the second: cards written before the rename
def test_output_folder_holding_a_different_model(conv_ae_run, tmp_path, key):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    card = {"model": {key: "0" * 64, "run": "/elsewhere/run"}}
    (out / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"already holds a different model .*this run's model.keras is"):
        export_run(conv_ae_run, out)
    assert json.loads((out / "model.json").read_text()) == card  # untouched


def test_output_folder_holding_other_files(conv_ae_run, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ModelCardError, match="not a model folder"):
        export_run(conv_ae_run, out)
