"""Export a trained, calibrated run to a model folder: ONNX graphs and the model card.

This module owns the step from a run folder (``model.keras``,
``config.json``, ``split.json``, ``calibration.json``) to a model folder that
the lean runtime loads (:mod:`edge_inspect.card` describes it):

1. convert with tf2onnx a ``tf.function`` that calls the model on
   ``(batch, H, W)`` images and returns ``(batch, H, W)`` reconstructions:
   the layout the runtime's preprocessing writes and the kernels read, so
   neither side copies, and a layout in which tf2onnx needs no NHWC<->NCHW
   transposes around the convolutions (one channel: the channel axis is a
   reshape). The VAEs' ``call`` is already deterministic, ``decoder(z_mean)``;
2. check fp32 parity on the run's held-out normal images: ONNX Runtime
   against Keras, maximum absolute difference at most :data:`FP32_TOLERANCE`
   and identical verdicts for every criterion;
3. optionally derive ``fp16`` (onnxconverter-common, fp32 inputs and outputs
   kept) and ``int8`` (static QDQ quantisation with onnxruntime.quantization,
   calibrated on the run's training normals) graphs, and report their score
   change, verdict agreement and AUC change against fp32; refuse one whose
   verdicts agree with fp32 on fewer than :data:`MIN_AGREEMENT` of the images,
   unless forced;
4. write everything to a temporary folder beside the target, then rename.

    >>> report = export_run("runs/conv-ae", "models/conv-ae", precisions=("int8",))
    >>> report.files["int8"]["parity"]["verdict_agreement"]
    1.0
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_inspect import __version__
from edge_inspect.calibrate import auc, is_anomalous, load_calibration, oriented
from edge_inspect.card import (
    CARD_FILE,
    INPUT_NAME,
    KIND,
    LAYOUT,
    MODEL_FILES,
    OUTPUT_NAME,
    PRECISIONS,
    SCHEMA,
    metadata_props,
    sha256_bytes,
    sha256_file,
    write_card,
)
from edge_inspect.errors import ConfigError, MissingExtraError, ModelCardError
from edge_inspect.kernels import CRITERIA, criteria

log = logging.getLogger(__name__)

#: Opsets the export supports: tf2onnx 1.17 writes up to 18; per-channel
#: quantisation needs 13.
SUPPORTED_OPSETS = range(13, 19)
DEFAULT_OPSET = 17
#: fp32 graph against Keras, on [0, 1] reconstructions.
FP32_TOLERANCE = 1e-4
#: A score this close to its threshold (relative to the threshold or the
#: criterion's standard deviation) is a tie in the fp32 verdict check.
TIE_RTOL = 1e-5
#: Least share of images on which a reduced-precision graph's verdicts must
#: agree with fp32's, unless forced.
MIN_AGREEMENT = 0.99
#: Training normals the int8 quantiser sees to set activation ranges.
QUANT_CALIBRATION_IMAGES = 128


@dataclass
class ExportReport:
    """What :func:`export_run` wrote and measured.

    Attributes:
        out_dir: the model folder.
        card: the card as written.
        files: precision -> ``{"file", "bytes", "sha256", "parity"}`` (the
            card's ``files`` entry).
        seconds: wall time of the export.
    """

    out_dir: Path
    card: dict
    files: dict = field(default_factory=dict)
    seconds: float = 0.0


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    precisions: Sequence[str] = ("fp32",),
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    anomalous_dir: str | os.PathLike | None = None,
    default_precision: str | None = None,
) -> ExportReport:
    """Export a calibrated run folder to a model folder.

    Args:
        run_dir: a trained run folder with ``calibration.json``.
        out_dir: the model folder to write. It may not exist yet, be empty,
            or hold an earlier export of the same ``model.keras`` (which is
            then replaced as a whole: list every precision wanted).
        precisions: any of ``fp32``, ``fp16``, ``int8``; fp32
            (``model.onnx``) is always written, as the reference.
        opset: the ONNX opset, in :data:`SUPPORTED_OPSETS`.
        force: write a reduced-precision graph even when its verdicts agree
            with fp32 on fewer than :data:`MIN_AGREEMENT` of the images.
        anomalous_dir: labelled defective images, to report the AUC change
            of reduced precisions (the calibration data of a label-free
            calibration holds normal images only).
        default_precision: the precision the runtime loads when none is
            asked for (default: int8 if exported, else fp16, else fp32).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ModelCardError: not a run folder, no calibration, held-out images
            gone, an output folder holding something else, fp32 parity
            failed.
        ConfigError: unsupported opset or precision; a reduced precision
            refused for disagreeing verdicts (without ``force``).
        MissingExtraError: fp16 asked for without onnxconverter-common.
    """
    start = time.monotonic()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    precisions = _check_precisions(precisions)
    if opset not in SUPPORTED_OPSETS:
        raise ConfigError(
            f"Unsupported opset {opset}. Expected {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1} "
            f"(tf2onnx writes up to {SUPPORTED_OPSETS.stop - 1}; int8 needs 13 or later); default {DEFAULT_OPSET}."
        )
    default_precision = default_precision or [p for p in ("int8", "fp16", "fp32") if p in precisions][0]
    if default_precision not in precisions:
        raise ConfigError(f"Default precision {default_precision} is not among the exported {', '.join(precisions)}.")
    if (run_dir / "model.keras").is_file() and not (run_dir / "calibration.json").is_file():
        raise ModelCardError(
            f"'{run_dir}' has no calibration.json, so there is no threshold to put in the model card. "
            f"Run: edge-inspect calibrate {run_dir}"
        )
    from export.scoring import load_run

    run = load_run(run_dir)
    calibration = load_calibration(run_dir / "calibration.json")
    keras_sha = sha256_file(run_dir / "model.keras")
    _check_out_dir(out_dir, keras_sha)

    normals = run.held_out_normals("The parity check")
    from export.data import load_batch, scan_folder

    images = load_batch(normals, run.size)[..., 0]
    anomalous = None
    if anomalous_dir is not None:
        anomalous = load_batch(scan_folder(anomalous_dir, run.size).paths, run.size)[..., 0]

    how = "writing its two Gemms directly" if run.kind == "linear-ae" else "with tf2onnx"
    log.info("Converting %s (%s, %dx%d) %s, opset %d", run_dir, run.kind, *run.size, how, opset)
    fp32 = convert(run.model, run.size, opset)
    card = _card(run, calibration, keras_sha, opset, default_precision)

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = {}
        log.info("Checking fp32 parity against Keras on %d held-out normal images", len(images))
        fp32_bytes = _stamp(fp32, card, "fp32")
        parity, fp32_scores = _fp32_parity(run, fp32_bytes, images, calibration)
        files["fp32"] = _write(tmp, "fp32", fp32_bytes, parity)
        fp32_anomalous = _scores(fp32_bytes, anomalous) if anomalous is not None else None
        for precision in precisions:
            if precision == "fp32":
                continue
            log.info("Deriving the %s graph", precision)
            reduced = to_fp16(fp32) if precision == "fp16" else quantize_int8(fp32, _quant_images(run), tmp)
            data = _stamp(reduced, card, precision)
            parity = _reduced_parity(precision, data, images, anomalous, fp32_scores, fp32_anomalous, calibration, force)
            files[precision] = _write(tmp, precision, data, parity)
        card["files"] = files
        write_card(card, tmp)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Wrote %s (%s)", out_dir, ", ".join(files))
    return ExportReport(out_dir, card, files, time.monotonic() - start)


# ------------------------------------------------------------------ convert


def convert(model, size: tuple[int, int], opset: int = DEFAULT_OPSET, *, subpixel: bool = True):
    """The ONNX graph of ``model``'s reconstruction, ``(batch, H, W)`` in and out.

    Args:
        model: a Keras model taking ``(n, H, W, 1)`` float32 in [0, 1].
        size: ``(H, W)``.
        opset: the ONNX opset.
        subpixel: replace transposed convolutions with the equivalent
            Conv + DepthToSpace (:func:`subpixel_conv_transpose`), then move
            a pixel shuffle past the narrow Conv that follows it
            (:func:`shuffle_after_narrow_conv`).

    Returns:
        An ``onnx.ModelProto`` with input :data:`~edge_inspect.card.INPUT_NAME`
        and output :data:`~edge_inspect.card.OUTPUT_NAME`, float32, the batch
        axis named ``batch``.
    """
    if getattr(model, "name", None) == "linear_ae":
        return linear_graph(model, size, opset)
    import tensorflow as tf
    import tf2onnx

    height, width = size
    spec = [tf.TensorSpec([None, height, width], tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=spec)
    def reconstruction(image):
        return model(image[..., None], training=False)[..., 0]

    proto, _ = tf2onnx.convert.from_function(reconstruction, input_signature=spec, opset=opset)
    graph = proto.graph
    old = graph.output[0].name
    for node in graph.node:
        node.output[:] = [OUTPUT_NAME if name == old else name for name in node.output]
    graph.output[0].name = OUTPUT_NAME
    for value in (*graph.input, *graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return shuffle_after_narrow_conv(subpixel_conv_transpose(proto)) if subpixel else proto


def linear_graph(model, size: tuple[int, int], opset: int = DEFAULT_OPSET):
    """The linear-ae's ONNX graph, written directly: two Gemms sharing one matrix.

    tf2onnx freezes each Dense kernel into a constant and its optimizers copy
    constants many times over: for the default linear-ae (256 x 256 pixels,
    1,024 components, two 268 MB kernels) the conversion passed 21 GB of
    memory and was killed on a 24 GB machine. The graph is two matrix
    products, so it is written here with ``onnx.helper``, from the Keras
    weights, and checked against Keras like every other export:

        reconstruction = reshape(Gemm(Gemm(x - mean, W, transB=1), W) + mean)

    ``W`` (``(K, P)``, the axes) is stored once: the encoder uses it
    transposed through ``transB``. Same interface as :func:`convert`.
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


def subpixel_conv_transpose(proto):
    """Replace each stride-s ``ConvTranspose`` by an equivalent ``Conv`` and pixel shuffle.

    Why: ONNX Runtime has no integer kernel for a quantised ConvTranspose
    (it dequantises and runs it in fp32), and the conv AE's decoder spends
    most of its FLOPs there. A regular Conv quantises to ``QLinearConv``.

    The equivalence (one axis; the two axes are independent). A transposed
    convolution with kernel k, stride s and leading padding p computes
    ``Y[y] = sum_{i, t: s*i + t = y + p} X[i] * W[t]``. Write each output
    position as ``y = s*m + q`` with phase ``q`` in ``[0, s)``: the taps that
    reach it are the ``t = q + p - s*d`` in ``[0, k)``, reading input
    ``i = m + d``. So phase ``q`` is an ordinary correlation of X over the
    offsets d with the kernel ``K_q[d] = W[q + p - s*d]`` (zero where that
    index falls outside the kernel). One Conv computes all ``s*s`` phases
    as ``s*s`` times the output channels, padded by ``-min(d)`` before and
    ``max(d)`` after; ``DepthToSpace`` (CRD, block s) interleaves the phases
    back into the ``s``-times larger image. A Relu after the ConvTranspose
    moves before the shuffle (:func:`_relu_before_shuffle`), so that int8
    shuffles uint8 values (:func:`_uint8_shuffles`). The output keeps the input's
    size times s exactly when ``k - p_begin - p_end == s`` (TensorFlow's
    "same" padding), the only case rewritten; dilated, grouped or
    ``output_shape`` transposed convolutions are left alone.

    For the conv AE (k=5, s=2, pads (1, 2)) the Conv is 3x3 with 25 of its
    36 taps non-zero per input channel and phase: 44 % more multiply-adds
    than the ConvTranspose, in a form every provider runs fast and int8
    quantises. ``tests/export/test_to_onnx.py`` checks the rewrite on random
    weights and inputs, and every export checks it against Keras.

    Returns:
        A new ``onnx.ModelProto``; ``proto`` is not modified.
    """
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        rewritten = _subpixel(node, inits, helper, numpy_helper) if node.op_type == "ConvTranspose" else None
        if rewritten is None:
            nodes.append(node)
            continue
        new_nodes, new_inits = rewritten
        nodes += new_nodes
        graph.initializer.extend(new_inits)
    _relu_before_shuffle(nodes)
    _set_nodes(graph, nodes)
    return proto


MAX_TAP_RATIO = 1.5  # shuffle_after_narrow_conv: multiply-adds allowed, x the original Conv's


def shuffle_after_narrow_conv(proto):
    """Run a ``DepthToSpace -> Conv`` pair as ``Conv -> DepthToSpace`` when the Conv narrows.

    Why: the conv AE ends with a pixel shuffle to 32 channels at full size
    and a 5 x 5 Conv from those 32 channels to the single output channel.
    On the CPU both are slow for their size: the shuffle moves every value
    of the largest tensor of the graph, with a transpose either side of it
    in int8 (ONNX Runtime runs QLinearConv in NHWC), and a one-channel Conv
    is a matrix-vector product after an image-sized im2col. Together they
    were a quarter of the int8 graph's time. Run instead at the shuffle's
    input size, on the phases, the Conv produces its output's phases, and
    the shuffle then moves one channel's worth of values.

    The equivalence (one axis; the two axes are independent). With block
    size s, the shuffle writes phase ``r`` of input channel ``c`` at
    ``X[s*m + r] = P_{c,r}[m]``. The Conv (stride 1, kernel k, leading pad
    p, ``k - 1`` pads in all so the size is kept) computes
    ``Y[y] = b + sum_t W[t] * X[y + t - p]``. Write ``y = s*m + q``: tap t
    reads ``X[s*m + q + t - p] = P_r[m + e]`` with ``r = (q + t - p) mod s``
    and ``e = (q + t - p) // s``. So output phase q is an ordinary
    correlation of the input phases over the offsets e, with the kernel
    ``K[q, r, e] = sum of W[t] over the taps t that land on (r, e)``.
    Zero padding agrees: ``s*m + j`` is outside ``[0, s*H)`` exactly when
    m is outside ``[0, H)``. An element-wise Sigmoid or Relu after the
    Conv commutes with the shuffle and moves before it.

    Rewritten only when it pays: the Conv narrows (``Cout * s * s <= Cin``:
    the moved shuffle carries no more values than before) and its
    multiply-adds grow by at most :data:`MAX_TAP_RATIO` (the offsets e of
    a 5 x 5 Conv after a 2 x shuffle span 3 x 3 low-size taps, so
    ``4 * 9 / 25 = 1.44``; a 3 x 3 Conv would cost 4x and is left alone).
    ``tests/export/test_to_onnx.py`` checks it on random weights, and every
    export checks the whole graph against Keras.

    Returns:
        A new ``onnx.ModelProto``; ``proto`` is not modified.
    """
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    for conv in [n for n in nodes if n.op_type == "Conv"]:
        producer = {o: n for n in nodes for o in n.output}
        consumers: dict[str, list] = {}
        for node in nodes:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        shuffle = producer.get(conv.input[0])
        if shuffle is None or shuffle.op_type != "DepthToSpace" or len(consumers[shuffle.output[0]]) != 1:
            continue
        rewritten = _phase_conv(conv, shuffle, inits, helper, numpy_helper)
        if rewritten is None:
            continue
        weight, bias, pads, block = rewritten
        base = conv.name or conv.output[0]
        names = [f"{base}/phase_weight", f"{base}/phase_bias"]
        graph.initializer.extend([numpy_helper.from_array(weight, names[0]), numpy_helper.from_array(bias, names[1])])
        phases = f"{base}/phases"
        new_conv = helper.make_node("Conv", [shuffle.input[0], *names], [phases], name=f"{base}/phase_conv",
                                    kernel_shape=list(weight.shape[2:]), pads=pads, strides=[1, 1])
        chain, last = [new_conv], conv.output[0]
        after = consumers.get(last, [])
        if len(after) == 1 and after[0].op_type in ("Sigmoid", "Relu") and last not in {o.name for o in graph.output}:
            act = after[0]
            last = act.output[0]
            chain.append(helper.make_node(act.op_type, [phases], [f"{phases}/{act.op_type.lower()}"], name=act.name))
            nodes.remove(act)
        moved = helper.make_node("DepthToSpace", [chain[-1].output[0]], [last], name=shuffle.name,
                                 blocksize=block, mode="CRD")
        at = nodes.index(conv)
        nodes[at:at + 1] = [*chain, moved]
        nodes.remove(shuffle)
    _set_nodes(graph, nodes)
    return proto


def _phase_conv(conv, shuffle, inits, helper, numpy_helper):
    """``(weight, bias, pads, block)`` of the Conv on the phases, or None when not worth it or not rewritable."""
    shuffle_attrs = {a.name: helper.get_attribute_value(a) for a in shuffle.attribute}
    if shuffle_attrs.get("mode", b"DCR") not in (b"CRD", "CRD"):
        return None
    s = shuffle_attrs["blocksize"]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if conv.input[1] not in inits or len(conv.input) < 3 or conv.input[2] not in inits:
        return None
    if attrs.get("group", 1) != 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    if any(v != 1 for v in attrs.get("strides", [1, 1])) or any(v != 1 for v in attrs.get("dilations", [1, 1])):
        return None
    weight = numpy_helper.to_array(inits[conv.input[1]])  # (Cout, Cin, kh, kw)
    bias = numpy_helper.to_array(inits[conv.input[2]])
    if weight.ndim != 4:
        return None
    cout, cin, *kernel = weight.shape
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if any(pads[a] + pads[a + 2] != kernel[a] - 1 for a in range(2)) or cout * s * s > cin:
        return None
    low = [-pads[a] // s for a in range(2)]
    high = [(s - 1 + kernel[a] - 1 - pads[a]) // s for a in range(2)]
    size = [high[a] - low[a] + 1 for a in range(2)]
    if s * s * size[0] * size[1] > MAX_TAP_RATIO * kernel[0] * kernel[1]:
        return None
    phase_w = np.zeros((cout, s, s, cin, s, s, *size), weight.dtype)
    for qy in range(s):
        for qx in range(s):
            for ty in range(kernel[0]):
                ey, ry = divmod(qy + ty - pads[0], s)
                for tx in range(kernel[1]):
                    ex, rx = divmod(qx + tx - pads[1], s)
                    phase_w[:, qy, qx, :, ry, rx, ey - low[0], ex - low[1]] += weight[:, :, ty, tx]
    phase_w = phase_w.reshape(cout * s * s, cin * s * s, *size)  # CRD on both sides: channel = c*s*s + r*s + q
    return phase_w, np.repeat(bias, s * s), [-low[0], -low[1], high[0], high[1]], s


def _set_nodes(graph, nodes: list) -> None:
    """Make ``nodes`` the graph's nodes and drop the initializers no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _relu_before_shuffle(nodes: list) -> None:
    """Swap ``DepthToSpace -> Relu`` into ``Relu -> DepthToSpace``, in place.

    A pixel shuffle only moves values, so it commutes with an element-wise
    Relu. With the Relu next to the Conv, the quantiser folds it into the
    QLinearConv's output range, and the shuffle sees the same values as the
    Relu's output: the same quantisation parameters on both sides, which is
    what lets :func:`_uint8_shuffles` run it on uint8.
    """
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for shuffle in [n for n in nodes if n.op_type == "DepthToSpace"]:
        after = consumers.get(shuffle.output[0], [])
        if len(after) != 1 or after[0].op_type != "Relu":
            continue
        relu = after[0]
        phases, shuffled, activated = shuffle.input[0], shuffle.output[0], relu.output[0]
        relu.input[0], relu.output[0] = phases, shuffled
        shuffle.input[0], shuffle.output[0] = shuffled, activated
        nodes.remove(relu)
        nodes.insert(nodes.index(shuffle), relu)


def _uint8_shuffles(proto) -> int:
    """Run each ``DequantizeLinear -> DepthToSpace -> QuantizeLinear`` on uint8, in place.

    The quantiser has no rule for DepthToSpace and wraps it in float. When
    the Dequantize and the Quantize use the same scale and zero point (a
    shuffle's output has its input's range), ``Q(shuffle(DQ(x)))`` is
    exactly ``shuffle(x)``: the pair is dropped and the shuffle moves uint8
    values, a quarter of the bytes. Returns how many were rewritten.
    """
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop, count = [], 0
    for shuffle in [n for n in graph.node if n.op_type == "DepthToSpace"]:
        dq = producer.get(shuffle.input[0])
        after = consumers.get(shuffle.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q = after[0]
        params = [(inits.get(a), inits.get(b)) for a, b in ((dq.input[1], q.input[1]), (dq.input[2], q.input[2]))]
        if any(x is None or y is None or x.shape != () or not np.array_equal(x, y) or x.dtype != y.dtype
               for x, y in params):
            continue
        shuffle.input[0], shuffle.output[0] = dq.input[0], q.output[0]
        drop.append(q)
        if len(consumers.get(dq.output[0], [])) == 1:
            drop.append(dq)
        count += 1
    for node in drop:
        graph.node.remove(node)
    return count


def _subpixel(node, inits, helper, numpy_helper):
    """The Conv + DepthToSpace pair for one ConvTranspose node, or None when not rewritable."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.input[1] not in inits or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits):
        return None
    weight = numpy_helper.to_array(inits[node.input[1]])  # (Cin, Cout, kh, kw)
    if weight.ndim != 4 or attrs.get("group", 1) != 1 or "output_shape" in attrs:
        return None
    if any(v != 1 for v in attrs.get("dilations", [1, 1])) or any(attrs.get("output_padding", [0, 0])):
        return None
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    strides = list(attrs.get("strides", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if strides[0] != strides[1] or strides[0] < 2:
        return None
    s = strides[0]
    kernel = weight.shape[2:]
    if any(kernel[a] - pads[a] - pads[a + 2] != s for a in range(2)):
        return None
    taps = []  # per axis: {phase: {offset d: kernel index t}}, and the offset range
    for a in range(2):
        per_phase = {q: {} for q in range(s)}
        for q in range(s):
            for t in range(kernel[a]):
                if (q + pads[a] - t) % s == 0:
                    per_phase[q][(q + pads[a] - t) // s] = t
        offsets = [d for phase in per_phase.values() for d in phase]
        taps.append((per_phase, min(offsets), max(offsets)))
    (rows, r0, r1), (cols, c0, c1) = taps
    cin, cout = weight.shape[:2]
    conv_w = np.zeros((cout, s, s, cin, r1 - r0 + 1, c1 - c0 + 1), weight.dtype)
    for qy in range(s):
        for qx in range(s):
            for dy, ty in rows[qy].items():
                for dx, tx in cols[qx].items():
                    conv_w[:, qy, qx, :, dy - r0, dx - c0] = weight[:, :, ty, tx].T
    conv_w = conv_w.reshape(cout * s * s, cin, r1 - r0 + 1, c1 - c0 + 1)  # CRD: channel = o*s*s + qy*s + qx
    base = node.name or node.output[0]
    inputs = [node.input[0], f"{base}/subpixel_weight"]
    new_inits = [numpy_helper.from_array(conv_w, inputs[1])]
    if len(node.input) > 2 and node.input[2]:
        bias = numpy_helper.to_array(inits[node.input[2]])
        inputs.append(f"{base}/subpixel_bias")
        new_inits.append(numpy_helper.from_array(np.repeat(bias, s * s), inputs[2]))
    phases = f"{base}/subpixel_phases"
    conv = helper.make_node("Conv", inputs, [phases], name=f"{base}/subpixel_conv",
                            kernel_shape=list(conv_w.shape[2:]), pads=[-r0, -c0, r1, c1], strides=[1, 1])
    shuffle = helper.make_node("DepthToSpace", [phases], [node.output[0]], name=f"{base}/subpixel_shuffle",
                               blocksize=s, mode="CRD")
    return [conv, shuffle], new_inits


def _stamp(proto, card: dict, precision: str) -> bytes:
    """Serialise ``proto`` with the card's facts in its metadata_props."""
    import onnx

    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # a copy: stamping must not leak
    del proto.metadata_props[:]
    for key, value in metadata_props(card, precision).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "edge-inspect"
    proto.producer_version = __version__
    proto.doc_string = (f"edge-inspect {card['model']['kind']} reconstruction, {precision}: "
                        f"{INPUT_NAME} (batch, {card['preprocessing']['height']}, {card['preprocessing']['width']}) "
                        f"float32 in [0, 1] -> {OUTPUT_NAME}, same shape. See {CARD_FILE}.")
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def to_fp16(proto):
    """An fp16 copy of the graph, with fp32 input and output (casts at the edges).

    Raises:
        MissingExtraError: onnxconverter-common is not installed.
    """
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise MissingExtraError(
            "fp16 export needs onnxconverter-common. Install it with: pip install 'edge-inspect[train]'"
        ) from exc
    import warnings

    with warnings.catch_warnings():
        # One warning per weight below fp16's smallest normal number, which
        # is flushed to +-1e-7; the parity check measures what that costs.
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(proto, keep_io_types=True)


def quantize_int8(proto, calibration_images: np.ndarray, workdir: Path, batch_size: int = 8):
    """A static int8 QDQ copy of the graph, activation ranges from ``calibration_images``.

    Weights are quantised per channel to int8, activations to uint8
    (``QuantFormat.QDQ``, MinMax ranges). ONNX Runtime fuses each
    DequantizeLinear -> op -> QuantizeLinear group into an integer kernel
    where it has one (Conv -> QLinearConv; a ConvTranspose stays fp32, hence
    :func:`subpixel_conv_transpose`).

    ``reduce_range``: weights use 7 of their 8 bits. On x86 CPUs without
    VNNI (AVX2, like the line PCs and this project's 2-core benchmark
    machine) ONNX Runtime multiplies uint8 by int8 with ``vpmaddubsw``, whose
    int16 pair sums saturate with full-range weights. Measured on the
    128 px conv AE (docs/benchmarks.md): without it reconstructions moved by
    up to 0.21 and 3.8 % of verdicts flipped; with it, 0.018 and 0.3 %.

    Args:
        proto: the fp32 ``onnx.ModelProto``.
        calibration_images: ``(N, H, W)`` float32 normal images.
        workdir: a folder for the quantiser's temporary files.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT_NAME: calibration_images[i:i + batch_size]}
                                 for i in range(0, len(calibration_images), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    src, pre, dst = workdir / ".fp32.onnx", workdir / ".fp32.pre.onnx", workdir / ".int8.onnx"
    try:
        onnx.save(proto, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(dst), Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
        )
        quantised = onnx.load(dst)
        log.info("Pixel shuffles moved to uint8: %d", _uint8_shuffles(quantised))
        return quantised
    finally:
        for path in (src, pre, dst):
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------- parity


def _session(data: bytes):
    from edge_inspect.session import create_session

    return create_session(data, "cpu", name="the exported graph")[0]


def _run(session, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + batch_size]})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.empty_like(images)


def _scores(data: bytes, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    recons = _run(_session(data), images)
    return recons, criteria(images, recons)


def _verdicts(scores: np.ndarray, calibration: dict) -> dict[str, np.ndarray]:
    return {name: np.asarray(is_anomalous(scores[:, j], calibration["criteria"][name]))
            for j, name in enumerate(CRITERIA) if name in calibration["criteria"]}


def _fp32_parity(run, data: bytes, images: np.ndarray, calibration: dict):
    """ONNX Runtime against Keras: reconstructions within tolerance, verdicts identical.

    An image whose Keras score sits on a threshold (within :data:`TIE_RTOL`
    of it, relative to the threshold or the criterion's spread) is a tie,
    not a disagreement: a quantile threshold is often one of the
    calibration images' own scores, which float rounding then puts on
    either side. Ties are counted in the report.
    """
    from export.scoring import reconstruct

    keras_recons = reconstruct(run.model, images)
    recons, scores = _scores(data, images)
    diff = float(np.abs(recons - keras_recons).max())
    keras_scores = criteria(images, keras_recons)
    keras_verdicts, onnx_verdicts = _verdicts(keras_scores, calibration), _verdicts(scores, calibration)
    disagreeing, ties = {}, {}
    for name in onnx_verdicts:
        entry = calibration["criteria"][name]
        o = oriented(keras_scores[:, CRITERIA.index(name)], entry)
        tie = np.abs(o - entry["threshold"]) <= TIE_RTOL * max(abs(entry["threshold"]), entry["std"], 1e-12)
        differ = keras_verdicts[name] != onnx_verdicts[name]
        disagreeing[name], ties[name] = int((differ & ~tie).sum()), int((differ & tie).sum())
    parity = {
        "reference": "keras",
        "images": int(len(images)),
        "max_abs_diff": diff,
        "tolerance": FP32_TOLERANCE,
        "verdicts_identical": not any(disagreeing.values()),
        "disagreeing_verdicts": disagreeing,
        "ties_at_threshold": ties,
    }
    if not diff <= FP32_TOLERANCE or not parity["verdicts_identical"]:
        raise ModelCardError(
            f"fp32 parity failed on {len(images)} held-out images: ONNX Runtime differs from Keras by up to "
            f"{diff:.3g} (tolerance {FP32_TOLERANCE:g}); verdicts differing per criterion: {disagreeing}. "
            "Nothing was written. Report this with the run folder; try another --opset."
        )
    return parity, (recons, scores)


def _reduced_parity(precision, data, images, anomalous, fp32_scores, fp32_anomalous, calibration, force) -> dict:
    recons, scores = _scores(data, images)
    ref_recons, ref_scores = fp32_scores
    name = calibration["default_criterion"]
    entry, column = calibration["criteria"][name], CRITERIA.index(name)
    ref_o, o = oriented(ref_scores[:, column], entry), oriented(scores[:, column], entry)
    all_scores, all_ref = scores, ref_scores
    auc_report = None
    if anomalous is not None:
        anomalous_recons, anomalous_scores = _scores(data, anomalous)
        all_scores = np.concatenate([scores, anomalous_scores])
        all_ref = np.concatenate([ref_scores, fp32_anomalous[1]])
        auc_fp32 = auc(ref_o, oriented(fp32_anomalous[1][:, column], entry))
        auc_here = auc(o, oriented(anomalous_scores[:, column], entry))
        auc_report = {"fp32": auc_fp32, precision: auc_here, "change": auc_here - auc_fp32,
                      "normal": int(len(images)), "anomalous": int(len(anomalous))}
    ref_verdicts, verdicts = _verdicts(all_ref, calibration), _verdicts(all_scores, calibration)
    agreement = {k: float(np.mean(ref_verdicts[k] == verdicts[k])) for k in verdicts}
    change = np.abs(o - ref_o)
    parity = {
        "reference": "fp32",
        "images": int(len(all_scores)),
        "max_abs_diff": float(np.abs(recons - ref_recons).max()),
        "score_change": {
            "criterion": name,
            "median_abs": float(np.median(change)),
            "max_abs": float(change.max()),
            "max_relative_to_threshold": float(change.max() / max(abs(entry["threshold"]), 1e-12)),
        },
        "verdict_agreement": agreement[name],
        "verdict_agreement_by_criterion": agreement,
        "min_agreement": MIN_AGREEMENT,
        "auc": auc_report if auc_report is not None else
        "not measured: the calibration data holds normal images only; pass --anomalous DIR",
        "forced": False,
    }
    if agreement[name] < MIN_AGREEMENT:
        if not force:
            raise ConfigError(
                f"The {precision} graph's verdicts ({name}) agree with fp32 on {agreement[name]:.1%} of "
                f"{len(all_scores)} images, under the required {MIN_AGREEMENT:.0%} (scores moved by up to "
                f"{change.max():.3g}, threshold {entry['threshold']:.3g}). Nothing was written. Export fp32 only, "
                "or pass --force to write it anyway."
            )
        parity["forced"] = True
        log.warning("Writing %s although its verdicts agree with fp32 on only %.1f%% (--force)", precision,
                    100 * agreement[name])
    return parity


# -------------------------------------------------------------------- files


def _quant_images(run) -> np.ndarray:
    """Up to QUANT_CALIBRATION_IMAGES training normals, evenly spaced through the split."""
    from export.data import load_batch

    split = json.loads((run.path / "split.json").read_text())
    paths = [Path(split["root"]) / rel for rel in split["train"]]
    paths = [p for p in paths if p.is_file()] or run.held_out_normals()
    step = max(1, len(paths) // QUANT_CALIBRATION_IMAGES)
    return load_batch(paths[::step][:QUANT_CALIBRATION_IMAGES], run.size)[..., 0]


def _write(folder: Path, precision: str, data: bytes, parity: dict) -> dict:
    (folder / MODEL_FILES[precision]).write_bytes(data)
    return {"file": MODEL_FILES[precision], "bytes": len(data), "sha256": sha256_bytes(data), "parity": parity}


def _check_precisions(precisions) -> list[str]:
    wanted = list(dict.fromkeys(["fp32", *precisions]))
    unknown = [p for p in wanted if p not in PRECISIONS]
    if unknown:
        raise ConfigError(f"Unknown precision {unknown[0]!r}. Expected one of: {', '.join(PRECISIONS)}.")
    return wanted


def _check_out_dir(out_dir: Path, keras_sha: str) -> None:
    """Refuse an output folder that holds anything but an export of this model."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ModelCardError(f"Output '{out_dir}' is a file. Choose a folder for --out.")
    entries = list(out_dir.iterdir())
    if not entries:
        return
    card_path = out_dir / CARD_FILE
    if not card_path.is_file():
        raise ModelCardError(
            f"Output folder '{out_dir}' already holds files and no {CARD_FILE}: it is not a model folder. "
            "Choose another --out, or empty it."
        )
    try:
        existing = json.loads(card_path.read_text())
        existing_sha = existing["model"]["keras_sha256"]
        existing_run = existing["model"].get("run", "?")
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelCardError(
            f"Output folder '{out_dir}' holds a {CARD_FILE} that cannot be read as a model card. "
            "Choose another --out, or remove the folder."
        ) from None
    if existing_sha != keras_sha:
        raise ModelCardError(
            f"Output folder '{out_dir}' already holds a different model (exported from {existing_run}, "
            f"model.keras sha256 {existing_sha[:12]}..., this run's is {keras_sha[:12]}...). "
            "Choose another --out, or remove that folder first."
        )


def _replace(tmp: Path, out_dir: Path) -> None:
    """Put the finished ``tmp`` folder at ``out_dir``; a reader sees the old folder or the new, whole."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out_dir)


# --------------------------------------------------------------------- card


def _card(run, calibration: dict, keras_sha: str, opset: int, default_precision: str) -> dict:
    from export.models import stride_of
    from export.models.conv_ae import padding_for

    config = run.config
    height, width = run.size
    state_path = run.path / "checkpoints" / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    return {
        "schema": SCHEMA,
        "kind": KIND,
        "model": {
            "kind": run.kind,
            "latent_dim": config["train"].get("latent_dim") if run.kind != "conv-ae" else None,
            "graph": "decoder(z_mean), no sampling" if run.kind != "conv-ae" else "decoder(encoder(x))",
            "internal_padding": [list(p) for p in padding_for(run.size, stride_of(run.kind))],
            "run": str(run.path.resolve()),
            "keras_sha256": keras_sha,
        },
        "input": {"name": INPUT_NAME, "shape": ["batch", height, width], "dtype": "float32", "layout": LAYOUT,
                  "range": [0.0, 1.0]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", height, width], "dtype": "float32", "layout": LAYOUT,
                   "range": [0.0, 1.0]},
        "preprocessing": {
            **config["preprocessing"],
            "resize": "stretch",
            "padding": "none",
            "cropping": "none",
            "definition": "edge_inspect.preprocess.preprocess",
        },
        "calibration": calibration,
        "training": {
            "data": config.get("data", {}),
            "split": config.get("split", {}),
            "hyperparameters": config.get("train", {}),
            "epochs_run": state.get("epoch"),
            "best_epoch": state.get("best_epoch"),
            "best_val_loss": state.get("best_val_loss") if np.isfinite(state.get("best_val_loss", np.nan)) else None,
            "devices": config.get("devices"),
            "versions": config.get("versions", {}),
        },
        "versions": _versions(),
        "opset": opset,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "default_precision": default_precision,
    }


def _versions() -> dict:
    import onnx
    import onnxruntime
    import tf2onnx

    from export.train import versions

    return {**versions(), "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
