"""docs/getting-started.md runs: every ```bash command, in order, with the real CLI, on small synthetic parts.

The guide's conventions (stated in a comment at its top): ```bash blocks are
run here; ```console blocks (installing, root) are not; a ```toml block whose
first line is ``# FILE`` is written to FILE; a command marked ``# until
Ctrl-C`` runs until its hot folder is empty, then gets SIGINT. The placeholder
folders (``parts/ok``, ``parts/test/ok`` ...) are filled with synthetic parts,
and ``train`` gets ``--size 64 --components 32`` so that the guide runs in
seconds; every other flag is the guide's own.
"""

import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from edge_inspect.preprocess import is_image_name
from tests.support import write_parts

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"
SMALL = "--size 64 --components 32"
UNTIL_CTRL_C = "# until Ctrl-C"
TODAY = 6  # parts in parts/today: 3 good, 3 defective


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced blocks of a Markdown text, in order: ``(language, body)``."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", text, re.M | re.S)]


def commands(body: str) -> list[str]:
    """A bash block's commands: one a line, blank and comment lines left out."""
    return [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


def make_parts(root: Path) -> None:
    """The guide's folders, with small synthetic parts (64 px)."""
    write_parts(root / "parts" / "ok", 60, size=64, seed=0)
    write_parts(root / "parts" / "test" / "ok", 12, size=64, seed=1)
    write_parts(root / "parts" / "test" / "ng", 12, size=64, seed=2, defective=True)
    write_parts(root / "parts" / "few-defects", 5, size=64, seed=3, defective=True)
    write_parts(root / "parts" / "today", TODAY // 2, size=64, seed=4)
    for path in write_parts(root / "defects", TODAY - TODAY // 2, size=64, seed=5, defective=True):
        path.rename(root / "parts" / "today" / f"ng_{path.name}")


def _calibration(root: Path) -> dict:
    return json.loads((root / "runs" / "linear-ae" / "calibration.json").read_text())


def _ledger_rows(root: Path) -> int:
    with sqlite3.connect(root / "hot" / ".edge-inspect" / "ledger.sqlite") as conn:
        return conn.execute("SELECT count(*) FROM parts").fetchone()[0]


def _check_train(root, out, since):
    run = root / "runs" / "linear-ae"
    assert (run / "config.json").is_file() and (run / "calibration.json").is_file()
    assert json.loads((run / "config.json").read_text())["train"]["size"] == 64


def _check_evaluate(root, out, since):
    report = root / "runs" / "linear-ae" / "eval" / "report.html"
    assert report.is_file() and report.stat().st_mtime >= since, "evaluate did not write a new report.html"
    assert "report.html" in out


def _check_calibrate_rate(root, out, since):
    cal = _calibration(root)
    assert cal["false_alarm_rate"] == 0.02 and cal["mode"] == "label-free"


def _check_calibrate_few_shot(root, out, since):
    cal = _calibration(root)
    assert cal["mode"] == "few-shot" and cal["n_anomalous"] == 5


def _check_export(root, out, since):
    model = root / "models" / "linear-ae"
    assert (model / "model.onnx").is_file() and (model / "model.json").is_file()
    card = json.loads((model / "model.json").read_text())
    assert card["calibration"]["mode"] == _calibration(root)["mode"]  # the card carries the threshold just set


def _check_predict(root, out, since):
    counts = re.search(r"(\d+) ok, (\d+) ng, 0 error", out)
    assert counts and int(counts[1]) + int(counts[2]) == TODAY, out


def _check_watch(root, out, since):
    hot = root / "hot"
    assert _ledger_rows(root) == TODAY  # each part once
    sorted_parts = [p for folder in ("ok", "ng") for p in (hot / folder).glob("*") if is_image_name(p)]
    assert len(sorted_parts) == TODAY
    assert len((root / "verdicts.jsonl").read_text().splitlines()) == TODAY
    ng = len(list((hot / "ng").glob("*")))
    assert len(list((root / "overlays").glob("*.png"))) == ng


def _check_results(root, out, since):
    assert f"{TODAY} parts" in out, out


def _check_results_csv(root, out, since):
    assert len((root / "verdicts.csv").read_text().splitlines()) == TODAY + 1  # a header, a row per part


def _check_version(root, out, since):
    assert out.startswith("edge-inspect ") and "ONNX Runtime" in out and "CPUExecutionProvider" in out


def _check_config(root, out, since):
    assert (root / "line.toml").is_file()


#: Command prefix -> what the step promises. Every edge-inspect command of the guide must match one.
CHECKS = {
    "edge-inspect --version": _check_version,
    "edge-inspect train ": _check_train,
    "edge-inspect evaluate ": _check_evaluate,
    "edge-inspect calibrate runs/linear-ae --false-alarm-rate 0.02": _check_calibrate_rate,
    "edge-inspect calibrate runs/linear-ae --anomalous": _check_calibrate_few_shot,
    "edge-inspect export ": _check_export,
    "edge-inspect predict ": _check_predict,
    "edge-inspect watch ": _check_watch,
    "edge-inspect results hot --since today --csv": _check_results_csv,
    "edge-inspect results hot": _check_results,
    "edge-inspect config check ": _check_config,
}


def _check_for(command: str):
    matches = [prefix for prefix in CHECKS if command.startswith(prefix)]
    return max(matches, key=len) if matches else None


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "EDGE_INSPECT_CONFIG")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the venv's edge-inspect
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["COLUMNS"] = "200"  # no wrapping of the figures the checks read
    return env


def _run_until_drained(command: str, root: Path, env: dict) -> str:
    """Run a watcher until its hot folder holds no image at its top, then press Ctrl-C (SIGINT); exit 0."""
    argv = shlex.split(command, comments=True)
    hot = root / argv[argv.index("watch") + 1]
    process = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while any(is_image_name(p) for p in hot.iterdir() if p.is_file()):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the watcher did not inspect the parts within 90 s"
            time.sleep(0.2)
        time.sleep(0.5)  # the sinks of the last part (its JSON line, its overlay) run right after its move
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, out
    return out


def test_the_guide_marks_what_it_does_not_run():
    found = blocks(GUIDE.read_text(encoding="utf-8"))
    run = "\n".join(body for language, body in found if language == "bash")
    kept = "\n".join(body for language, body in found if language == "console")
    assert "pip install" in kept and "deploy/install.sh --service" in kept and "sudo " in kept
    assert "sudo " not in run and "pip install" not in run  # root and installs stay in console blocks
    assert len(commands(run)) >= 10


def test_every_command_of_the_guide_runs(tmp_path):
    make_parts(tmp_path)
    env = _env()
    used = set()
    for language, body in blocks(GUIDE.read_text(encoding="utf-8")):
        if language == "toml":
            name = body.splitlines()[0].removeprefix("#").strip()
            (tmp_path / name).write_text(body, encoding="utf-8")
            continue
        if language != "bash":
            continue
        for command in commands(body):
            check = _check_for(command)
            assert check or not command.startswith("edge-inspect"), f"no check for: {command}"
            used.add(check)
            run = command.replace("edge-inspect train ", f"edge-inspect train {SMALL} ", 1)
            since = time.time() - 1
            if UNTIL_CTRL_C in command:
                out = _run_until_drained(run, tmp_path, env)
            else:
                done = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=300)
                out = done.stdout + done.stderr
                assert done.returncode == 0, f"{command}\n{out}"
            if check:
                CHECKS[check](tmp_path, out, since)
    assert used - {None} == set(CHECKS), f"steps the guide no longer has: {set(CHECKS) - used}"
