"""The runtime never imports TensorFlow, Keras or tf2onnx: proved in fresh interpreters."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("tensorflow", "keras", "tf2onnx")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from edge_inspect.synthetic import write_parts

    folder = tmp_path_factory.mktemp("lean-images")
    write_parts(folder, 3, size=32, seed=7, defective=True)
    return folder


def test_cli_predict_and_inspection_import_no_training_module(model_dir, images):
    proc = _python(f"""
        import sys
        import numpy as np
        from typer.testing import CliRunner
        from edge_inspect.cli import app
        from edge_inspect.inspector import Inspector

        runner = CliRunner()
        assert runner.invoke(app, ["--help"]).exit_code == 0
        result = runner.invoke(app, ["predict", "--model", {str(model_dir)!r}, {str(images)!r}, "--json"])
        assert result.exit_code == 0, result.output
        assert Inspector.load({str(model_dir)!r}, precision="int8").inspect(np.zeros((40, 40), np.uint8)).verdict
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print("HEAVY:", loaded)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY: []" in proc.stdout


def test_lean_install_runs_runtime_commands_and_names_the_extra_for_training(model_dir, images, tmp_path):
    """With TensorFlow, Keras and tf2onnx unimportable, as in `pip install edge-inspect`."""
    proc = _python(f"""
        import importlib.abc, sys

        class NoTraining(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {HEAVY!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, NoTraining())
        from typer.testing import CliRunner
        from edge_inspect.cli import app

        runner = CliRunner()
        result = runner.invoke(app, ["predict", "--model", {str(model_dir)!r}, {str(images)!r}])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["export", {str(model_dir)!r}, "--out", {str(tmp_path / "m")!r}])
        assert result.exit_code == 1, result.output
        print("EXPORT:", result.stderr.replace("\\n", " "))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'edge-inspect[train]'" in proc.stdout


def test_a_watch_run_imports_no_training_module(model_dir, images, tmp_path):
    """A hot folder watched with every sink until SIGTERM, then a camera (a video file) to its end."""
    import cv2
    import numpy as np

    folder = tmp_path / "in"
    folder.mkdir()
    for path in images.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for _ in range(3):
        writer.write(np.full((32, 32, 3), 128, np.uint8))
    writer.release()
    ledger = folder / ".edge-inspect" / "ledger.sqlite"
    proc = _python(f"""
        import os, signal, sqlite3, sys, threading, time
        from typer.testing import CliRunner
        from edge_inspect.cli import app

        def stop_when_done():
            while True:
                time.sleep(0.1)
                try:
                    with sqlite3.connect({str(ledger)!r}) as conn:
                        if conn.execute("SELECT count(*) FROM parts WHERE sinks_pending = ''").fetchone()[0] == 3:
                            break
                except sqlite3.Error:
                    pass
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=stop_when_done, daemon=True).start()
        runner = CliRunner()
        result = runner.invoke(app, ["watch", {str(folder)!r}, "--model", {str(model_dir)!r}, "--sort",
                                     "--heatmaps", {str(tmp_path / "heat")!r}, "--results", {str(tmp_path / "v.jsonl")!r},
                                     "--settle", "0"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["watch", "--camera", {str(video)!r}, "--model", {str(model_dir)!r},
                                     "--ledger", {str(tmp_path / "camera.sqlite")!r}])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["results", {str(folder)!r}])
        assert result.exit_code == 0, result.output
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print("HEAVY:", loaded)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY: []" in proc.stdout
    sorted_files = [p.name for v in ("ok", "ng", "error") for p in (folder / v).iterdir()]
    assert sorted(sorted_files) == sorted(p.name for p in images.iterdir())
