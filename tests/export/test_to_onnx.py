"""ONNX export: parity with Keras for every model kind, the subpixel rewrite, int8, bad input."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_inspect.card import METADATA_KEY, load_card
from edge_inspect.errors import ConfigError, ModelCardError
from export.to_onnx import FP32_TOLERANCE, export_run, shuffle_after_narrow_conv, subpixel_conv_transpose
from tests.runtime.conftest import conv_ae_run, model_dir, tiny_base, tiny_run  # noqa: F401  (shared fixtures)


@pytest.mark.parametrize("kind", ["linear-ae", "conv-ae", "vae", "dilated-vae"])
def test_each_model_kind_exports_with_parity(kind, tiny_base, tmp_path):  # noqa: F811
    out = tmp_path / "model"
    report = export_run(tiny_run(kind, tiny_base), out)
    parity = report.files["fp32"]["parity"]
    assert parity["reference"] == "keras" and parity["images"] >= 10
    assert parity["max_abs_diff"] <= FP32_TOLERANCE
    assert parity["verdicts_identical"]
    card = load_card(out)
    assert card.model_kind == kind and card.precisions == ["fp32"]
    graph = onnx.load(out / "model.onnx")
    assert [i.name for i in graph.graph.input] == ["image"] and [o.name for o in graph.graph.output] == ["reconstruction"]
    assert "ConvTranspose" not in {n.op_type for n in graph.graph.node}  # rewritten to Conv + pixel shuffle
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
    inspector = Inspector.load(tmp_path / "m", device="cpu")
    assert inspector.precision == "fp16"  # the default precision of a folder with fp16 and fp32
    assert inspector.inspect(np.zeros((32, 32), np.uint8)).verdict in ("ok", "ng")


def test_int8_refused_when_verdicts_disagree(conv_ae_run, tmp_path, monkeypatch):  # noqa: F811
    import export.to_onnx as to_onnx

    monkeypatch.setattr(to_onnx, "MIN_AGREEMENT", 1.01)  # no graph can agree with fp32 that well
    with pytest.raises(ConfigError, match="agree with fp32 on .* under the required"):
        export_run(conv_ae_run, tmp_path / "m", precisions=["int8"])
    assert not (tmp_path / "m").exists()  # never half-written
    assert not list(tmp_path.glob(".m.tmp-*"))


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "pads"),
    [(3, 4, 5, 2, [1, 1, 2, 2]), (5, 2, 3, 2, [0, 0, 1, 1]), (2, 3, 4, 2, [1, 1, 1, 1]), (3, 2, 6, 3, [1, 2, 2, 1])],
)
def test_subpixel_rewrite_equals_conv_transpose(cin, cout, kernel, stride, pads):
    """Conv + DepthToSpace computes what ConvTranspose does, on random weights, bias and input."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(cin, cout, kernel, kernel)).astype(np.float32)
    bias = rng.normal(size=cout).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[stride, stride], pads=pads)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten = subpixel_conv_transpose(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "DepthToSpace"]
    x = rng.normal(size=(2, cin, 7, 9)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    expected, found = run(model), run(rewritten)
    assert found.shape == expected.shape == (2, cout, 7 * stride, 9 * stride)
    np.testing.assert_allclose(found, expected, atol=1e-5)


def _shuffle_conv_model(cin, cout, kernel, pads, block, activation, rng):
    """x -> DepthToSpace(CRD) -> Conv (random weights) [-> activation] -> y."""
    weight = rng.normal(size=(cout, cin, kernel, kernel)).astype(np.float32)
    bias = rng.normal(size=cout).astype(np.float32)
    nodes = [helper.make_node("DepthToSpace", ["x"], ["shuffled"], blocksize=block, mode="CRD"),
             helper.make_node("Conv", ["shuffled", "w", "b"], ["conv" if activation else "y"], pads=pads)]
    if activation:
        nodes.append(helper.make_node(activation, ["conv"], ["y"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin * block * block, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "pads", "block", "activation"),
    [(32, 1, 5, [2, 2, 2, 2], 2, "Sigmoid"),  # the conv AE's last layer
     (8, 2, 5, [2, 2, 2, 2], 2, "Relu"),
     (9, 1, 9, [4, 4, 4, 4], 2, None),  # 4 * 5 * 5 / 81 taps
     (27, 3, 7, [3, 3, 3, 3], 3, None)],  # block 3: 9 * 9 / 49 taps, over the ratio, allowed here
)
def test_shuffle_after_narrow_conv_is_exact(cin, cout, kernel, pads, block, activation, monkeypatch):
    """Conv on the phases, then the shuffle, computes what the shuffle, then the Conv, does."""
    monkeypatch.setattr("export.to_onnx.MAX_TAP_RATIO", 2.0)  # the derivation, tested past the cost rule
    rng = np.random.default_rng(1)
    model = _shuffle_conv_model(cin, cout, kernel, pads, block, activation, rng)
    rewritten = shuffle_after_narrow_conv(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", *([activation] if activation else []), "DepthToSpace"]
    x = rng.normal(size=(2, cin * block * block, 6, 11)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    expected, found = run(model), run(rewritten)
    assert found.shape == expected.shape == (2, cout, 6 * block, 11 * block)
    np.testing.assert_allclose(found, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "pads", "why"),
    [(32, 1, 3, [1, 1, 1, 1], "3 x 3: four times the multiply-adds"),
     (32, 1, 5, [1, 2, 3, 2], "uneven padding: 4 x 4 x 3 / 25 taps"),
     (8, 4, 5, [2, 2, 2, 2], "widens: 4 x 4 phase channels > 8")],
)
def test_shuffle_after_narrow_conv_leaves_costly_cases(cin, cout, kernel, pads, why):
    model = _shuffle_conv_model(cin, cout, kernel, pads, 2, None, np.random.default_rng(2))
    assert [n.op_type for n in shuffle_after_narrow_conv(model).graph.node] == ["DepthToSpace", "Conv"], why


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


def test_output_folder_holding_a_different_model(conv_ae_run, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    card = {"model": {"keras_sha256": "0" * 64, "run": "/elsewhere/run"}}
    (out / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="already holds a different model"):
        export_run(conv_ae_run, out)
    assert json.loads((out / "model.json").read_text()) == card  # untouched


def test_output_folder_holding_other_files(conv_ae_run, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ModelCardError, match="not a model folder"):
        export_run(conv_ae_run, out)
