"""The linear-ae's ONNX graphs, written directly with ``onnx.helper``.

A fitted :class:`~export.pca.LinearPCA` becomes, per block of its basis,
two matrix products that share one matrix (the encoder uses it transposed
through Gemm's ``transB``). With the square's symmetry (``augment="d4"``)
the image first goes to block coordinates and back:

    x - mean -> Gather orbits -> MatMul 8x8 (4x4) -> Gather blocks
             -> per block: Gemm(c, W, transB=1) -> MatMul(., W)
             -> Gather back -> MatMul 8x8 (4x4) transposed -> Gather pixels -> + mean

Every Gather and small MatMul is an exact orthogonal change of basis; the
weights are the blocks' bases, about an eighth of a dense ``(K, P)`` matrix
at 1,024 components. Each export checks the graph against the fitted
model (:mod:`export.parity`). A linear-ae trained before ``model.npz``, a
Keras model with one dense ``(K, P)`` matrix, gets :func:`dense_graph`.

    >>> proto = pca_graph(pca, opset=17)
"""

from __future__ import annotations

import numpy as np

from edge_inspect.card import INPUT_NAME, OUTPUT_NAME
from edge_inspect.errors import ModelCardError
from export.pca import D4Basis, LinearPCA


#: Weight-only quantisation: bits per weight -> block size along the reduction axis.
WEIGHT_BITS = {8: 32, 4: 32}
#: MatMulNBits accuracy level 4: int8 compute, activations quantised per block on the fly. Level 0 (float
#: compute) keeps the float activations but ran 30x slower than fp32 on this CPU (docs/benchmarks.md).
ACCURACY_LEVEL = 4


def quantize_rows(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise symmetric quantisation of ``(N, K)`` rows for ``com.microsoft.MatMulNBits``.

    Returns ``(B, scales)``: ``B`` is ``(N, ceil(K / block), block * bits / 8)``
    uint8 codes with the default zero point ``2 ** (bits - 1)``, packed low
    nibble first for 4 bits; ``scales`` is ``(N * blocks,)`` float32.
    """
    n, k = w.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = w
    grouped = padded.reshape(n, blocks, block)
    top = 2 ** (bits - 1) - 1
    scale = np.abs(grouped).max(axis=2) / top
    scale[scale == 0] = 1.0
    codes = (np.clip(np.round(grouped / scale[..., None]), -top - 1, top) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale.astype(np.float32).reshape(-1)


def pca_graph(pca: LinearPCA, opset: int, *, weight_bits: int | None = None):
    """The ONNX graph of ``pca.reconstruct``: ``(batch, H, W)`` float32 in and out.

    With ``weight_bits`` (8 or 4), each block's two products become
    ``com.microsoft.MatMulNBits`` on blockwise-quantised copies of the basis
    (one per direction): a quarter (or an eighth) of the weight bytes a lone
    part reads, with int8 compute (:data:`ACCURACY_LEVEL`).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    height, width = pca.size
    pixels = height * width
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    flat = node("Reshape", [INPUT_NAME, const("flat_shape", np.array([-1, pixels], np.int64))], "flat")
    centred = node("Sub", [flat, const("mean", pca.mean.astype(np.float32))], "centred")
    basis = pca.basis
    if isinstance(basis, D4Basis):
        o8, o4 = len(basis.idx8), len(basis.idx4)
        g8 = node("Gather", [centred, const("orbits8", basis.idx8.astype(np.int64))], "orbit8_pixels", axis=1)
        c8 = node("MatMul", [g8, const("to_irreps8", basis.t8.T.astype(np.float32))], "orbit8_coefficients")
        g4 = node("Gather", [centred, const("orbits4", basis.idx4.astype(np.int64))], "orbit4_pixels", axis=1)
        c4 = node("MatMul", [g4, const("to_irreps4", basis.t4.T.astype(np.float32))], "orbit4_coefficients")
        coef = node("Concat", [node("Reshape", [c8, const("flat8", np.array([-1, 8 * o8], np.int64))], "flat8c"),
                               node("Reshape", [c4, const("flat4", np.array([-1, 4 * o4], np.int64))], "flat4c")],
                    "coefficients", axis=1)
    else:
        coef = centred
    parts, order = [], []
    for i, (block, w) in enumerate(zip(basis.blocks, pca.bases)):
        name = block.name.lower()
        x = node("Gather", [coef, const(f"{name}_index", block.index.reshape(-1).astype(np.int64))], f"{name}_coords", axis=1)
        order.append(block.index.reshape(-1))
        if len(w) == 0:
            parts.append(node("Mul", [x, const(f"{name}_zero", np.float32(0))], f"{name}_reconstruction"))
            continue
        rows = x if block.copies == 1 else node(
            "Reshape", [x, const(f"{name}_rows", np.array([-1, block.dim], np.int64))], f"{name}_copies")
        if weight_bits is None:
            weights = const(f"{name}_basis", np.ascontiguousarray(w, np.float32))
            code = node("Gemm", [rows, weights], f"{name}_code", transB=1)
            back = node("MatMul", [code, weights], f"{name}_back")
        else:
            block_size = WEIGHT_BITS[weight_bits]
            outputs = []
            for step, (matrix, source) in enumerate(((w, rows), (w.T, None))):
                codes, scales = quantize_rows(np.ascontiguousarray(matrix, np.float32), weight_bits, block_size)
                label = f"{name}_{'encode' if step == 0 else 'decode'}"
                source = source if step == 0 else outputs[0]
                nodes.append(helper.make_node(
                    "MatMulNBits", [source, const(f"{label}_codes", codes), const(f"{label}_scales", scales)],
                    [f"{label}_out"], name=f"{label}_out", domain="com.microsoft",
                    K=matrix.shape[1], N=matrix.shape[0], bits=weight_bits, block_size=block_size,
                    accuracy_level=ACCURACY_LEVEL))
                outputs.append(f"{label}_out")
            back = outputs[1]
        if block.copies > 1:
            back = node("Reshape", [back, const(f"{name}_flat", np.array([-1, block.copies * block.dim], np.int64))],
                        f"{name}_back_flat")
        parts.append(back)
    blocks = node("Concat", parts, "block_reconstruction", axis=1) if len(parts) > 1 else parts[0]
    rec = node("Gather", [blocks, const("unblock", np.argsort(np.concatenate(order)).astype(np.int64))],
               "coefficient_reconstruction", axis=1) if isinstance(basis, D4Basis) else blocks
    if isinstance(basis, D4Basis):
        r8 = node("Slice", [rec, const("s8_start", np.array([0], np.int64)), const("s8_end", np.array([8 * o8], np.int64)),
                            const("s_axis", np.array([1], np.int64))], "rec8")
        r4 = node("Slice", [rec, const("s4_start", np.array([8 * o8], np.int64)), const("s4_end", np.array([pixels], np.int64)),
                            "s_axis"], "rec4")
        p8 = node("MatMul", [node("Reshape", [r8, const("orbit8_shape", np.array([-1, o8, 8], np.int64))], "rec8_orbits"),
                             const("from_irreps8", basis.t8.astype(np.float32))], "rec8_pixels")
        p4 = node("MatMul", [node("Reshape", [r4, const("orbit4_shape", np.array([-1, o4, 4], np.int64))], "rec4_orbits"),
                             const("from_irreps4", basis.t4.astype(np.float32))], "rec4_pixels")
        orbit_order = np.concatenate([basis.idx8.reshape(-1), basis.idx4.reshape(-1)])
        gathered = node("Concat", [node("Reshape", [p8, "flat8"], "rec8_flat"), node("Reshape", [p4, "flat4"], "rec4_flat")],
                        "orbit_order_reconstruction", axis=1)
        rec = node("Gather", [gathered, const("unorbit", np.argsort(orbit_order).astype(np.int64))], "pixel_reconstruction", axis=1)
    out = node("Add", [rec, "mean"], "flat_reconstruction")
    nodes.append(helper.make_node("Reshape", [out, const("image_shape", np.array([-1, height, width], np.int64))],
                                  [OUTPUT_NAME], name="image_shape_out"))
    graph = helper.make_graph(
        nodes, "linear_ae",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", height, width])],
        initializer=inits,
    )
    domains = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if weight_bits else [])
    proto = helper.make_model(graph, opset_imports=domains, producer_name="edge-inspect")
    onnx.checker.check_model(proto, full_check=weight_bits is None)  # the checker cannot infer contrib ops' shapes
    return proto


