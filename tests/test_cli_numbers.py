"""Numbers a person can read: one format, what a score means, ISO times, whole paths, tables within 80 columns.

Real commands on the tiny synthetic model: ``predict`` and ``results`` run
in a subprocess with ``COLUMNS=80``, as in a terminal of that width; the
training-side commands run in-process with the console pinned to 80
columns (TensorFlow loads once).
"""

import csv
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_inspect import numbers
from edge_inspect.card import load_card
from edge_inspect.cli import app
from tests.runtime.conftest import conv_ae_run, model_dir, tiny_base  # noqa: F401  (shared fixtures)
from tests.runtime.test_mqtt import SCHEMA, schema_errors
from tests.support import write_parts

runner = CliRunner()
WIDTH = 80
BOX = set("┃│┏┓┗┛┡┩└┘┌┐━─╇┼┳┻╋")


# ---------------------------------------------------------------- the format itself


@pytest.mark.parametrize("value, text", [
    (0.000123456, "0.0001235"), (12.5, "12.50"), (-0.41271, "-0.4127"), (0.31, "0.3100"), (1234.5, "1234"),
    (9.99996, "10.00"), (0.0, "0"), (123456.0, "123456"), (2.5e-7, "2.500e-07"), (3.1e9, "3.100e+09"),
    (None, "-"), (float("nan"), "-"),
])
def test_scores_keep_four_significant_digits_in_fixed_notation(value, text):
    assert numbers.score(value) == text


def test_a_score_just_over_its_threshold_never_reads_the_same():
    assert numbers.score(0.310004) == numbers.score(0.310001) == "0.3100"
    score, threshold = numbers.score_pair(0.310004, 0.310001)
    assert score != threshold and float(score) > float(threshold)
    assert numbers.score_pair(0.31, 0.31) == ("0.3100", "0.3100")


def test_metrics_and_times():
    assert numbers.metric(0.98765) == "0.988" and numbers.metric(None) == "-"
    assert numbers.metric_change(-0.0012) == "-0.001"
    text = numbers.timestamp(1764418218.4129)
    parsed = dt.datetime.fromisoformat(text)
    assert parsed.tzinfo is not None and abs(parsed.timestamp() - 1764418218.4129) < 1e-3
    assert text.count(":") >= 3 and "." in text  # hh:mm:ss.mmm and a +hh:mm offset
    assert numbers.timestamp(None) is None


def test_meaning_of_each_polarity():
    assert numbers.meaning("range", "high") == "score = range: a high range is abnormal"
    assert numbers.meaning("min", "low") == "score = -min: a low min is abnormal"
    assert "|mean - median|" in numbers.meaning("mean", "two-sided", 0.012) and "0.01200" in numbers.meaning(
        "mean", "two-sided", 0.012)


# ---------------------------------------------------------------- helpers


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, in a terminal 80 columns wide."""
    env = {**os.environ, "COLUMNS": str(WIDTH), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("LINES", None)
    return subprocess.run([sys.executable, "-m", "edge_inspect", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _check_tables(text: str) -> None:
    """Every table line within 80 columns, and no figure or name cut with an ellipsis."""
    assert "…" not in text, text
    for line in text.splitlines():
        if BOX & set(line):
            assert len(line) <= WIDTH, f"{len(line)} columns: {line}"


@pytest.fixture(scope="module")
def deep_parts(tmp_path_factory):
    """Parts under a folder whose path alone is longer than 80 characters, one name longer than the table's room."""
    root = tmp_path_factory.mktemp("parts")
    deep = root / ("line-1-station-4-camera-top-" * 3) / "2026-11-29"
    write_parts(deep / "ok", 3, size=32, seed=40)
    write_parts(deep / "ng", 3, size=32, seed=41, defective=True)
    long = deep / "ok" / ("C7-20261129-0412-carrier-0097-shift-B-" * 2 + ".png")
    (deep / "ok" / "part_00000.png").rename(long)
    return deep


