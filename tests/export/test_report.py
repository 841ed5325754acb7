"""The evaluation's HTML report: its content, its bounds, and the page as Chromium shows it.

The browser check runs Debian's Chromium headless on a copy of the real
report: a small script injected into the copy records, once the page has
loaded, whether every image decoded (``complete`` and a natural width) and
every error event; ``--dump-dom`` hands that back, and Chromium's own log
(``--enable-logging=stderr``) carries any console message. A screenshot of
the page must exist and show something.
"""

import base64
import dataclasses
import html
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edge_inspect.cli import app
from export.evaluate import evaluate
from export.report import misjudged, write_report
from tests.support.browser import assert_page_loads

runner = CliRunner()



@pytest.fixture(scope="module")
def evaluated(trained_run, big_defects, tmp_path_factory):
    """An evaluation of the tiny run, and the same with its weakest criterion as the default, at the median score.

    The tiny run separates the big blots perfectly by its default criterion; the weakest criterion at its median
    misjudges both ways, as a poor model on real parts does.
    """
    from export.scoring import load_run

    result = evaluate(trained_run, big_defects / "ok", big_defects / "def", out_dir=tmp_path_factory.mktemp("eval"))
    name = min(result.metrics, key=lambda n: abs(result.metrics[n]["auc_roc"] - 0.5))
    threshold = float(np.median(result.scores[name]))
    moved = dataclasses.replace(result, default_criterion=name, thresholds={**result.thresholds, name: threshold})
    moved.cases = misjudged(load_run(trained_run), moved.paths, moved.labels, moved.scores[name], threshold)
    out = tmp_path_factory.mktemp("moved")
    return result, moved, write_report(moved, out)


def _figures(page: str) -> list[str]:
    return re.findall(r"<figure>.*?</figure>", page, flags=re.S)


def test_evaluate_writes_a_self_contained_report(evaluated):
    result, _, _ = evaluated
    assert result.report == result.report.parent / "report.html" and result.report.is_file()
    page = result.report.read_text(encoding="utf-8")
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources), [s[:40] for s in sources]
    assert "<link" not in page and "<script" not in page and "url(" not in page
    # The metrics table: every criterion, a recall column, the default marked.
    assert "<th>recall</th>" in page and "<th>AUC-PR</th>" in page
    default_row = re.search(r'<tr class="default-row"><td>(.*?)</td>', page).group(1)
    assert result.default_criterion in default_row and "default" in default_row
    for name, m in result.metrics.items():
        assert f"{m['recall']:.3f}" in page and html.escape(name) in page


def test_confusion_counts_and_every_misjudged_part_with_its_overlay(evaluated):
    _, moved, path = evaluated
    page = path.read_text(encoding="utf-8")
    name = moved.default_criterion
    judged = moved.scores[name] > moved.thresholds[name]
    missed = int((~judged & (moved.labels == 1)).sum())
    alarms = int((judged & (moved.labels == 0)).sum())
    assert missed > 0 and alarms > 0, "the median threshold misjudges both ways"
    assert f"{int((judged & (moved.labels == 1)).sum())} caught" in page and f"{missed} missed" in page
    assert f"{alarms} false alarms" in page and f"{int((~judged & (moved.labels == 0)).sum())} passed" in page
    assert f"Missed defects ({missed})" in page and f"False alarms ({alarms})" in page
    figures = _figures(page)
    assert len(figures) == missed + alarms
    wrong = {Path(moved.paths[i]).name for i in np.flatnonzero(judged != (moved.labels == 1))}
    assert {re.search(r'<img alt="([^"]+)"', f).group(1) for f in figures} == wrong
    for figure in figures:
        data = re.search(r'src="data:image/jpeg;base64,([^"]+)"', figure).group(1)
        image = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert image.shape[1] == 160 and image.std() > 5


def test_a_large_set_is_bounded_and_says_how_many(evaluated, trained_run, tmp_path):
    from export.scoring import load_run

    _, moved, _ = evaluated
    name = moved.default_criterion
    bounded = dataclasses.replace(moved, cases=misjudged(load_run(trained_run), moved.paths, moved.labels,
                                                         moved.scores[name], moved.thresholds[name], limit=2))
    page = write_report(bounded, tmp_path).read_text(encoding="utf-8")
    total = sum(c.kind == "missed" for c in bounded.cases)
    assert f"The first 2 of {total}" in page and f"The other {total - 2}, without an overlay" in page
    assert len(_figures(page)) == 4
    for case in bounded.cases:
        assert html.escape(case.path.name) in page


def test_curves_and_histograms_are_embedded_and_coloured_like_the_table(evaluated):
    from export.plots import criterion_colours

    result, _, _ = evaluated
    page = result.report.read_text(encoding="utf-8")
    colours = criterion_colours(result.metrics)
    assert len(set(colours.values())) == len(colours), "one colour per criterion"
    for name, colour in colours.items():
        assert f'background:{colour}"></span>{html.escape(name)}' in page
    for alt in ("ROC curves", "Precision-recall curves", "Score histograms", "Loss per epoch"):
        assert f'alt="{alt}"' in page
    roc = cv2.imread(str(result.report.parent / "roc.png"))
    # The default criterion's colour is drawn (matplotlib draws it exactly, BGR in OpenCV).
    rgb = colours[result.default_criterion]
    bgr = np.array([int(rgb[5:7], 16), int(rgb[3:5], 16), int(rgb[1:3], 16)])
    assert (np.abs(roc.astype(int) - bgr).sum(axis=2) < 10).sum() > 50


def test_the_cli_prints_the_reports_path(trained_run, big_defects, tmp_path):
    result = runner.invoke(app, ["evaluate", str(trained_run), "--normal", str(big_defects / "ok"),
                                 "--anomalous", str(big_defects / "def"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output + result.stderr
    assert str((tmp_path / "r" / "report.html").resolve()) in result.stdout.replace("\n", "")


# ---------------------------------------------------------------- the browser check


@pytest.mark.parametrize("which", ["evaluate", "moved"])
def test_the_report_in_chromium_loads_every_image_without_console_errors(evaluated, tmp_path, which):
    result, _, moved_path = evaluated
    report = result.report if which == "evaluate" else moved_path
    assert_page_loads(report, tmp_path)
