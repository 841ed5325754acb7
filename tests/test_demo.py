"""``edge-inspect demo`` and its line (edge_inspect.demo): a real watcher process fed the test parts like a camera."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_inspect import numbers
from edge_inspect.cli import app
from edge_inspect.demo import plan
from edge_inspect.ledger import Ledger
from tests.support import write_parts
from tests.support.browser import assert_page_loads

runner = CliRunner()


def test_plan_interleaves_the_labels_under_new_names(tmp_path):
    write_parts(tmp_path / "ok", 6, size=16, seed=1)
    write_parts(tmp_path / "ng", 4, size=16, seed=2, defective=True)
    drops = plan({"ok": tmp_path / "ok", "ng": tmp_path / "ng"}, seed=0)
    assert [d.name for d in drops] == [f"part-{i:04d}.png" for i in range(1, 11)]
    assert sorted(d.image.name for d in drops if d.label == "ok") == sorted(p.name for p in (tmp_path / "ok").iterdir())
    assert sum(d.label == "ng" for d in drops) == 4
    labels = [d.label for d in drops]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)  # interleaved, not one label then the other
    assert plan({"ok": tmp_path / "ok", "ng": tmp_path / "ng"}, seed=0) == drops  # seeded


def test_plan_without_parts_is_a_clear_error(tmp_path):
    (tmp_path / "ng").mkdir()
    write_parts(tmp_path / "ok", 2, size=16, seed=1)
    with pytest.raises(Exception, match="no ng parts to drop"):
        plan({"ok": tmp_path / "ok", "ng": tmp_path / "ng"})


def test_demo_line_inspects_every_dropped_part_once_and_ends_with_the_report(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--count", "80", "--size", "32", "--components", "32",
                                 "--rate", "40"])
    assert result.exit_code == 0, result.output + result.stderr
    tests = {"ok": out / "parts" / "test" / "ok", "ng": out / "parts" / "test" / "ng"}
    drops = {d.name: d for d in plan(tests)}
    assert len(drops) == 32

    hot = out / "line" / "hot"
    with Ledger.open(hot / ".edge-inspect" / "ledger.sqlite", readonly=True) as ledger:
        rows = list(ledger.rows())
    assert sorted(Path(r.source).name for r in rows) == sorted(drops)  # every part, each exactly once
    assert not list(hot.glob("*.png")), "a part was left in the hot folder, not inspected or not sorted"
    assert sorted(p.name for p in [*hot.glob("ok/*.png"), *hot.glob("ng/*.png")]) == sorted(drops)
    assert len((out / "line" / "verdicts.jsonl").read_text().splitlines()) == 32
    assert all(json.loads(line)["verdict"] in ("ok", "ng") for line in (out / "line" / "verdicts.jsonl").open())

    lines = result.output.splitlines()
    for r in rows:  # a table row per verdict: part, true label, verdict, score (the one number format), ms
        name = Path(r.source).name
        score = numbers.score_pair(r.score, r.threshold)[0]
        pattern = rf"{re.escape(name)}\s+{drops[name].label}\s+{r.verdict}\s+{re.escape(score)}\s+\d+"
        assert sum(bool(re.fullmatch(pattern, line.strip())) for line in lines) == 1, (name, result.output)
    assert "exit 0" in result.output and "each inspected once" in result.output
    ok_row = next(line for line in lines if "ok parts" in line)
    assert sum(map(int, re.findall(r"\d+", ok_row))) == 16

    report = (out / "runs" / "linear-ae" / "eval" / "report.html").resolve()
    assert report.is_file()
    assert lines[-1] == f"Report: {report} (open it in a browser)"
    assert_page_loads(report, tmp_path)
    assert "SIGTERM: finishing the parts in hand" in (out / "line" / "watch.log").read_text()


@pytest.mark.parametrize(("flags", "said"), [
    (["--size", "8"], "--size: 8 is out of range"),
    (["--count", "10"], "--count: 10 is out of range"),
    (["--rate", "0"], "--rate: 0.0 is out of range"),
])
def test_demo_checks_its_flags_before_writing_anything(tmp_path, flags, said):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), *flags])
    assert result.exit_code == 1
    assert said in " ".join(result.stderr.split()), result.stderr
    assert not out.exists()
