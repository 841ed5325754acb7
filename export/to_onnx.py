"""Export a trained, calibrated run to a model folder: ONNX graphs and the model card.

This module owns the step from a run folder (:class:`export.run_folder.RunFolder`:
the model file, ``config.json``, ``split.json``, ``calibration.json``) to a
model folder that the lean runtime loads (:mod:`edge_inspect.card` describes
it), and the model card it writes there:

1. convert (:func:`convert`): a ``tf.function`` that calls the Keras model
   on ``(batch, H, W)`` images and returns ``(batch, H, W)``
   reconstructions, through tf2onnx, then the exact rewrites of
   :mod:`export.graph_rewrites`; the linear-ae's graphs are written directly
   (:mod:`export.linear_graph`). ``(batch, H, W)`` is the layout the
   runtime's preprocessing writes and the kernels read, so neither side
   copies, and one in which tf2onnx needs no NHWC<->NCHW transposes (one
   channel: the channel axis is a reshape). The VAEs' ``call`` is already
   deterministic, ``decoder(z_mean)``;
2. check fp32 parity on the run's held-out normal images (:mod:`export.parity`);
3. optionally derive ``fp16`` and ``int8`` graphs (:mod:`export.quantize`)
   and check them against fp32, refusing one whose verdicts disagree too
   often, unless forced;
4. write everything to a temporary folder beside the target, then rename;
   an earlier export in the target is kept beside it as a dated backup
   (``models/conv-ae.2026-11-29T142501``), and the run folder records where
   it was exported (``exports.json``), so that ``calibrate`` can name the
   model folders a new threshold does not reach until they are exported
   again (:func:`reexport_hint`).

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
from edge_inspect.calibrate import weak_auc_warning
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
from edge_inspect.errors import ConfigError, ModelCardError
from export.parity import fp32_auc, fp32_parity, graph_scores, reduced_parity
from export.quantize import int8_calibration_images, quantize_int8, to_fp16
from export.run_folder import RunFolder

log = logging.getLogger(__name__)

#: Opsets the export supports: tf2onnx 1.17 writes up to 18; per-channel
#: quantisation needs 13.
SUPPORTED_OPSETS = range(13, 19)
DEFAULT_OPSET = 17


@dataclass
class ExportReport:
    """What :func:`export_run` wrote and measured.

    Attributes:
        out_dir: the model folder.
        card: the card as written.
        files: precision -> ``{"file", "bytes", "sha256", "parity"}`` (the
            card's ``files`` entry).
        seconds: wall time of the export.
        backup: where the folder's earlier export was moved, or None.
        auc: with ``anomalous_dir``, the fp32 graph's AUC-ROC of the default
            criterion: ``{"criterion", "fp32", "normal", "anomalous"}``.
    """

    out_dir: Path
    card: dict
    files: dict = field(default_factory=dict)
    seconds: float = 0.0
    backup: Path | None = None
    auc: dict | None = None

    @property
    def warning(self) -> str | None:
        """What an fp32 AUC-ROC near or below chance means and what to try; None if it separates or was not measured."""
        if self.auc is None:
            return None
        return weak_auc_warning(self.auc["fp32"], self.auc["criterion"],
                                f"{self.auc['normal']} held-out normal, {self.auc['anomalous']} defective images")


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
            or hold an earlier export of the same ``model.keras``, which is
            then replaced as a whole (list every precision wanted) and kept
            beside it as ``NAME.YYYY-mm-ddTHHMMSS`` (:attr:`ExportReport.backup`).
        precisions: any of ``fp32``, ``fp16``, ``int8``; fp32
            (``model.onnx``) is always written, as the reference.
        opset: the ONNX opset, in :data:`SUPPORTED_OPSETS`.
        force: write a reduced-precision graph even when its verdicts agree
            with fp32 on fewer than :data:`export.parity.MIN_AGREEMENT` of the images.
        anomalous_dir: labelled defective images, to report the AUC change
            of reduced precisions (the calibration data of a label-free
            calibration holds normal images only).
        default_precision: the precision the runtime loads when none is
            asked for; one of ``precisions`` (default: fp32).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ModelCardError: not a run folder, no calibration, held-out images
            gone, an output folder holding something else, fp32 parity
            failed.
        ConfigError: unsupported opset or precision; a default precision
            not among those written; a reduced precision refused for
            disagreeing verdicts (without ``force``).
        MissingExtraError: fp16 asked for without onnxconverter-common.
    """
    start = time.monotonic()
    folder, out_dir = RunFolder(run_dir), Path(out_dir)
    precisions = check_options(precisions, opset, default_precision)
    default_precision = default_precision or "fp32"
    if folder.model_file is not None:  # else load_run says what is missing
        folder.require_calibration("put in the model card")
    from export.scoring import load_run

    run = load_run(folder.path)
    calibration = folder.calibration()
    trained_sha = sha256_file(folder.model_file)
    _check_out_dir(out_dir, trained_sha, folder.model_file.name)

    normals = run.held_out_normals("The parity check")
    from export.data import load_batch, scan_folder

    images = load_batch(normals, run.size)[..., 0]
    anomalous = None
    if anomalous_dir is not None:
        anomalous = load_batch(scan_folder(anomalous_dir, run.size).paths, run.size)[..., 0]

    how = "writing its two Gemms directly" if run.kind == "linear-ae" else "with tf2onnx"
    log.info("Converting %s (%s, %dx%d) %s, opset %d", folder.path, run.kind, *run.size, how, opset)
    fp32 = convert(run.model, run.size, opset)
    card = _card(run, calibration, trained_sha, opset, default_precision)

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = {}
        log.info("Checking fp32 parity against Keras on %d held-out normal images", len(images))
        fp32_bytes = _stamp(fp32, card, "fp32")
        parity, fp32_scores = fp32_parity(run, fp32_bytes, images, calibration)
        files["fp32"] = _write(tmp, "fp32", fp32_bytes, parity)
        fp32_anomalous = graph_scores(fp32_bytes, anomalous) if anomalous is not None else None
        auc_report = fp32_auc(fp32_scores[1], fp32_anomalous[1], calibration) if anomalous is not None else None
        for precision in precisions:
            if precision == "fp32":
                continue
            log.info("Deriving the %s graph", precision)
            reduced = to_fp16(fp32) if precision == "fp16" else int8_graph(run, fp32, opset, tmp)
            data = _stamp(reduced, card, precision)
            parity = reduced_parity(precision, data, images, anomalous, fp32_scores, fp32_anomalous, calibration, force)
            files[precision] = _write(tmp, precision, data, parity)
        card["files"] = files
        write_card(card, tmp)
        backup = _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Wrote %s (%s)", out_dir, ", ".join(files))
    folder.record_export(out_dir, card)
    return ExportReport(out_dir, card, files, time.monotonic() - start, backup, auc_report)


# ------------------------------------------------------------------ convert


def int8_graph(run, fp32, opset: int, tmp: Path):
    """The int8 graph: the linear-ae's weights alone (its activations stay float), else static QDQ.

    The linear-ae is two matrix products per block, bound by the bytes of
    its weights: int8 codes with int8 compute (``MatMulNBits``, accuracy
    level 4) read a quarter of them and quantise nothing else. The deep
    models quantise weights and activations (:func:`quantize_int8`).
    """
    from export.pca import LinearPCA

    if isinstance(run.model, LinearPCA):
        from export.linear_graph import pca_graph

        return pca_graph(run.model, opset, weight_bits=8)
    return quantize_int8(fp32, int8_calibration_images(run), tmp)


def convert(model, size: tuple[int, int], opset: int = DEFAULT_OPSET, *, subpixel: bool = True):
    """The ONNX graph of ``model``'s reconstruction, ``(batch, H, W)`` in and out.

    Args:
        model: a Keras model taking ``(n, H, W, 1)`` float32 in [0, 1].
        size: ``(H, W)``.
        opset: the ONNX opset.
        subpixel: replace transposed convolutions with the equivalent
            Conv + DepthToSpace, then move a pixel shuffle past the narrow
            Conv that follows it (:mod:`export.graph_rewrites`).

    Returns:
        An ``onnx.ModelProto`` with input :data:`~edge_inspect.card.INPUT_NAME`
        and output :data:`~edge_inspect.card.OUTPUT_NAME`, float32, the batch
        axis named ``batch``.
    """
    from export.linear_graph import dense_graph, pca_graph
    from export.pca import LinearPCA

    if isinstance(model, LinearPCA):
        return pca_graph(model, opset)
    if getattr(model, "name", None) == "linear_ae":
        return dense_graph(model, size, opset)
    import tensorflow as tf
    import tf2onnx

    from export.graph_rewrites import shuffle_after_narrow_conv, subpixel_conv_transpose

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
    # The onnx package stamps its own newest IR version, which an older ONNX Runtime (onnxruntime-gpu
    # lags the CPU wheel) refuses to load; the opsets the graph imports need far less.
    proto.ir_version = min(proto.ir_version, onnx.helper.find_min_ir_version_for(proto.opset_import, ignore_unknown=True))
    proto.doc_string = (f"edge-inspect {card['model']['kind']} reconstruction, {precision}: "
                        f"{INPUT_NAME} (batch, {card['preprocessing']['height']}, {card['preprocessing']['width']}) "
                        f"float32 in [0, 1] -> {OUTPUT_NAME}, same shape. See {CARD_FILE}.")
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


# -------------------------------------------------------------------- files


def _write(folder: Path, precision: str, data: bytes, parity: dict) -> dict:
    (folder / MODEL_FILES[precision]).write_bytes(data)
    return {"file": MODEL_FILES[precision], "bytes": len(data), "sha256": sha256_bytes(data), "parity": parity}


def check_options(precisions: Sequence[str], opset: int, default_precision: str | None = None) -> list[str]:
    """Check the options of :func:`export_run`; needs no TensorFlow, so the command line checks them first.

    Returns:
        The precisions to write, fp32 first.

    Raises:
        ConfigError: unknown precision, unsupported opset, a default
            precision not among those written.
    """
    precisions = _check_precisions(precisions)
    if opset not in SUPPORTED_OPSETS:
        raise ConfigError(
            f"Unsupported opset {opset}. Expected {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1} "
            f"(tf2onnx writes up to {SUPPORTED_OPSETS.stop - 1}; int8 needs 13 or later); default {DEFAULT_OPSET}."
        )
    default_precision = default_precision or "fp32"
    if default_precision not in precisions:
        raise ConfigError(
            f"Default precision {default_precision!r} is not among the precisions written ({', '.join(precisions)}). "
            f"Write it too (--precision {default_precision}), or choose one of: {', '.join(precisions)}."
        )
    return precisions


def _check_precisions(precisions) -> list[str]:
    wanted = list(dict.fromkeys(["fp32", *precisions]))
    unknown = [p for p in wanted if p not in PRECISIONS]
    if unknown:
        raise ConfigError(f"Unknown precision {unknown[0]!r}. Expected one of: {', '.join(PRECISIONS)}.")
    return wanted


def trained_sha256(card: dict) -> str:
    """The sha256 of the trained model a card was exported from (``keras_sha256`` in older cards, which held model.npz's for a linear-ae too)."""
    model = card["model"]
    return model["trained_sha256"] if "trained_sha256" in model else model["keras_sha256"]


def _check_out_dir(out_dir: Path, trained_sha: str, trained_file: str) -> None:
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
        existing_sha = trained_sha256(existing)
        existing_run = existing["model"].get("run", "?")
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelCardError(
            f"Output folder '{out_dir}' holds a {CARD_FILE} that cannot be read as a model card. "
            "Choose another --out, or remove the folder."
        ) from None
    if existing_sha != trained_sha:
        raise ModelCardError(
            f"Output folder '{out_dir}' already holds a different model (exported from {existing_run}, "
            f"trained model sha256 {existing_sha[:12]}..., this run's {trained_file} is {trained_sha[:12]}...). "
            "Choose another --out, or remove that folder first."
        )


def _replace(tmp: Path, out_dir: Path) -> Path | None:
    """Put the finished ``tmp`` folder at ``out_dir``; a reader sees the old folder or the new, whole.

    An earlier model in ``out_dir`` is not deleted: it is renamed to a dated
    backup beside it (:func:`backup_path`) before ``tmp`` takes its name, and
    renamed back if that fails. Both are renames within one folder, so no
    step leaves the user without a model folder.

    Returns:
        The backup folder, or None when ``out_dir`` did not exist or was empty.
    """
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out_dir)
        return None
    backup = backup_path(out_dir)
    os.rename(out_dir, backup)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    return backup


