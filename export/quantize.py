"""Reduced-precision copies of the fp32 graph: fp16 weights, or static int8 quantisation.

This module owns how an ``fp16`` and an ``int8`` graph are derived from the
fp32 one, and which images set the int8 activation ranges. Whether either is
good enough to ship is :mod:`export.parity`'s question.

    >>> fp16 = to_fp16(proto)
    >>> int8 = quantize_int8(proto, int8_calibration_images(run), workdir=Path("/tmp"))
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge_inspect.card import INPUT_NAME
from edge_inspect.errors import MissingExtraError
from export.graph_rewrites import uint8_shuffles

log = logging.getLogger(__name__)

#: Training normals the int8 quantiser sees to set activation ranges.
QUANT_CALIBRATION_IMAGES = 128


def int8_calibration_images(run) -> np.ndarray:
    """Up to :data:`QUANT_CALIBRATION_IMAGES` training normals of a loaded run, evenly spaced through the split.

    ``(N, H, W)`` float32. When the training images are gone, the held-out
    normals stand in.
    """
    from export.data import load_batch

    paths = [p for p in run.folder.training_images() if p.is_file()] or run.held_out_normals()
    step = max(1, len(paths) // QUANT_CALIBRATION_IMAGES)
    return load_batch(paths[::step][:QUANT_CALIBRATION_IMAGES], run.size)[..., 0]


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
    :func:`export.graph_rewrites.subpixel_conv_transpose`).

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
        log.info("Pixel shuffles moved to uint8: %d", uint8_shuffles(quantised))
        return quantised
    finally:
        for path in (src, pre, dst):
            path.unlink(missing_ok=True)
