"""Evaluation: every criterion on labelled normal and defective images.

Defective is the positive class. For each criterion the report gives AUC-ROC
and AUC-PR (scikit-learn), F1, accuracy and false-alarm rate at the threshold
that calibration chose from normal images alone, and F1 and accuracy at the
best threshold on the evaluated set itself, marked *oracle*: those peek at
the labels and are there only because the paper's tables read that way.

    >>> report = evaluate("runs/conv-ae", "data/ok", "data/def", out_dir="runs/conv-ae/eval")
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edge_inspect.calibrate import oriented, weak_auc_warning
from edge_inspect.errors import InputError
from edge_inspect.kernels import CRITERIA
from edge_inspect.numbers import metric

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("auc_roc", "auc_pr", "f1", "accuracy", "false_alarm_rate", "recall", "f1_oracle", "accuracy_oracle")


@dataclass
class Evaluation:
    """Per-criterion metrics and what they were measured on."""

    run_dir: Path
    n_normal: int
    n_anomalous: int
    default_criterion: str
    calibration_mode: str
    metrics: dict[str, dict[str, float]]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    #: The evaluated images, their labels (1: defective) and each criterion's oriented scores and threshold.
    paths: list[Path] = field(default_factory=list, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    thresholds: dict[str, float] = field(default_factory=dict)
    #: Every missed defect and false alarm of the default criterion (:func:`export.report.misjudged`).
    cases: list = field(default_factory=list, repr=False)
    #: The HTML report, once written.
    report: Path | None = None

    @property
    def prevalence(self) -> float:
        """AUC-PR of a chance classifier."""
        return self.n_anomalous / (self.n_normal + self.n_anomalous)

    @property
    def warning(self) -> str | None:
        """What a default criterion near or below chance means and what to try; None when it separates."""
        measured = self.metrics.get(self.default_criterion, {}).get("auc_roc")
        return weak_auc_warning(measured, self.default_criterion,
                                f"{self.n_normal} normal, {self.n_anomalous} defective images")


def criterion_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Metrics of one oriented score (higher = more anomalous), positives = 1."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_recall_curve, roc_auc_score, roc_curve

    predicted = scores > threshold
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1s = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    fpr, tpr, _ = roc_curve(labels, scores)
    positives, negatives = labels.sum(), (1 - labels).sum()
    accuracies = (tpr * positives + (1 - fpr) * negatives) / labels.size
    return {
        "auc_roc": float(roc_auc_score(labels, scores)),
        "auc_pr": float(average_precision_score(labels, scores)),
        "f1": float(f1_score(labels, predicted, zero_division=0.0)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "false_alarm_rate": float(predicted[labels == 0].mean()),
        "recall": float(predicted[labels == 1].mean()),
        "f1_oracle": float(f1s.max()),
        "accuracy_oracle": float(accuracies.max()),
    }


def evaluate(
    run_dir: str | Path,
    normal_dir: str | Path,
    anomalous_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    gallery: int = 6,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """Score both folders with every criterion and write the report.

    Args:
        run_dir: a trained and calibrated run folder.
        normal_dir, anomalous_dir: labelled images, read recursively.
        out_dir: where the report goes (default ``RUN_DIR/eval``).
        gallery: how many worst false positives and negatives to show.
        on_start: called with the number of images about to be scored.
        on_batch: called with the number of images just scored.

    Raises:
        ModelCardError: not a run folder, or no ``calibration.json``.
        InputError: a folder with no readable image.
    """
    from export.data import scan_folder
    from export.run_folder import RunFolder
    from export.scoring import load_run, score_paths

    run_folder = RunFolder(run_dir)
    run_dir, cal_path = run_folder.path, run_folder.calibration_path
    if run_folder.model_file is not None:  # else load_run says what is missing
        run_folder.require_calibration("evaluate")
    run = load_run(run_dir)
    calibration = run_folder.calibration()
    folders = {}
    for label, folder in (("normal", normal_dir), ("anomalous", anomalous_dir)):
        try:
            folders[label] = scan_folder(folder, run.size)
        except InputError as exc:
            raise InputError(f"No {label} images to evaluate: {exc}") from exc
    paths = folders["normal"].paths + folders["anomalous"].paths
    labels = np.r_[np.zeros(len(folders["normal"].paths), int), np.ones(len(folders["anomalous"].paths), int)]
    if on_start:
        on_start(len(paths))
    raw = score_paths(run, paths, batch_size=batch_size, on_batch=on_batch)

    metrics, oriented_scores = {}, {}
    names = [name for name in CRITERIA if name in calibration["criteria"]]
    if len(names) < len(CRITERIA):
        log.warning("%s has no calibration for %s (calibrated before they existed); recalibrate with: "
                    "edge-inspect calibrate %s", cal_path, ", ".join(sorted(set(CRITERIA) - set(names))), run_dir)
    for name in names:
        j = CRITERIA.index(name)
        entry = calibration["criteria"][name]
        oriented_scores[name] = oriented(raw[:, j], entry)
        metrics[name] = criterion_metrics(labels, oriented_scores[name], entry["threshold"])

    result = Evaluation(
        run_dir=run_dir,
        n_normal=int((labels == 0).sum()),
        n_anomalous=int(labels.sum()),
        default_criterion=calibration["default_criterion"],
        calibration_mode=calibration["mode"],
        metrics=metrics,
        skipped=folders["normal"].skipped + folders["anomalous"].skipped,
        paths=paths,
        labels=labels,
        scores=oriented_scores,
        thresholds={name: calibration["criteria"][name]["threshold"] for name in names},
    )
    out = Path(out_dir) if out_dir else run_folder.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    write_tables(result, out)
    from export import plots

    thresholds = {name: calibration["criteria"][name]["threshold"] for name in names}
    plots.curves(labels, oriented_scores, result.default_criterion, out)
    plots.histograms(labels, oriented_scores, thresholds, out / "histograms.png")
    name = result.default_criterion
    plots.gallery(run, paths, labels, oriented_scores[name], thresholds[name], name, out / "gallery.png", count=gallery)
    from export.report import misjudged, write_report

    result.cases = misjudged(run, paths, labels, oriented_scores[name], thresholds[name])
    result.report = write_report(result, out)
    return result


def write_tables(result: Evaluation, out: Path) -> None:
    """``metrics.json``, ``metrics.csv`` and ``report.md``."""
    summary = {
        "run_dir": str(result.run_dir),
        "n_normal": result.n_normal,
        "n_anomalous": result.n_anomalous,
        "prevalence": result.prevalence,
        "default_criterion": result.default_criterion,
        "calibration_mode": result.calibration_mode,
        "oracle_note": "f1_oracle and accuracy_oracle use the best threshold on this set, chosen with its labels",
        "criteria": result.metrics,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["criterion", *METRIC_COLUMNS])
        for name, row in result.metrics.items():
            writer.writerow([name, *(f"{row[c]:.6f}" for c in METRIC_COLUMNS)])
    lines = [
        f"# Evaluation of `{result.run_dir}`",
        "",
        f"- {result.n_normal} normal and {result.n_anomalous} defective images (defective is positive); "
        f"a chance classifier's AUC-PR is {metric(result.prevalence)}.",
        f"- Thresholds: {result.calibration_mode} calibration; default criterion **{result.default_criterion}**.",
        "- *Oracle* columns use the best threshold on this very set, chosen with its labels.",
        "",
        "| criterion | AUC-ROC | AUC-PR | F1 | accuracy | false alarms | recall | F1 (oracle) | accuracy (oracle) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result.metrics.items():
        mark = " (default)" if name == result.default_criterion else ""
        lines.append(
            f"| {name}{mark} | " + " | ".join(metric(m[c]) for c in ("auc_roc", "auc_pr", "f1", "accuracy",
                                                                   "false_alarm_rate", "recall", "f1_oracle",
                                                                   "accuracy_oracle")) + " |"
        )
    lines += ["", "![ROC](roc.png) ![PR](pr.png)", "", "![Score histograms](histograms.png)", "", "![Worst misses](gallery.png)", ""]
    if result.skipped:
        lines += [f"Skipped {len(result.skipped)} unreadable files:", ""] + [f"- `{p}`: {r}" for p, r in result.skipped]
    (out / "report.md").write_text("\n".join(lines) + "\n")

