"""A linear-ae saved as a Keras model (runs made before model.npz) still exports: its two-Gemm graph matches Keras."""

import numpy as np
import onnxruntime as ort
import pytest

from edge_inspect.errors import ModelCardError
from export.linear_graph import dense_graph
from export.models.linear_ae import build_linear_ae
from export.scoring import reconstruct


def _fitted(height=10, width=8, components=5, seed=0):
    """build_linear_ae with orthonormal axes W and a mean set as an earlier fit left them."""
    rng = np.random.default_rng(seed)
    model = build_linear_ae((height, width), components=components)
    axes = np.linalg.qr(rng.normal(size=(height * width, components)))[0].T.astype(np.float32)  # (K, P)
    mean = rng.uniform(0.2, 0.8, height * width).astype(np.float32)
    model.encoder.get_layer("project").set_weights([axes.T, -(mean @ axes.T)])
    model.decoder.get_layer("reconstruct").set_weights([axes, mean])
    return model, rng


def test_the_dense_graph_matches_keras_and_stores_the_axes_once():
    model, rng = _fitted()
    proto = dense_graph(model, (10, 8), opset=17)
    assert [n.op_type for n in proto.graph.node].count("Gemm") == 2
    assert [tuple(t.dims) for t in proto.graph.initializer if len(t.dims) == 2] == [(5, 80)]
    images = rng.uniform(0, 1, (3, 10, 8)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    found = session.run(["reconstruction"], {"image": images})[0]
    np.testing.assert_allclose(found, reconstruct(model, images), atol=1e-5)


def test_an_encoder_and_decoder_that_disagree_are_refused():
    model, _ = _fitted()
    kernel, bias = model.encoder.get_layer("project").get_weights()
    model.encoder.get_layer("project").set_weights([kernel[:, ::-1], bias])
    with pytest.raises(ModelCardError, match="do not hold the same axes; refit"):
        dense_graph(model, (10, 8), opset=17)