# ---------------------------------------------------------------- predict


def test_predict_json_names_the_decision_score_and_the_raw_value(model_dir, deep_parts, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    card = load_card(model_dir)
    monkeypatch.chdir(tmp_path)  # paths given relative come back absolute
    relative = os.path.relpath(deep_parts, tmp_path)
    for criterion in ("min", "mean", "smooth_range"):
        result = runner.invoke(app, ["predict", "--model", str(model_dir), relative, "--json", "--criterion", criterion])
        assert result.exit_code == 0, result.output + result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        entry = card.calibration["criteria"][criterion]
        assert len(lines) == 6
        for line in lines:
            assert os.path.isabs(line["source"]) and Path(line["source"]).is_file()
            assert line["model"] == str(model_dir.absolute())
            assert line["model_sha256"] == card.data["files"]["fp32"]["sha256"] and line["precision"] == "fp32"
            stamp = dt.datetime.fromisoformat(line["inspected_at"])
            assert stamp.tzinfo is not None and abs(stamp.timestamp() - dt.datetime.now().timestamp()) < 120
            assert line["polarity"] == entry["polarity"] and line["raw_score"] == line["criteria"][criterion]
            raw = line["raw_score"]
            decision = {"high": raw, "low": -raw, "two-sided": abs(raw - entry["center"])}[entry["polarity"]]
            assert line["score"] == pytest.approx(decision, abs=1e-12)
            assert line["verdict"] == ("ng" if line["score"] > line["threshold"] else "ok")
    assert card.calibration["criteria"]["min"]["polarity"] == "low"
    assert card.calibration["criteria"]["mean"]["polarity"] == "two-sided"


def test_predict_table_fits_80_columns_with_whole_paths_and_says_what_the_score_is(model_dir, deep_parts):  # noqa: F811
    result = _cli("predict", "--model", model_dir, deep_parts, "--criterion", "min")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    _check_tables(out)
    assert "criterion min: score = -min: a low min is abnormal; ng when score > threshold" in out
    assert f"Images in {deep_parts}:" in out  # the folder whole, on one (soft-wrapped) line
    names = sorted(str(p.relative_to(deep_parts)) for p in deep_parts.rglob("*.png"))
    # one name does not fit the table's room: rows are numbered, each name listed whole after the table
    for name in names:
        assert any(line.startswith("#") and line.endswith(" " + name) for line in out.splitlines()), name
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 6
    for row in rows:
        cells = [c.strip() for c in row.strip("│").split("│")]
        key, verdict, score, raw, threshold = cells[:5]
        assert float(score) == pytest.approx(-float(raw), rel=1e-3)  # the score is -min, and both are shown
        assert "e" not in score.lower() and len(score.lstrip("-").replace(".", "").lstrip("0")) >= 4


def test_predict_short_names_sit_in_the_table(model_dir, deep_parts):  # noqa: F811
    gone = deep_parts / "ng" / "gone.png"
    result = _cli("predict", "--model", model_dir, deep_parts / "ng", gone)
    assert result.returncode == 1, result.stderr  # an error verdict
    _check_tables(result.stdout)
    reason = next(line for line in result.stdout.splitlines() if line.startswith("error "))
    assert reason.startswith(f"error {gone}: ") and reason.count(str(gone)) == 1  # whole, once, after the table
    assert "score = smooth_range: a high smooth_range is abnormal" in result.stdout
    for path in (deep_parts / "ng").glob("*.png"):
        assert any(line.startswith("│ " + path.name + " ") for line in result.stdout.splitlines()), path.name


# ---------------------------------------------------------------- watch, results, JSONL and CSV


@pytest.fixture(scope="module")
def watched_min(model_dir, deep_parts, tmp_path_factory):  # noqa: F811
    """The deep parts watched with criterion min (polarity low) through the library's watcher, with a JSONL sink."""
    from edge_inspect.inspector import Inspector
    from edge_inspect.ledger import Ledger
    from edge_inspect.sinks.jsonl import JsonlSink
    from edge_inspect.sources import FileItem
    from edge_inspect.watch import Watcher

    root = tmp_path_factory.mktemp("watched")
    ledger, results = root / "ledger.sqlite", root / "verdicts.jsonl"
    files = sorted(deep_parts.rglob("*.png"))
    (root / "bad.png").write_bytes(b"not an image")
    items = [FileItem(p, p.stat().st_size, p.stat().st_mtime_ns) for p in [*files, root / "bad.png"]]
    with Ledger.open(ledger) as book:
        Watcher(items, Inspector.load(model_dir, criterion="min"), book, sinks=[JsonlSink(results)]).run()
    return ledger, results, len(items)


def test_watch_logs_each_verdict_in_the_one_format(model_dir, tmp_path, caplog):  # noqa: F811
    from edge_inspect.inspector import Inspector
    from edge_inspect.ledger import Ledger
    from edge_inspect.sources import FileItem
    from edge_inspect.watch import Watcher

    write_parts(tmp_path / "in", 2, size=32, seed=5)
    items = [FileItem(p, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted((tmp_path / "in").iterdir())]
    caplog.set_level("INFO", logger="edge_inspect.watch")
    with Ledger.open(tmp_path / "ledger.sqlite") as book:
        Watcher(items, Inspector.load(model_dir, criterion="min"), book).run()
        rows = book.last(2)
    lines = [r.getMessage() for r in caplog.records if "(#" in r.getMessage()]
    assert len(lines) == 2
    for row, line in zip(rows, lines):
        score, threshold = numbers.score_pair(row.score, row.threshold)
        raw = json.loads(row.criteria)["min"]
        assert f"score {score} (min {numbers.score(raw)}), threshold {threshold}," in line, line
        assert row.polarity == "low" and row.score == pytest.approx(-raw)


def test_results_table_fits_80_columns_and_says_what_the_score_is(watched_min):
    ledger, _, total = watched_min
    result = _cli("results", "--ledger", ledger, "--last", total)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    _check_tables(out)
    assert "score = -min: a low min is abnormal; ng when score > threshold." in out
    assert "not a readable image" in out  # the error's reason, after the table, whole
    header = next(line for line in out.splitlines() if line.startswith("┃") and "verdict" in line)
    assert "min" in [cell.strip() for cell in header.split("┃")]  # the raw value has its own column


def test_jsonl_lines_have_iso_times_and_the_raw_value_beside_the_score(watched_min):
    _, results, total = watched_min
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == total
    for line in lines:
        for key in ("arrived_at", "committed_at"):
            assert dt.datetime.fromisoformat(line[key]).tzinfo is not None, line[key]
        assert os.path.isabs(line["source"])
        if line["verdict"] == "error":
            assert line["score"] is None and line["raw_score"] is None
            continue
        assert line["polarity"] == "low" and line["raw_score"] == line["criteria"]["min"]
        assert line["score"] == pytest.approx(-line["raw_score"])
        assert dt.datetime.fromisoformat(line["inspected_at"]) <= dt.datetime.fromisoformat(line["committed_at"])


def test_results_csv_has_one_column_per_criterion_iso_times_and_absolute_paths(watched_min, tmp_path):
    ledger, _, total = watched_min
    out = tmp_path / "verdicts.csv"
    result = _cli("results", "--ledger", ledger, "--csv", out, "--last", "0")
    assert result.returncode == 0, result.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == total
    assert "criteria" not in rows[0]
    columns = [c for c in rows[0] if c.startswith("criteria.")]
    assert "criteria.min" in columns and "criteria.smooth_range" in columns and len(columns) >= 14
    for row in rows:
        assert os.path.isabs(row["source"])
        assert dt.datetime.fromisoformat(row["committed_at"]).tzinfo is not None
        if row["verdict"] == "error":
            assert row["score"] == row["raw_score"] == row["criteria.min"] == ""
            continue
        assert row["polarity"] == "low" and float(row["raw_score"]) == float(row["criteria.min"])
        assert float(row["score"]) == pytest.approx(-float(row["criteria.min"]))
        assert float(row["criteria.range"]) >= 0  # a real value in its own cell, not JSON text


def test_the_plant_payload_names_raw_value_score_and_polarity(watched_min):
    from edge_inspect.ledger import Ledger
    from edge_inspect.outbox import payload

    ledger, _, _ = watched_min
    with Ledger.open(ledger, readonly=True) as book:
        records = book.last(50)
    for record in records:
        data = payload(record, source="line1", installation="pc", ledger_id="0123456789ab")
        assert schema_errors(data, SCHEMA) == [], data
        if record.verdict != "error":
            assert data["polarity"] == "low" and data["score"] == pytest.approx(-data["raw_score"])
            assert data["raw_score"] == json.loads(record.criteria)["min"]


# ---------------------------------------------------------------- the training side at 80 columns


@pytest.fixture
def narrow(monkeypatch):
    """The CLI's consoles pinned to 80 columns."""
    from edge_inspect import cli

    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "width", WIDTH)


def test_calibrate_evaluate_export_benchmark_fit_80_columns(conv_ae_run, deep_parts, tmp_path, narrow):  # noqa: F811
    import shutil

    run = shutil.copytree(conv_ae_run, tmp_path / "run-with-a-long-name-" / ("x" * 60))
    result = runner.invoke(app, ["calibrate", str(run), "--anomalous", str(deep_parts / "ng")])
    assert result.exit_code == 0, result.output + result.stderr
    _check_tables(result.stdout)
    assert "threshold: on the decision score" in result.stdout

    result = runner.invoke(app, ["evaluate", str(run), "--normal", str(deep_parts / "ok"), "--anomalous",
                                 str(deep_parts / "ng"), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output + result.stderr
    _check_tables(result.stdout)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["criteria"]
    assert f"{metrics['smooth_range']['auc_roc']:.3f}" in result.stdout
    assert f"| {metrics['smooth_range']['auc_roc']:.3f} |" in (tmp_path / "eval" / "report.md").read_text()
    assert any(str(tmp_path / "eval" / "report.") in line for line in result.stdout.splitlines())  # whole

    model = tmp_path / "models" / ("a-model-folder-with-a-long-name-" * 2)
    result = runner.invoke(app, ["export", str(run), "--out", str(model), "--precision", "int8", "--force"])
    assert result.exit_code == 0, result.output + result.stderr
    _check_tables(result.stdout)
    assert f"Exported conv-ae to {model} in" in result.stdout  # whole, on its own line
    assert "model.int8.onnx" in result.stdout

    result = runner.invoke(app, ["benchmark", "--model", str(model), "--data", str(deep_parts), "--limit", "3",
                                 "--batch-size", "2"])
    assert result.exit_code == 0, result.output + result.stderr
    _check_tables(result.stdout)
    assert str(model) in result.stdout


def test_train_summary_fits_80_columns_with_the_run_folder_whole(normal_dir, tmp_path, narrow):
    run = tmp_path / ("a-run-folder-with-a-long-name-" * 3) / "linear-ae"
    result = runner.invoke(app, ["train", "--normal", str(normal_dir), "--out", str(run), "--size", "32",
                                 "--components", "16"])
    assert result.exit_code == 0, result.output + result.stderr
    _check_tables(result.stdout)
    lines = result.stdout.splitlines()
    assert f"Run folder: {run}" in lines and f"Recalibrate with: edge-inspect calibrate {run}" in lines
    cal = json.loads((run / "calibration.json").read_text())
    threshold = cal["criteria"]["smooth_range"]["threshold"]
    text = " ".join(result.stdout.split())
    assert f"threshold │ {numbers.score(threshold)} (label-free" in text
    assert "score = smooth_range: a high smooth_range is abnormal" in text.replace("│ │", "").replace(" │ ", " ")
