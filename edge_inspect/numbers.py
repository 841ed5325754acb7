"""How numbers and times are shown to a person: one format for every view.

This module owns the text form of scores, thresholds, metrics and
timestamps in tables, logs and reports (``predict``, ``watch``, ``results``,
``calibrate``, ``evaluate``, ``export``, ``benchmark``), and the sentence
that says what a criterion's decision score means. JSON keeps full
precision; only what a person reads goes through here. Standard library
only: the lean runtime and the training side both use it.

    >>> score(0.000123456), score(12.5), score(-0.41271)
    ('0.0001235', '12.50', '-0.4127')
    >>> metric(0.98765)
    '0.988'
    >>> meaning("min", "low")
    'score = -min: a low min is abnormal'

Scores and thresholds: :data:`SIGNIFICANT` significant digits in fixed
notation, trailing zeros kept, so that figures of one column read alike
whatever their size; scientific notation only outside 1e-4 to 1e6, where
fixed notation would need a row of zeros. Metrics (AUC, F1, rates read as
fractions): :data:`METRIC_DECIMALS` decimals. Timestamps: ISO 8601 in the
PC's local time with its UTC offset, to the millisecond
(``2026-11-29T15:25:01.123+01:00``): what the line's clock said, and
unambiguous.
"""

from __future__ import annotations

import datetime as _dt
import math

#: Significant digits of scores and thresholds.
SIGNIFICANT = 4
#: Decimals of metrics in [0, 1] (AUC-ROC, AUC-PR, F1, accuracy, rates).
METRIC_DECIMALS = 3
#: Shown for a missing or non-finite value.
MISSING = "-"


def score(value: float | None, digits: int = SIGNIFICANT) -> str:
    """A score or threshold: ``digits`` significant digits, fixed notation from 1e-4 to 1e6.

    ``None``, NaN and infinities read :data:`MISSING`.
    """
    if value is None or not math.isfinite(value):
        return MISSING
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if not -4 <= magnitude < 6:
        return f"{value:.{digits - 1}e}"
    text = f"{value:.{max(0, digits - 1 - magnitude)}f}"
    # rounding may carry into a new digit (9.9996 -> "10.000"): one decimal too many then
    if magnitude < digits - 1 and len(text.lstrip("-").replace(".", "").lstrip("0")) > digits:
        text = f"{value:.{max(0, digits - 2 - magnitude)}f}"
    return text


def score_pair(value: float | None, threshold: float | None) -> tuple[str, str]:
    """A score and its threshold, with enough digits that different numbers never read the same.

    At :data:`SIGNIFICANT` digits a score just over its threshold can show
    the threshold's own figures; then both get more digits (up to 9), so the
    verdict beside them never contradicts what is printed.
    """
    for digits in range(SIGNIFICANT, 10):
        a, b = score(value, digits), score(threshold, digits)
        if a != b or value == threshold:
            return a, b
    return a, b


def metric(value: float | None) -> str:
    """A metric in [0, 1] (AUC, F1, accuracy, a rate): :data:`METRIC_DECIMALS` decimals."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:.{METRIC_DECIMALS}f}"


def metric_change(value: float | None) -> str:
    """A change of a metric, signed, at the metric's decimals: ``+0.002``."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:+.{METRIC_DECIMALS}f}"


def timestamp(unix: float | None) -> str | None:
    """A Unix time as ISO 8601 in local time with the UTC offset, to the millisecond; None stays None."""
    if unix is None:
        return None
    return _dt.datetime.fromtimestamp(unix).astimezone().isoformat(timespec="milliseconds")


def meaning(criterion: str | None, polarity: str | None, center: float | None = None) -> str:
    """What a criterion's decision score is, in words: the number compared with the threshold.

    ``ng`` when the score is over the threshold, whatever the polarity:
    ``high`` scores the value itself, ``low`` its negative, ``two-sided``
    its distance from the normal median ``center``.
    """
    name = criterion or "the criterion"
    if polarity == "high":
        return f"score = {name}: a high {name} is abnormal"
    if polarity == "low":
        return f"score = -{name}: a low {name} is abnormal"
    if polarity == "two-sided":
        where = f"the normal median {score(center)}" if center is not None else "the normal median"
        return f"score = |{name} - median|: {name} far from {where} is abnormal"
    return f"score of {name} (polarity not recorded)"