def dense_graph(model, size: tuple[int, int], opset: int):
    """A Keras linear-ae's ONNX graph (runs trained before ``model.npz``): two Gemms sharing one matrix.

    tf2onnx freezes each Dense kernel into a constant and its optimizers copy
    constants many times over: for the default linear-ae (256 x 256 pixels,
    1,024 components, two 268 MB kernels) the conversion passed 21 GB of
    memory and was killed on a 24 GB machine. The graph is two matrix
    products, so it is written here with ``onnx.helper``, from the Keras
    weights, and checked against Keras like every other export:

        reconstruction = reshape(Gemm(Gemm(x - mean, W, transB=1), W) + mean)

    ``W`` (``(K, P)``, the axes) is stored once: the encoder uses it
    transposed through ``transB``. Same interface as :func:`export.to_onnx.convert`.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    height, width = size
    kernel, _ = model.encoder.get_layer("project").get_weights()  # (P, K) = W.T
    axes, mean = model.decoder.get_layer("reconstruct").get_weights()  # (K, P), (P,)
    if not np.allclose(kernel.T, axes):
        raise ModelCardError("The linear-ae's encoder and decoder do not hold the same axes; refit the model.")
    pixels = height * width
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(axes, np.float32), "axes"),
        numpy_helper.from_array(mean.astype(np.float32), "mean"),
        numpy_helper.from_array(np.array([-1, pixels], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([-1, height, width], np.int64), "image_shape"),
    ]
    nodes = [
        helper.make_node("Reshape", [INPUT_NAME, "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Sub", ["flat", "mean"], ["centred"], name="centre"),
        helper.make_node("Gemm", ["centred", "axes"], ["code"], name="project", transB=1),
        helper.make_node("Gemm", ["code", "axes", "mean"], ["flat_reconstruction"], name="reconstruct"),
        helper.make_node("Reshape", ["flat_reconstruction", "image_shape"], [OUTPUT_NAME], name="image_shape"),
    ]
    graph = helper.make_graph(
        nodes, "linear_ae",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", height, width])],
        initializer=initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edge-inspect")
    onnx.checker.check_model(proto, full_check=True)
    return proto