def backup_path(out_dir: Path, now: dt.datetime | None = None) -> Path:
    """A free name beside ``out_dir`` for its earlier export: ``NAME.2026-11-29T142501`` (``-2``, ... if taken).

    Local time, to the second, so that backups sort by name in the order they were made.
    """
    stamp = f"{out_dir.name}.{(now or dt.datetime.now()):%Y-%m-%dT%H%M%S}"
    candidate, k = out_dir.parent / stamp, 2
    while candidate.exists():
        candidate, k = out_dir.parent / f"{stamp}-{k}", k + 1
    return candidate


# ---------------------------------------------------------- exports of a run


def export_command(run_dir: str | os.PathLike, out_dir: str | os.PathLike, precisions: Sequence[str] = ("fp32",),
                   default_precision: str = "fp32", opset: int = DEFAULT_OPSET, force: bool = False) -> str:
    """The ``edge-inspect export`` command line that writes this model folder again, with the same options."""
    import shlex

    words = ["edge-inspect", "export", shlex.quote(str(run_dir)), "--out", shlex.quote(str(out_dir))]
    for precision in precisions:
        if precision != "fp32":
            words += ["--precision", precision]
    if default_precision != "fp32":
        words += ["--default-precision", default_precision]
    if opset != DEFAULT_OPSET:
        words += ["--opset", str(opset)]
    if force:
        words.append("--force")
    return " ".join(words)


