"""Rewrites of the converted ONNX graph that make it faster, each exact: the graph computes the same function.

This module owns the changes made to a graph between tf2onnx and the model
folder, and the producer/consumer index they share (:class:`GraphIndex`):

- :func:`subpixel_conv_transpose`: each strided ``ConvTranspose`` becomes a
  ``Conv`` and a pixel shuffle (``DepthToSpace``), which int8 quantises;
- :func:`shuffle_after_narrow_conv`: a shuffle followed by a Conv that
  narrows runs after it instead, on a quarter of the values;
- :func:`uint8_shuffles`: after int8 quantisation, each shuffle moves uint8
  values instead of a float round trip.

Each rewrite's docstring derives its equivalence; ``tests/export/test_to_onnx.py``
checks each on random weights, and every export checks the whole graph
against the fitted model (:mod:`export.parity`).

    >>> proto = shuffle_after_narrow_conv(subpixel_conv_transpose(proto))
"""

from __future__ import annotations

import numpy as np


class GraphIndex:
    """Which node produces and which nodes read each tensor of a list of nodes.

    Built once per rewrite pass; a rewrite that changes a node's inputs or
    outputs, or removes or adds nodes, tells the index (:meth:`remove` before,
    :meth:`add` after), so later lookups in the same pass see the graph as it is.
    """

    def __init__(self, nodes):
        self.producer: dict[str, object] = {}
        self.consumers: dict[str, list] = {}
        for node in nodes:
            self.add(node)

    def add(self, node) -> None:
        for name in node.output:
            self.producer[name] = node
        for name in node.input:
            self.consumers.setdefault(name, []).append(node)

    def remove(self, node) -> None:
        for name in node.output:
            if self.producer.get(name) is node:
                del self.producer[name]
        for name in set(node.input):
            self.consumers[name] = [n for n in self.consumers.get(name, []) if n is not node]

    def readers(self, name: str) -> list:
        """The nodes that read tensor ``name`` (empty for a graph output nobody reads)."""
        return self.consumers.get(name, [])


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
    shuffles uint8 values (:func:`uint8_shuffles`). The output keeps the input's
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
    index = GraphIndex(nodes)
    for conv in [n for n in nodes if n.op_type == "Conv"]:
        shuffle = index.producer.get(conv.input[0])
        if shuffle is None or shuffle.op_type != "DepthToSpace" or len(index.readers(shuffle.output[0])) != 1:
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
        chain, last, gone = [new_conv], conv.output[0], [conv, shuffle]
        after = index.readers(last)
        if len(after) == 1 and after[0].op_type in ("Sigmoid", "Relu") and last not in {o.name for o in graph.output}:
            act = after[0]
            last = act.output[0]
            chain.append(helper.make_node(act.op_type, [phases], [f"{phases}/{act.op_type.lower()}"], name=act.name))
            nodes.remove(act)
            gone.append(act)
        moved = helper.make_node("DepthToSpace", [chain[-1].output[0]], [last], name=shuffle.name,
                                 blocksize=block, mode="CRD")
        at = nodes.index(conv)
        nodes[at:at + 1] = [*chain, moved]
        nodes.remove(shuffle)
        for node in gone:
            index.remove(node)
        for node in (*chain, moved):
            index.add(node)
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


def _relu_before_shuffle(nodes: list) -> None:
    """Swap ``DepthToSpace -> Relu`` into ``Relu -> DepthToSpace``, in place.

    A pixel shuffle only moves values, so it commutes with an element-wise
    Relu. With the Relu next to the Conv, the quantiser folds it into the
    QLinearConv's output range, and the shuffle sees the same values as the
    Relu's output: the same quantisation parameters on both sides, which is
    what lets :func:`uint8_shuffles` run it on uint8.
    """
    index = GraphIndex(nodes)
    for shuffle in [n for n in nodes if n.op_type == "DepthToSpace"]:
        after = index.readers(shuffle.output[0])
        if len(after) != 1 or after[0].op_type != "Relu":
            continue
        relu = after[0]
        index.remove(relu)
        index.remove(shuffle)
        phases, shuffled, activated = shuffle.input[0], shuffle.output[0], relu.output[0]
        relu.input[0], relu.output[0] = phases, shuffled
        shuffle.input[0], shuffle.output[0] = shuffled, activated
        index.add(relu)
        index.add(shuffle)
        nodes.remove(relu)
        nodes.insert(nodes.index(shuffle), relu)


def uint8_shuffles(proto) -> int:
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
    index = GraphIndex(graph.node)
    drop, count = [], 0
    for shuffle in [n for n in graph.node if n.op_type == "DepthToSpace"]:
        dq = index.producer.get(shuffle.input[0])
        after = index.readers(shuffle.output[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q = after[0]
        params = [(inits.get(a), inits.get(b)) for a, b in ((dq.input[1], q.input[1]), (dq.input[2], q.input[2]))]
        if any(x is None or y is None or x.shape != () or not np.array_equal(x, y) or x.dtype != y.dtype
               for x, y in params):
            continue
        dq_alone = len(index.readers(dq.output[0])) == 1  # the shuffle alone reads it: it goes too
        for node in (shuffle, q, *([dq] if dq_alone else [])):
            index.remove(node)
        shuffle.input[0], shuffle.output[0] = dq.input[0], q.output[0]
        index.add(shuffle)
        drop += [q, dq] if dq_alone else [q]
        count += 1
    for node in drop:
        graph.node.remove(node)
    return count


def _set_nodes(graph, nodes: list) -> None:
    """Make ``nodes`` the graph's nodes and drop the initializers no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
