"""Parity checks of an exported graph: against the fitted model, and reduced precisions against fp32.

This module owns the agreement gate of the export:

- fp32 against the fitted model (Keras, or the linear-ae's NumPy
  reconstruction): reconstructions within :data:`FP32_TOLERANCE` and
  identical verdicts on the run's held-out normals, scores sitting on a
  threshold counted as ties (:func:`fp32_parity`);
- fp16 and int8 against fp32: score change, verdict agreement per
  criterion, and with defective images the AUC change; refused under
  :data:`MIN_AGREEMENT` unless forced (:func:`reduced_parity`).

Each returns the ``parity`` entry the model card records for its file.

    >>> parity, fp32_scores = fp32_parity(run, fp32_bytes, images, calibration)
    >>> reduced_parity("int8", int8_bytes, images, None, fp32_scores, None, calibration, force=False)["verdict_agreement"]
    0.998
"""

from __future__ import annotations

import logging

import numpy as np

from edge_inspect.calibrate import auc, is_anomalous, oriented
from edge_inspect.card import INPUT_NAME, OUTPUT_NAME
from edge_inspect.errors import ConfigError, ModelCardError
from edge_inspect.kernels import CRITERIA, criteria
from export.pca import LinearPCA

log = logging.getLogger(__name__)

#: fp32 graph against Keras, on [0, 1] reconstructions.
FP32_TOLERANCE = 1e-4
#: A score this close to its threshold (relative to the threshold or the
#: criterion's standard deviation) is a tie in the fp32 verdict check.
TIE_RTOL = 1e-5
#: Least share of images on which a reduced-precision graph's verdicts must
#: agree with fp32's, unless forced.
MIN_AGREEMENT = 0.995


def _session(data: bytes):
    from edge_inspect.session import create_session

    return create_session(data, "cpu", name="the exported graph")[0]


def _run(session, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + batch_size]})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.empty_like(images)


def graph_scores(data: bytes, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the serialised graph ``data`` on ``(N, H, W)`` images on the CPU: ``(reconstructions, criteria)``."""
    recons = _run(_session(data), images)
    return recons, criteria(images, recons)


def _verdicts(scores: np.ndarray, calibration: dict) -> dict[str, np.ndarray]:
    return {name: np.asarray(is_anomalous(scores[:, j], calibration["criteria"][name]))
            for j, name in enumerate(CRITERIA) if name in calibration["criteria"]}


def fp32_parity(run, data: bytes, images: np.ndarray, calibration: dict):
    """ONNX Runtime against Keras: reconstructions within tolerance, verdicts identical.

    An image whose Keras score sits on a threshold (within :data:`TIE_RTOL`
    of it, relative to the threshold or the criterion's spread) is a tie,
    not a disagreement: a quantile threshold is often one of the
    calibration images' own scores, which float rounding then puts on
    either side. Ties are counted in the report.

    Returns:
        ``(parity, (reconstructions, scores))``: the card's parity entry,
        and the fp32 graph's outputs, the reference of :func:`reduced_parity`.

    Raises:
        ModelCardError: a difference over the tolerance, or a verdict that differs (ties aside).
    """
    from export.scoring import reconstruct

    keras_recons = reconstruct(run.model, images)
    recons, scores = graph_scores(data, images)
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
        "reference": "fit" if isinstance(run.model, LinearPCA) else "keras",  # the NumPy fit, or Keras
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


def fp32_auc(normal_scores: np.ndarray, anomalous_scores: np.ndarray, calibration: dict) -> dict:
    """AUC-ROC of the fp32 graph's default criterion: held-out normals against the defective images."""
    name = calibration["default_criterion"]
    entry, column = calibration["criteria"][name], CRITERIA.index(name)
    return {"criterion": name,
            "fp32": auc(oriented(normal_scores[:, column], entry), oriented(anomalous_scores[:, column], entry)),
            "normal": int(len(normal_scores)), "anomalous": int(len(anomalous_scores))}


def reduced_parity(precision, data, images, anomalous, fp32_scores, fp32_anomalous, calibration, force) -> dict:
    """A reduced-precision graph against fp32: score change, verdict agreement and, with defective images, AUC.

    Args:
        precision: ``fp16`` or ``int8``; ``data`` its serialised graph.
        images: the held-out normals; ``anomalous`` defective images, or None.
        fp32_scores, fp32_anomalous: :func:`graph_scores` of the fp32 graph
            on each (``fp32_anomalous`` None without defective images).
        calibration: the run's calibration.
        force: keep a graph whose verdicts agree on fewer than :data:`MIN_AGREEMENT`
            (recorded as ``forced``).

    Returns:
        The card's parity entry for the file.

    Raises:
        ConfigError: agreement under :data:`MIN_AGREEMENT`, without ``force``.
    """
    recons, scores = graph_scores(data, images)
    ref_recons, ref_scores = fp32_scores
    name = calibration["default_criterion"]
    entry, column = calibration["criteria"][name], CRITERIA.index(name)
    ref_o, o = oriented(ref_scores[:, column], entry), oriented(scores[:, column], entry)
    all_scores, all_ref = scores, ref_scores
    auc_report = None
    if anomalous is not None:
        anomalous_recons, anomalous_scores = graph_scores(data, anomalous)
        all_scores = np.concatenate([scores, anomalous_scores])
        all_ref = np.concatenate([ref_scores, fp32_anomalous[1]])
        auc_fp32 = auc(ref_o, oriented(fp32_anomalous[1][:, column], entry))
        auc_here = auc(o, oriented(anomalous_scores[:, column], entry))
        auc_report = {"fp32": auc_fp32, precision: auc_here, "change": auc_here - auc_fp32,
                      "normal": int(len(images)), "anomalous": int(len(anomalous))}
    ref_verdicts, verdicts = _verdicts(all_ref, calibration), _verdicts(all_scores, calibration)
    agreement, ties = {}, {}
    for k in verdicts:  # a part whose fp32 score is the threshold itself flips on any change: a tie, as in fp32's check
        e = calibration["criteria"][k]
        tie = np.abs(oriented(all_ref[:, CRITERIA.index(k)], e) - e["threshold"]) <= \
            TIE_RTOL * max(abs(e["threshold"]), e["std"], 1e-12)
        differ = ref_verdicts[k] != verdicts[k]
        agreement[k], ties[k] = float(1.0 - np.mean(differ & ~tie)), int((differ & tie).sum())
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
        "ties_at_threshold": ties,
        "min_agreement": MIN_AGREEMENT,
        "auc": auc_report if auc_report is not None else
        "not measured: the calibration data holds normal images only; pass --anomalous DIR",
        "forced": False,
    }
    if agreement[name] < MIN_AGREEMENT:
        if not force:
            raise ConfigError(
                f"The {precision} graph's verdicts ({name}) agree with fp32 on {agreement[name]:.1%} of "
                f"{len(all_scores)} images, under the required {MIN_AGREEMENT:.1%} (scores moved by up to "
                f"{change.max():.3g}, threshold {entry['threshold']:.3g}). Nothing was written. Export fp32 only, "
                "or pass --force to write it anyway."
            )
        parity["forced"] = True
        log.warning("Writing %s although its verdicts agree with fp32 on only %.1f%% (--force)", precision,
                    100 * agreement[name])
    return parity
