"""The evaluation's HTML report: one self-contained file to open in a browser.

``report.html`` holds everything a quality engineer looks at after
``evaluate``, with every picture embedded as a ``data:`` URI (no other file,
no network): the metrics of each criterion with the default marked, the
verdicts of the default criterion at its threshold, ROC and PR curves in the
colours of the table, score histograms with the thresholds, the loss curve
of the training, and every missed defect and every false alarm by file,
each with its anomaly-map overlay. A very large set keeps the file bounded:
the first :data:`OVERLAY_LIMIT` of each kind (the most confidently wrong
first) have an overlay, the others are listed by file and score.

    >>> cases = misjudged(run, paths, labels, scores["range"], threshold)
    >>> write_report(evaluation, Path("runs/conv-ae/eval"))
    PosixPath('runs/conv-ae/eval/report.html')
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_inspect import numbers
from export.run_folder import RunFolder

#: Overlays shown per kind (missed defects, false alarms); the rest are listed without one.
OVERLAY_LIMIT = 200
#: Width of an overlay thumbnail in pixels.
THUMBNAIL = 160


@dataclass
class Case:
    """One misjudged image of an evaluation.

    Attributes:
        path: the image file.
        kind: ``"missed"`` (a defect scored at or under the threshold) or
            ``"false alarm"`` (a normal part over it).
        score: its oriented score under the default criterion.
        overlay: a JPEG thumbnail of its anomaly map over the image, or
            None beyond :data:`OVERLAY_LIMIT`.
    """

    path: Path
    kind: str
    score: float
    overlay: bytes | None = None


def misjudged(run, paths, labels: np.ndarray, scores: np.ndarray, threshold: float, *,
              limit: int = OVERLAY_LIMIT, sigma: float = 1.0) -> list[Case]:
    """Every missed defect and false alarm at ``threshold``, the most confidently wrong first.

    Args:
        run: the loaded run (:func:`export.scoring.load_run`), to make the
            anomaly maps of the overlays.
        paths, labels: the evaluated images; 1 marks a defect.
        scores: their oriented scores (higher = more anomalous).
        threshold: the default criterion's threshold.
        limit: overlays per kind; the others get ``overlay=None``.
        sigma: Gaussian smoothing of the maps, in pixels.

    Returns:
        The missed defects (lowest score first), then the false alarms
        (highest score first).
    """
    import cv2

    from edge_inspect.inspector import heatmap_overlay
    from edge_inspect.kernels import criteria
    from export.data import load_batch
    from export.scoring import reconstruct

    predicted = scores > threshold
    missed = np.flatnonzero((labels == 1) & ~predicted)
    alarms = np.flatnonzero((labels == 0) & predicted)
    order = [*missed[np.argsort(scores[missed], kind="stable")], *alarms[np.argsort(-scores[alarms], kind="stable")]]
    cases = [Case(Path(paths[i]), "missed" if labels[i] == 1 else "false alarm", float(scores[i])) for i in order]
    shown = [c for kind in ("missed", "false alarm") for c in [c for c in cases if c.kind == kind][:limit]]
    for start in range(0, len(shown), 32):
        chunk = shown[start:start + 32]
        images = load_batch([c.path for c in chunk], run.size)[..., 0]
        _, maps = criteria(images, reconstruct(run.model, images), return_map=True, sigma=sigma)
        for case, image, amap in zip(chunk, images, maps):
            overlay = heatmap_overlay(image, amap, banner=False)
            height = max(1, round(overlay.shape[0] * THUMBNAIL / overlay.shape[1]))
            small = cv2.resize(overlay, (THUMBNAIL, height),
                               interpolation=cv2.INTER_NEAREST if overlay.shape[1] < THUMBNAIL else cv2.INTER_AREA)
            ok, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
            case.overlay = encoded.tobytes() if ok else None
    return cases


def write_report(result, out_dir: str | Path) -> Path:
    """Write ``report.html`` for an evaluation; returns its path.

    Args:
        result: the :class:`export.evaluate.Evaluation` that ``evaluate``
            returned (its labels, scores, thresholds and misjudged cases).
        out_dir: the report folder; its ``roc.png``, ``pr.png`` and
            ``histograms.png`` are drawn there when missing.
    """
    from export import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(result.metrics)
    if not (out / "roc.png").is_file() or not (out / "pr.png").is_file():
        plots.curves(result.labels, result.scores, result.default_criterion, out)
    if not (out / "histograms.png").is_file():
        plots.histograms(result.labels, result.scores, result.thresholds, out / "histograms.png")
    colours = plots.criterion_colours(names)
    default = result.default_criterion
    parts = [
        _HEAD.format(title=html.escape(f"Evaluation of {result.run_dir}")),
        f"<h1>Evaluation of <code>{html.escape(str(result.run_dir))}</code></h1>",
        f"<p>{result.n_normal} normal and {result.n_anomalous} defective images (defective is positive); "
        f"a chance classifier's AUC-PR is {numbers.metric(result.prevalence)}. Thresholds: "
        f"{html.escape(result.calibration_mode)} calibration; default criterion <b>{html.escape(default)}</b>.</p>",
    ]
    warning = getattr(result, "warning", None)
    if warning:
        parts.append(f'<p class="warning">{html.escape(warning)}</p>')
    parts += _verdicts(result)
    parts += _metrics_table(result, colours)
    parts += [
        "<h2>ROC and precision-recall curves</h2>",
        f'<p>One colour per criterion, as in the table; the default, {html.escape(default)}, in a thicker line. '
        "The legends give the table's AUC-ROC and AUC-PR.</p>",
        '<div class="row">', _img(out / "roc.png", "ROC curves"), _img(out / "pr.png", "Precision-recall curves"),
        "</div>",
        "<h2>Score histograms</h2>",
        "<p>Normal (green) and defective (red) scores of each criterion, higher = more anomalous; the dashed line "
        "is the threshold.</p>",
        _img(out / "histograms.png", "Score histograms", wide=True),
    ]
    parts += _training(result.run_dir)
    cases = getattr(result, "cases", [])
    threshold = result.thresholds[default]
    parts.append(_scale())
    for kind, title, order in (("missed", "Missed defects", "lowest score first"),
                               ("false alarm", "False alarms", "highest score first")):
        parts += _cases([c for c in cases if c.kind == kind], title, order, threshold)
    if result.skipped:
        parts.append(f"<h2>Skipped files ({len(result.skipped)})</h2><ul>")
        parts += [f"<li><code>{html.escape(str(p))}</code>: {html.escape(r)}</li>" for p, r in result.skipped]
        parts.append("</ul>")
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(path: Path, alt: str, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="{_data_uri(path.read_bytes(), "image/png")}">'


def _verdicts(result) -> list[str]:
    """The confusion counts of the default criterion at its threshold."""
    name = result.default_criterion
    threshold = result.thresholds[name]
    predicted = result.scores[name] > threshold
    labels = result.labels
    caught, missed = int((predicted & (labels == 1)).sum()), int((~predicted & (labels == 1)).sum())
    alarms, passed = int((predicted & (labels == 0)).sum()), int((~predicted & (labels == 0)).sum())
    return [
        "<h2>Verdicts at the threshold</h2>",
        f"<p>Criterion <b>{html.escape(name)}</b>, NG when the score is over {numbers.score(threshold)}.</p>",
        '<table class="confusion"><tr><th></th><th>judged NG</th><th>judged OK</th></tr>',
        f'<tr><th>defective ({result.n_anomalous})</th><td class="good">{caught} caught</td>'
        f'<td class="bad">{missed} missed</td></tr>',
        f'<tr><th>normal ({result.n_normal})</th><td class="bad">{alarms} false alarms</td>'
        f'<td class="good">{passed} passed</td></tr></table>',
    ]


_COLUMNS = (("auc_roc", "AUC-ROC"), ("auc_pr", "AUC-PR"), ("recall", "recall"), ("false_alarm_rate", "false alarms"),
            ("f1", "F1"), ("accuracy", "accuracy"), ("f1_oracle", "F1 (oracle)"),
            ("accuracy_oracle", "accuracy (oracle)"))


def _metrics_table(result, colours: dict[str, str]) -> list[str]:
    rows = ["<h2>Criteria</h2>",
            "<p>Recall, false alarms, F1 and accuracy at each criterion's calibrated threshold; the <i>oracle</i> "
            "columns use the best threshold on this very set, chosen with its labels. The colour is the criterion's "
            "curve below.</p>",
            '<table class="metrics"><tr><th>criterion</th>' + "".join(f"<th>{h}</th>" for _, h in _COLUMNS) + "</tr>"]
    for name, m in result.metrics.items():
        mark = name == result.default_criterion
        swatch = f'<span class="swatch" style="background:{colours[name]}"></span>'
        label = f"{swatch}{html.escape(name)}" + (' <span class="default">default</span>' if mark else "")
        cells = "".join(f"<td>{numbers.metric(m[key])}</td>" for key, _ in _COLUMNS)
        row_class = ' class="default-row"' if mark else ""
        rows.append(f"<tr{row_class}><td>{label}</td>{cells}</tr>")
    rows.append("</table>")
    return rows


def _training(run_dir: Path) -> list[str]:
    """The loss curve of the run, or why it has none."""
    rows = ["<h2>Training</h2>"]
    run = RunFolder(run_dir)
    loss = run.loss_plot_path
    try:
        kind = run.config()["train"]["model"]
    except (OSError, ValueError, KeyError):
        kind = None
    if loss.is_file():
        rows.append(_img(loss, "Loss per epoch"))
    elif kind == "linear-ae":
        rows.append("<p>No loss curve: the linear model is fitted in closed form, in one step, so it has no "
                    "epochs.</p>")
    else:
        rows.append("<p>No loss curve: the run folder holds no <code>loss.png</code>.</p>")
    return rows


def _cases(cases: list[Case], title: str, order: str, threshold: float) -> list[str]:
    rows = [f"<h2>{title} ({len(cases)})</h2>"]
    if not cases:
        return rows + ["<p>None.</p>"]
    shown = [c for c in cases if c.overlay is not None]
    rest = [c for c in cases if c.overlay is None]
    note = f"All {len(cases)}" if not rest else f"The first {len(shown)} of {len(cases)}"
    rows.append(f"<p>{note}, {order}, with the anomaly map over the image as the model saw it; "
                f"threshold {numbers.score(threshold)}.</p>")
    rows.append('<div class="cases">')
    for case in shown:
        rows.append(f'<figure><img alt="{html.escape(case.path.name)}" src="{_data_uri(case.overlay, "image/jpeg")}">'
                    f'<figcaption title="{html.escape(str(case.path))}">{html.escape(case.path.name)}<br>'
                    f"score {numbers.score(case.score)}</figcaption></figure>")
    rows.append("</div>")
    if rest:
        rows.append(f"<p>The other {len(rest)}, without an overlay to keep this file small:</p>")
        rows.append('<table class="rest"><tr><th>file</th><th>score</th></tr>')
        rows += [f"<tr><td><code>{html.escape(str(c.path))}</code></td><td>{numbers.score(c.score)}</td></tr>"
                 for c in rest]
        rows.append("</table>")
    return rows


def _jet_gradient() -> str:
    """The overlays' colour map as a CSS gradient, from OpenCV's own JET table."""
    import cv2

    ramp = cv2.applyColorMap(np.linspace(0, 255, 11).astype(np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0]
    return ", ".join(f"rgb({r},{g},{b})" for b, g, r in ramp)


def _scale() -> str:
    from edge_inspect.inspector import HEATMAP_FULL_SCALE

    return (f'<p class="scale">Overlays: |residual| 0 <span class="bar" style="background: linear-gradient(to right, '
            f'{_jet_gradient()})"></span> {HEATMAP_FULL_SCALE:g} and over. Where the residual is zero the image keeps '
            "its own grey.</p>")


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
tr.default-row {{ font-weight: bold; background: #f3f6ff; }}
.default {{ font-size: 0.8em; background: #334; color: #fff; border-radius: 3px; padding: 0 0.3em; }}
.swatch {{ display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: middle; }}
.confusion td {{ text-align: center; min-width: 9em; }}
.good {{ background: #e8f5e9; }} .bad {{ background: #ffebee; }}
.warning {{ background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; }}
.row {{ display: flex; flex-wrap: wrap; gap: 1em; }}
img {{ max-width: 100%; }} img.wide {{ width: 100%; }} .row img {{ max-width: calc(50% - 0.5em); }}
.cases {{ display: flex; flex-wrap: wrap; gap: 0.6em; }}
figure {{ margin: 0; width: {thumb}px; font-size: 0.75em; overflow-wrap: anywhere; }}
figure img {{ width: {thumb}px; image-rendering: pixelated; }}
.bar {{ display: inline-block; width: 12em; height: 0.9em; vertical-align: middle; }}
</style></head><body>""".replace("{thumb}", str(THUMBNAIL))
