"""Label-free threshold calibration, pure NumPy.

This module owns the step from criteria scores of held-out *normal* images
to one decision rule per criterion: a polarity (which direction is
abnormal), a centre, and a threshold, with the normal distribution recorded
beside them. It needs no labels, no TensorFlow and no scikit-learn, so a line
PC can recalibrate on new good parts by itself. Given a few labelled
anomalous images too ("few-shot"), it also learns each polarity from the data
and picks the criterion that separates best.

    >>> from edge_inspect.calibrate import calibrate, is_anomalous
    >>> cal = calibrate(scores, CRITERIA)                   # (N, 14) normal scores
    >>> entry = cal["criteria"][cal["default_criterion"]]
    >>> is_anomalous(new_scores[:, CRITERIA.index("range")], entry)

Polarity and orientation. Each criterion's raw values become one score where
higher is more abnormal (:func:`oriented`): ``x`` for "high", ``-x`` for
"low", ``|x - center|`` for "two-sided", ``center`` being the median of the
normal values. A threshold on that score is the whole rule: abnormal iff
``oriented > threshold``.

Default polarities (label-free). A defect adds a local residual of either
sign: a dark blow hole gives negative r, a bright burr positive r. So
measures of spread or tail weight grow either way ("high": std, variance,
range, max, mse, kurtosis, entropy; max because bright defects dominate it
and dark ones never lower it), the minimum falls ("low": min), the extremes
of the smoothed residual follow the raw ones ("high": smooth_max,
smooth_range; "low": smooth_min), and signed location or asymmetry
measures move in the defect's direction, unknown beforehand ("two-sided":
mean, skewness, cumsum). Criteria added later
without an entry in :data:`DEFAULT_POLARITY` are "two-sided", which assumes
no direction.

Threshold rules, from the oriented normal scores ``o`` of the raw normal
values ``x``:

- ``"quantile"`` (default): the ``1 - false_alarm_rate`` quantile of ``o``
  (``np.quantile``, linear interpolation), so that the given fraction of
  normal parts is flagged. Distribution-free; its realised rate scatters by
  about ``sqrt(f (1 - f) / N)`` for N normal images.
- ``"mad"``: ``k`` robust standard deviations beyond the median in the
  abnormal direction, ``sigma = 1.4826 * MAD(x)``: ``median(o) + k sigma``
  for "high" and "low", ``k sigma`` on ``|x - median(x)|`` for
  "two-sided" (the robust z-score ``|x - median| / sigma > k``). Median and
  MAD ignore a long tail of odd normal parts that would drag a quantile or a
  mean-and-std rule. For normally distributed scores, k = 3 flags 0.135 %
  one-sided and 0.27 % two-sided. When MAD = 0 (over half the normal values
  equal), sigma falls back to 1.2533 times the mean absolute deviation from
  the median, and to the largest normal score if that is 0 too.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_inspect.errors import ConfigError, InputError, ModelCardError
from edge_inspect.numbers import metric

SCHEMA = 1
POLARITIES = ("high", "low", "two-sided")
RULES = ("quantile", "mad")
MODES = ("label-free", "few-shot")
#: Quantiles of the normal distribution recorded for each criterion.
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
#: Fewest normal images calibration accepts; more is much better.
MIN_NORMAL = 10
#: The criterion of the label-free mode (the paper's best), unless configured.
DEFAULT_CRITERION = "smooth_range"
#: Label-free polarity of the criteria of ``edge_inspect.kernels.CRITERIA``.
DEFAULT_POLARITY = {
    "mean": "two-sided",
    "std": "high",
    "variance": "high",
    "kurtosis": "high",
    "skewness": "two-sided",
    "range": "high",
    "min": "low",
    "max": "high",
    "cumsum": "two-sided",
    "mse": "high",
    "entropy": "high",
    "smooth_min": "low",
    "smooth_max": "high",
    "smooth_range": "high",
}
#: Few-shot: share of anomalous scores on one side of the normal median
#: needed to call a criterion one-sided.
ONE_SIDED_SHARE = 0.9
#: Below this AUC-ROC a criterion barely tells defects from good parts (0.5 is chance).
WEAK_AUC = 0.6

_MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD of a normal = 0.6745 sigma
_MEAN_AD_TO_SIGMA = 1.2533  # sqrt(pi / 2): mean |x - mu| of a normal = 0.7979 sigma


def check_settings(
    rule: str,
    false_alarm_rate: float,
    k: float,
    default_criterion: str | None,
    names: Sequence[str],
) -> None:
    """Check a threshold rule, its parameter and a default criterion, before any image is scored.

    :func:`calibrate` calls it; the training commands call it first, so a
    typo fails before TensorFlow loads.

    Args:
        rule, false_alarm_rate, k, default_criterion: as for :func:`calibrate`.
        names: the criterion names ``default_criterion`` must be one of.

    Raises:
        ConfigError: unknown rule or criterion (with the closest name, if
            any); false_alarm_rate outside (0, 0.5); k not > 0.
    """
    if rule not in RULES:
        raise ConfigError(f"Unknown threshold rule {rule!r}. Expected one of: {', '.join(RULES)}.")
    if rule == "quantile" and not 0.0 < false_alarm_rate < 0.5:
        raise ConfigError(
            f"false_alarm_rate must be in (0, 0.5), found {false_alarm_rate!r}; "
            "0.05 flags 5 % of normal parts."
        )
    if rule == "mad" and not (math.isfinite(k) and k > 0):
        raise ConfigError(f"k must be a finite number > 0, found {k!r}; 3 is usual.")
    if default_criterion is not None and default_criterion not in names:
        import difflib

        close = difflib.get_close_matches(default_criterion, names, n=1)
        guess = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"Unknown default criterion {default_criterion!r}.{guess} Expected one of: {', '.join(names)}."
        )


def calibrate(
    normal_scores: np.ndarray,
    names: Sequence[str],
    *,
    rule: str = "quantile",
    false_alarm_rate: float = 0.05,
    k: float = 3.0,
    anomalous_scores: np.ndarray | None = None,
    default_criterion: str | None = None,
    polarities: dict[str, str] | None = None,
) -> dict:
    """Per-criterion polarity, centre and threshold from normal images' scores.

    Args:
        normal_scores: ``(N, K)`` criteria of N held-out normal images,
            N >= :data:`MIN_NORMAL`, all finite.
        names: the K criterion names, in column order (unique).
        rule: ``"quantile"`` or ``"mad"`` (see the module docstring).
        false_alarm_rate: share of normal parts the ``"quantile"`` rule flags,
            in (0, 0.5).
        k: robust standard deviations of the ``"mad"`` rule, > 0.
        anomalous_scores: ``(M, K)`` criteria of a few labelled anomalous
            images (few-shot mode): polarities then come from the data, and
            the default criterion is the best separating one (largest AUC).
            Thresholds still come from the normal images only.
        default_criterion: the criterion to decide with; default
            :data:`DEFAULT_CRITERION` label-free (or the first name when it
            is absent), the largest AUC few-shot.
        polarities: name -> polarity overrides, taking precedence over both
            the defaults and the few-shot choice.

    Returns:
        A JSON-serialisable dict::

            {"schema": 1, "mode": "label-free" | "few-shot", "rule": ...,
             "false_alarm_rate": f or None, "k": k or None,
             "n_normal": N, "n_anomalous": M, "default_criterion": name,
             "criteria": {name: {"polarity", "center", "threshold",
                                 "normal_alarm_rate", "auc", "mean", "std",
                                 "quantiles": {"0.01": ..., "min", "max"}}}}

        ``false_alarm_rate`` is None under ``"mad"``, ``k`` None under
        ``"quantile"``; ``auc`` is None label-free; ``normal_alarm_rate`` is
        the share of the calibration normals above the threshold; ``std`` is
        the sample standard deviation (ddof=1).

    Raises:
        InputError: too few normal rows, non-finite scores, shapes that do
            not match ``names``.
        ConfigError: unknown rule, criterion or polarity; false_alarm_rate
            outside (0, 0.5); k not > 0.
    """
    names = _check_names(names)
    normal = _check_scores(normal_scores, names, "normal_scores")
    if normal.shape[0] < MIN_NORMAL:
        raise InputError(
            f"normal_scores has {normal.shape[0]} rows; calibration needs at least {MIN_NORMAL} "
            "normal images (a few hundred give a stable threshold). Score more good parts."
        )
    anomalous = None if anomalous_scores is None else _check_scores(anomalous_scores, names, "anomalous_scores")
    if anomalous is not None and anomalous.shape[0] == 0:
        raise InputError("anomalous_scores has no rows; pass None for label-free calibration.")
    check_settings(rule, false_alarm_rate, k, default_criterion, names)
    for name, polarity in (polarities or {}).items():
        if name not in names:
            raise ConfigError(f"At 'polarities.{name}': unknown criterion. Expected one of: {', '.join(names)}.")
        if polarity not in POLARITIES:
            raise ConfigError(
                f"At 'polarities.{name}': unknown polarity {polarity!r}. Expected one of: {', '.join(POLARITIES)}."
            )

    entries = {}
    for col, name in enumerate(names):
        x = normal[:, col]
        center = float(np.median(x))
        if anomalous is not None:
            polarity = _polarity_from_data(x, anomalous[:, col], center)
        else:
            polarity = DEFAULT_POLARITY.get(name, "two-sided")
        polarity = (polarities or {}).get(name, polarity)
        entry = {"polarity": polarity, "center": center}
        o = oriented(x, entry)
        threshold = _threshold(x, o, entry, rule, false_alarm_rate, k)
        entry["threshold"] = threshold
        entry["normal_alarm_rate"] = float(np.mean(o > threshold))
        entry["auc"] = None if anomalous is None else auc(o, oriented(anomalous[:, col], entry))
        entry["mean"] = float(np.mean(x))
        entry["std"] = float(np.std(x, ddof=1))
        entry["quantiles"] = {
            **{_qkey(q): float(v) for q, v in zip(QUANTILES, np.quantile(x, QUANTILES))},
            "min": float(np.min(x)),
            "max": float(np.max(x)),
        }
        entries[name] = entry

    if default_criterion is None:
        if anomalous is not None:
            default_criterion = max(names, key=lambda n: entries[n]["auc"])  # ties: first in names
        else:
            default_criterion = DEFAULT_CRITERION if DEFAULT_CRITERION in names else names[0]
    return {
        "schema": SCHEMA,
        "mode": "label-free" if anomalous is None else "few-shot",
        "rule": rule,
        "false_alarm_rate": float(false_alarm_rate) if rule == "quantile" else None,
        "k": float(k) if rule == "mad" else None,
        "n_normal": int(normal.shape[0]),
        "n_anomalous": 0 if anomalous is None else int(anomalous.shape[0]),
        "default_criterion": default_criterion,
        "criteria": entries,
    }


def oriented(values, entry: dict):
    """Raw criterion values as a score where higher is more abnormal.

    Args:
        values: a number or array of one criterion's raw values.
        entry: a calibration entry (``cal["criteria"][name]``) with
            ``polarity`` and ``center``.

    Returns:
        float64 array of the values' shape (a float for a number):
        ``x`` ("high"), ``-x`` ("low") or ``|x - center|`` ("two-sided").
    """
    x = np.asarray(values, dtype=np.float64)
    polarity = entry["polarity"]
    if polarity == "high":
        out = x.copy()
    elif polarity == "low":
        out = -x
    elif polarity == "two-sided":
        out = np.abs(x - entry["center"])
    else:
        raise ConfigError(f"Unknown polarity {polarity!r}. Expected one of: {', '.join(POLARITIES)}.")
    return float(out) if out.ndim == 0 else out


def is_anomalous(values, entry: dict):
    """Verdict per value: ``oriented(values, entry) > entry["threshold"]``.

    Returns a bool array of the values' shape (a bool for a number). NaN
    values compare False; the caller gives such images an error verdict.
    """
    flags = np.asarray(oriented(values, entry)) > entry["threshold"]
    return bool(flags) if flags.ndim == 0 else flags


def auc(normal, anomalous) -> float:
    """Area under the ROC curve of oriented scores, higher = more abnormal.

    The Mann-Whitney statistic: the probability that a random anomalous
    score exceeds a random normal one, ties counting half, from average
    ranks. 1.0 separates perfectly, 0.5 is chance.

    Raises:
        InputError: an empty group.
    """
    normal = np.asarray(normal, dtype=np.float64).ravel()
    anomalous = np.asarray(anomalous, dtype=np.float64).ravel()
    n, m = normal.size, anomalous.size
    if n == 0 or m == 0:
        raise InputError(f"AUC needs both groups; found {n} normal and {m} anomalous scores.")
    ranks = _average_ranks(np.concatenate([normal, anomalous]))
    u = ranks[n:].sum() - m * (m + 1) / 2.0
    return float(u / (n * m))


def weak_auc_warning(auc_roc: float | None, criterion: str, measured_on: str = "") -> str | None:
    """The warning in words for an AUC-ROC below :data:`WEAK_AUC`, else None.

    The one text that ``evaluate``, ``export --anomalous``, ``benchmark`` and
    few-shot ``calibrate`` print, so that they say the same thing.

    Args:
        auc_roc: the default criterion's AUC-ROC (None or NaN: nothing to say).
        criterion: that criterion's name.
        measured_on: what it was measured on, e.g. ``"16 normal, 16 defective images"``.

    Returns:
        What it means and what to try, or None when the AUC-ROC is not low.
    """
    if auc_roc is None or not math.isfinite(auc_roc) or auc_roc >= WEAK_AUC:
        return None
    on = f" on {measured_on}" if measured_on else ""
    if auc_roc < 0.5:
        meaning = ("worse than chance (0.5): the model scores these good parts as more abnormal than these defects; "
                   "it does not tell the defects from good parts")
    else:
        meaning = "near chance (0.5): the model does not tell these defects from good parts"
    return (
        f"AUC-ROC of the default criterion {criterion} is {metric(auc_roc)}{on}, below {WEAK_AUC}: {meaning}. "
        "Do not rely on its verdicts yet. Try: train longer (more --epochs) or the default model "
        "(--model linear-ae); a larger --size, for small defects; another criterion with a higher AUC-ROC in the "
        "table of edge-inspect evaluate (set it with edge-inspect calibrate RUN --criterion NAME); and check that "
        "the normal and defective folders are not swapped."
    )


def default_choice(cal: dict, asked: bool = False) -> str | None:
    """Why a few-shot calibration's default criterion is the default, in words; None label-free.

    Few-shot picks the largest AUC-ROC of the defective images against the
    held-out normals; on a tie, the first criterion in the calibration's
    order wins (the order of the criteria table).

    Args:
        cal: a calibration from :func:`calibrate`.
        asked: the default criterion was given (``default_criterion``), not picked.
    """
    if cal["mode"] != "few-shot":
        return None
    aucs = {name: entry["auc"] for name, entry in cal["criteria"].items()}
    name = cal["default_criterion"]
    ranked = sorted(aucs, key=lambda n: -aucs[n])  # stable: ties keep the calibration's order
    on = f"{cal['n_anomalous']} defective against {cal['n_normal']} held-out normal images"
    if asked:
        return (f"Default criterion {name} (AUC-ROC {metric(aucs[name])}), as asked with --criterion; the highest "
                f"AUC-ROC on {on} is {ranked[0]}'s ({metric(aucs[ranked[0]])}).")
    tied = [n for n in ranked[1:] if aucs[n] == aucs[name]]
    why = (f"tied with {', '.join(tied)}, it comes first in the table" if tied else
           f"next is {ranked[1]} ({metric(aucs[ranked[1]])})" if len(ranked) > 1 else "the only criterion")
    return (f"Default criterion {name}: the highest AUC-ROC ({metric(aucs[name])}) on {on}; {why}. Polarities and "
            "AUC-ROCs come from these same few defects, so they flatter the model: confirm with edge-inspect "
            "evaluate on other defective parts.")


def save_calibration(cal: dict, path: str | os.PathLike) -> None:
    """Write a calibration as JSON, atomically (temporary file, then rename).

    Raises:
        ModelCardError: the calibration is invalid, or the file cannot be
            written (the old file, if any, is then left as it was).
    """
    validate_calibration(cal)
    path = Path(path)
    text = json.dumps(cal, indent=2, allow_nan=False) + "\n"
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as fh:
            tmp = fh.name
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise ModelCardError(f"Cannot write calibration to {path}: {exc.strerror or exc}.") from exc


def load_calibration(path: str | os.PathLike) -> dict:
    """Read and validate a calibration written by :func:`save_calibration`.

    Raises:
        ModelCardError: the file is missing, unreadable, not JSON, or not a
            valid calibration; the message names the offending key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelCardError(
            f"Calibration file {path} not found. Calibrate on normal images first "
            "(edge-inspect calibrate), or point to the model folder that has it."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelCardError(f"Calibration file {path} cannot be read: {exc}.") from exc
    try:
        cal = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelCardError(
            f"Calibration file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "it may have been cut short. Recalibrate to rewrite it."
        ) from None
    validate_calibration(cal, str(path))
    return cal


def _threshold(x, o, entry, rule, false_alarm_rate, k) -> float:
    if rule == "quantile":
        return float(np.quantile(o, 1.0 - false_alarm_rate))
    median = float(np.median(x))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(x - median)))
    if sigma == 0.0:
        sigma = _MEAN_AD_TO_SIGMA * float(np.mean(np.abs(x - median)))
    if sigma == 0.0:
        return float(np.max(o))
    base = 0.0 if entry["polarity"] == "two-sided" else oriented(median, entry)
    return float(base + k * sigma)