def reexport_hint(run_dir: str | os.PathLike) -> str:
    """What ``calibrate`` says after writing ``calibration.json``: which model folders lack it, and the command.

    Reads the run's ``exports.json`` (:meth:`RunFolder.exports`); a recorded
    folder counts if it still holds an export of the run's current model
    file. The command repeats that export's precisions, default precision,
    opset and ``--force``.
    """
    run = RunFolder(run_dir)
    run_dir, cal_path = run.path, run.calibration_path
    calibration = run.calibration()
    trained_sha = sha256_file(run.model_file)
    stale, current = [], []
    for entry in run.exports():
        try:
            folder = Path(entry["folder"])
            card = json.loads((folder / CARD_FILE).read_text())
            if trained_sha256(card) != trained_sha:
                continue
            exported = (folder, [p for p in PRECISIONS if p in card["files"]], card["default_precision"],
                        card["opset"], any(f["parity"].get("forced") for f in card["files"].values()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        (current if card.get("calibration") == calibration else stale).append(exported)
    if stale:
        lines = [f"The new thresholds are in {cal_path} only. "
                 + ("These model folders exported from this run still decide" if len(stale) > 1 else
                    "The model folder exported from this run still decides")
                 + " with the old ones until exported again:"]
        lines += [f"  {export_command(run_dir, *exported)}" for exported in stale]
        return "\n".join(lines)
    if current:
        verb = "carry" if len(current) > 1 else "carries"
        return f"{', '.join(str(e[0]) for e in current)} already {verb} this calibration."
    return (f"The new thresholds are in {cal_path} only: a model folder exported from this run before keeps its "
            f"old thresholds until exported again: {export_command(run_dir, 'MODEL_DIR')}")


# --------------------------------------------------------------------- card


def _internal_padding(run) -> tuple[tuple[int, int], ...]:
    """Zero padding inside the graph; none for the linear-ae (whose export needs no Keras)."""
    if run.kind == "linear-ae":
        return ((0, 0), (0, 0))
    from export.models import stride_of
    from export.models.conv_ae import padding_for

    return padding_for(run.size, stride_of(run.kind))


def _card(run, calibration: dict, trained_sha: str, opset: int, default_precision: str) -> dict:
    """The model card of a loaded run (:func:`export.scoring.load_run`), all but its ``files``."""
    config = run.config
    height, width = run.size
    state = run.folder.state()
    return {
        "schema": SCHEMA,
        "kind": KIND,
        "model": {
            "kind": run.kind,
            "latent_dim": config["train"].get("latent_dim") if run.kind != "conv-ae" else None,
            "graph": "decoder(z_mean), no sampling" if run.kind != "conv-ae" else "decoder(encoder(x))",
            "internal_padding": [list(p) for p in _internal_padding(run)],
            "run": str(run.path.resolve()),
            "trained_file": run.folder.model_file.name,
            "trained_sha256": trained_sha,
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
    from export.train import versions

    found = versions("tf2onnx", "onnx")
    import onnxruntime  # onnxruntime-gpu provides the same module under another package name

    return {**found, "onnxruntime": onnxruntime.__version__}
