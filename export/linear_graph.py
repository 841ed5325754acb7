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
from export.pca import PIECES, D4Basis, LinearPCA


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


class _Graph:
    """Nodes and initializers of a graph being written; every node is named after its (first) output."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self._names = [], [], set()

    def const(self, name: str, array) -> str:
        if name not in self._names:  # shared constants (shapes, axes) are written once
            self._names.add(name)
            self.inits.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | list[str], **attrs) -> str:
        outputs = [output] if isinstance(output, str) else output
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))
        return outputs[0]

    def project(self, name: str, x: str, w: np.ndarray, weight_bits: int | None, *, columns: bool) -> str:
        """A block's reconstruction ``w.T @ w`` applied to ``x``: ``(n, dim)`` rows, or ``(dim, n)`` with ``columns``.

        One initializer serves both products (Gemm's ``transA``/``transB``).
        With ``weight_bits``, two ``MatMulNBits`` on quantised copies, which
        take rows: columns are transposed around them.
        """
        if len(w) == 0:
            return self.node("Mul", [x, self.const("zero", np.float32(0))], f"{name}_back")
        if weight_bits is None:
            weights = self.const(f"{name}_basis", np.ascontiguousarray(w, np.float32))
            if columns:  # (k, dim) @ (dim, n), then (dim, k) @ (k, n)
                code = self.node("MatMul", [weights, x], f"{name}_code")
                return self.node("Gemm", [weights, code], f"{name}_back", transA=1)
            code = self.node("Gemm", [x, weights], f"{name}_code", transB=1)
            return self.node("MatMul", [code, weights], f"{name}_back")
        source = self.node("Transpose", [x], f"{name}_rows", perm=[1, 0]) if columns else x
        block_size = WEIGHT_BITS[weight_bits]
        for label, matrix in ((f"{name}_encode", w), (f"{name}_decode", w.T)):
            codes, scales = quantize_rows(np.ascontiguousarray(matrix, np.float32), weight_bits, block_size)
            source = self.node("MatMulNBits", [source, self.const(f"{label}_codes", codes),
                                               self.const(f"{label}_scales", scales)], label,
                               domain="com.microsoft", K=matrix.shape[1], N=matrix.shape[0], bits=weight_bits,
                               block_size=block_size, accuracy_level=ACCURACY_LEVEL)
        return self.node("Transpose", [source], f"{name}_back", perm=[1, 0]) if columns else source


def pca_graph(pca: LinearPCA, opset: int, *, weight_bits: int | None = None):
    """The ONNX graph of ``pca.reconstruct``: ``(batch, H, W)`` float32 in and out.

    With ``weight_bits`` (8 or 4), each block's two products become
    ``com.microsoft.MatMulNBits`` on blockwise-quantised copies of the basis
    (one per direction): a quarter (or an eighth) of the weight bytes a lone
    part reads, with int8 compute (:data:`ACCURACY_LEVEL`).
    """
    import onnx
    from onnx import TensorProto, helper

    height, width = pca.size
    pixels = height * width
    g = _Graph()
    flat = g.node("Reshape", [INPUT_NAME, g.const("flat_shape", np.array([-1, pixels], np.int64))], "flat")
    centred = g.node("Sub", [flat, g.const("mean", pca.mean.astype(np.float32))], "centred")
    if isinstance(pca.basis, D4Basis):
        rec = _d4_reconstruction(g, pca, centred, weight_bits)
    else:
        (block,), (w,) = pca.basis.blocks, pca.bases
        rec = g.project(block.name.lower(), centred, w, weight_bits, columns=False)
    out = g.node("Add", [rec, "mean"], "flat_reconstruction")
    g.node("Reshape", [out, g.const("image_shape", np.array([-1, height, width], np.int64))], OUTPUT_NAME)
    graph = helper.make_graph(
        g.nodes, "linear_ae",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", height, width])],
        initializer=g.inits,
    )
    domains = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if weight_bits else [])
    proto = helper.make_model(graph, opset_imports=domains, producer_name="edge-inspect")
    onnx.checker.check_model(proto, full_check=weight_bits is None)  # the checker cannot infer contrib ops' shapes
    return proto


def _d4_reconstruction(g: _Graph, pca: LinearPCA, centred: str, weight_bits: int | None) -> str:
    """Nodes from the centred ``(batch, P)`` pixels to their ``(batch, P)`` reconstruction, through D4's blocks.

    Pixels (then coordinates) run down the first axis and the batch along
    the last: a Gather along axis 0 copies a batch-wide row per index, where
    one along axis 1 went pixel by pixel (2.7 ms a batch of 16 for each of
    three Gathers of 65,536 pixels). The orbits' change of basis multiplies
    from the left, so each row of its result is one irreducible coordinate
    over all orbits, and a block is such rows joined end to end.
    """
    basis = pca.basis
    counts = {8: len(basis.idx8), 4: len(basis.idx4)}
    columns = g.node("Transpose", [centred], "pixels_by_batch", perm=[1, 0])  # (P, batch)
    batch = g.node("Shape", [columns], "batch_size", start=1)
    axis0 = g.const("axis0", np.array([0], np.int64))
    rows = {}
    for size, index, t in ((8, basis.idx8, basis.t8), (4, basis.idx4, basis.t4)):
        count = counts[size]
        gathered = g.node("Gather", [columns, g.const(f"orbits{size}", index.T.astype(np.int64))],
                          f"orbit{size}_pixels", axis=0)  # (size, count, batch)
        flat = g.node("Reshape", [gathered, g.const(f"by_row{size}", np.array([size, -1], np.int64))],
                      f"orbit{size}_rows")
        coef = g.node("MatMul", [g.const(f"to_irreps{size}", t.astype(np.float32)), flat], f"irreps{size}")
        grid = g.node("Reshape", [coef, g.node("Concat", [g.const(f"grid{size}", np.array([size, count], np.int64)),
                                                         batch], f"irreps{size}_shape", axis=0)], f"irreps{size}_grid")
        names = [f"irreps{size}_{r}" for r in range(size)]
        g.node("Split", [grid, g.const(f"ones{size}", np.ones(size, np.int64))], names, axis=0)
        for r, name in enumerate(names):
            rows[size, r] = g.node("Squeeze", [name, axis0], f"{name}_row")  # (count, batch)
    back_rows = {}
    for block, w in zip(basis.blocks, pca.bases):
        name, copies = block.name.lower(), PIECES[block.name]
        joined = [g.node("Concat", [rows[piece] for piece in copy], f"{name}_copy{c}", axis=0) if len(copy) > 1
                  else rows[copy[0]] for c, copy in enumerate(copies)]
        coords = g.node("Concat", joined, f"{name}_coords", axis=1) if len(joined) > 1 else joined[0]
        back = g.project(name, coords, w, weight_bits, columns=True)  # (dim, copies * batch)
        parts = [back]
        if block.copies > 1:
            parts = [f"{name}_back_copy{c}" for c in range(block.copies)]
            halves = g.node("Concat", [batch] * block.copies, f"{name}_copy_sizes", axis=0)
            g.node("Split", [back, halves], parts, axis=1)
        for c, copy in enumerate(copies):
            if len(copy) == 1:
                back_rows[copy[0]] = parts[c]
                continue
            names = [f"{name}_back{c}_{size}_{r}" for size, r in copy]
            sizes = np.array([counts[size] for size, _ in copy], np.int64)
            g.node("Split", [parts[c], g.const(f"{name}_split{c}", sizes)], names, axis=0)
            back_rows.update(zip(copy, names))
    flats = []
    for size, t in ((8, basis.t8), (4, basis.t4)):
        joined = g.node("Concat", [back_rows[size, r] for r in range(size)], f"back{size}", axis=0)
        by_row = g.node("Reshape", [joined, f"by_row{size}"], f"back{size}_rows")
        pixels_back = g.node("MatMul", [g.const(f"from_irreps{size}", t.T.astype(np.float32)), by_row], f"pixels{size}")
        flats.append(g.node("Reshape", [pixels_back, g.const(f"by_pixel{size}", np.array([size * counts[size], -1],
                                                                                            np.int64))],
                            f"pixels{size}_by_batch"))
    orbit_order = np.concatenate([basis.idx8.T.reshape(-1), basis.idx4.T.reshape(-1)])
    gathered = g.node("Gather", [g.node("Concat", flats, "orbit_order_reconstruction", axis=0),
                                 g.const("unorbit", np.argsort(orbit_order).astype(np.int64))], "pixel_columns", axis=0)
    return g.node("Transpose", [gathered], "pixel_reconstruction", perm=[1, 0])


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