def _polarity_from_data(normal, anomalous, center) -> str:
    """Side of the normal median the anomalies fall on; ties count half."""
    above = np.mean(anomalous > center) + 0.5 * np.mean(anomalous == center)
    if above >= ONE_SIDED_SHARE:
        return "high"
    if above <= 1.0 - ONE_SIDED_SHARE:
        return "low"
    return "two-sided"


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks of ``a``, tied values sharing their average rank."""
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # start of each run of equal values, and the average rank of the run
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def _qkey(q: float) -> str:
    return repr(float(q))


def _check_names(names) -> tuple[str, ...]:
    if isinstance(names, str):
        raise InputError(f"names must be a sequence of criterion names, found the string {names!r}.")
    names = tuple(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InputError(f"names must be non-empty criterion names, found {names!r}.")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"names must be unique; repeated: {', '.join(dupes)}.")
    return names


def _check_scores(scores, names, what) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != len(names):
        raise InputError(
            f"{what} must be (rows, {len(names)}), one column per name in names; found shape {a.shape}."
        )
    bad = ~np.isfinite(a)
    if bad.any():
        cols = [names[c] for c in np.flatnonzero(bad.any(axis=0))]
        raise InputError(
            f"{what} has {int(bad.sum())} NaN or infinite value(s) in {', '.join(cols)}. "
            "Expected finite criteria; leave out the images whose scoring failed."
        )
    return a


def validate_calibration(cal, where: str = "calibration") -> None:
    """Check a calibration's schema, keys and types (as saved, or in a card).

    Args:
        cal: the parsed calibration.
        where: how to name it in messages (a path, or "model.json: calibration").

    Raises:
        ModelCardError: naming the first key that is missing or wrong, what
            was expected and what was found.
    """

    def fail(key, expected, found):
        raise ModelCardError(f"{where}: at '{key}': expected {expected}, found {found!r}.")

    def number(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(key, "a finite number", value)

    if not isinstance(cal, dict):
        fail("(top)", "a JSON object", type(cal).__name__)
    if cal.get("schema") != SCHEMA:
        fail("schema", f"{SCHEMA} (this version's calibration format)", cal.get("schema"))
    if cal.get("mode") not in MODES:
        fail("mode", " or ".join(MODES), cal.get("mode"))
    if cal.get("rule") not in RULES:
        fail("rule", " or ".join(RULES), cal.get("rule"))
    for key in ("n_normal", "n_anomalous"):
        if isinstance(cal.get(key), bool) or not isinstance(cal.get(key), int) or cal[key] < 0:
            fail(key, "a count", cal.get(key))
    criteria = cal.get("criteria")
    if not isinstance(criteria, dict) or not criteria:
        fail("criteria", "an object with one entry per criterion", criteria)
    if cal.get("default_criterion") not in criteria:
        fail("default_criterion", f"one of {', '.join(criteria)}", cal.get("default_criterion"))
    for name, entry in criteria.items():
        if not isinstance(entry, dict):
            fail(f"criteria.{name}", "an object", entry)
        if entry.get("polarity") not in POLARITIES:
            fail(f"criteria.{name}.polarity", " or ".join(POLARITIES), entry.get("polarity"))
        for key in ("center", "threshold", "mean", "std"):
            number(f"criteria.{name}.{key}", entry.get(key))
        if not isinstance(entry.get("quantiles"), dict):
            fail(f"criteria.{name}.quantiles", "an object", entry.get("quantiles"))
        for q, v in entry["quantiles"].items():
            number(f"criteria.{name}.quantiles.{q}", v)
