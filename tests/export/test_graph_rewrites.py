"""Graph rewrites: each is exact (same outputs as the graph it replaces) and the shared index stays current."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.graph_rewrites import GraphIndex, shuffle_after_narrow_conv, subpixel_conv_transpose, uint8_shuffles


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


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
    expected, found = _run(model, x), _run(rewritten, x)
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
    monkeypatch.setattr("export.graph_rewrites.MAX_TAP_RATIO", 2.0)  # the derivation, tested past the cost rule
    rng = np.random.default_rng(1)
    model = _shuffle_conv_model(cin, cout, kernel, pads, block, activation, rng)
    rewritten = shuffle_after_narrow_conv(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", *([activation] if activation else []), "DepthToSpace"]
    x = rng.normal(size=(2, cin * block * block, 6, 11)).astype(np.float32)
    expected, found = _run(model, x), _run(rewritten, x)
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


def test_two_narrowing_convs_after_a_shuffle_both_move():
    """The second Conv reads the shuffle the first rewrite moved: the index must know it within the same pass."""
    rng = np.random.default_rng(3)
    w1, b1 = rng.normal(size=(16, 64, 5, 5)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    w2, b2 = rng.normal(size=(4, 16, 5, 5)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    nodes = [helper.make_node("DepthToSpace", ["x"], ["shuffled"], blocksize=2, mode="CRD"),
             helper.make_node("Conv", ["shuffled", "w1", "b1"], ["mid"], pads=[2, 2, 2, 2], name="first"),
             helper.make_node("Conv", ["mid", "w2", "b2"], ["y"], pads=[2, 2, 2, 2], name="second")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten = shuffle_after_narrow_conv(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "Conv", "DepthToSpace"]
    assert {t.name for t in rewritten.graph.initializer}.isdisjoint({"w1", "b1", "w2", "b2"})  # the old weights dropped
    x = rng.normal(size=(1, 256, 5, 6)).astype(np.float32)
    expected, found = _run(model, x), _run(rewritten, x)
    assert found.shape == expected.shape == (1, 4, 10, 12)
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-3)


def _qdq_shuffle_model(q_scale: float):
    """x (float) -> Quantize -> Dequantize -> DepthToSpace -> Quantize (scale ``q_scale``) -> Dequantize -> y."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(q_scale, np.float32), "s_out"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xf"]),
             helper.make_node("DepthToSpace", ["xf"], ["shuffled"], blocksize=2, mode="CRD"),
             helper.make_node("QuantizeLinear", ["shuffled", "s_out", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s_out", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_uint8_shuffles_drop_the_float_round_trip_when_the_parameters_match():
    model = _qdq_shuffle_model(0.05)
    x = np.random.default_rng(4).normal(size=(1, 8, 3, 4)).astype(np.float32)
    expected = _run(model, x)
    assert uint8_shuffles(model) == 1
    assert [n.op_type for n in model.graph.node] == ["QuantizeLinear", "DepthToSpace", "DequantizeLinear"]
    np.testing.assert_array_equal(_run(model, x), expected)  # exact: the shuffle only moves the uint8 values


def test_uint8_shuffles_leave_a_shuffle_whose_scales_differ():
    model = _qdq_shuffle_model(0.1)
    assert uint8_shuffles(model) == 0
    assert [n.op_type for n in model.graph.node].count("DequantizeLinear") == 2


def test_the_index_forgets_a_removed_node_and_learns_a_rewired_one():
    a = helper.make_node("Relu", ["x"], ["h"])
    b = helper.make_node("Sigmoid", ["h"], ["y"])
    index = GraphIndex([a, b])
    assert index.producer["h"] is a and index.readers("h") == [b] and index.readers("y") == []
    index.remove(b)
    b.input[0] = "x"
    index.add(b)
    assert index.readers("h") == [] and [n.op_type for n in index.readers("x")] == ["Relu", "Sigmoid"]
    index.remove(a)
    assert "h" not in index.producer
