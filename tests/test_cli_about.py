"""``edge-inspect --version``, and the install hints the command line prints: each names something that exists."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numba
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from edge_inspect import __version__
from edge_inspect.cli import app
from edge_inspect.synthetic import write_parts

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
runner = CliRunner()


def test_version_names_the_package_onnx_runtime_numba_and_python_without_tensorflow():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "edge_inspect", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"edge-inspect {__version__}\n" in out
    assert f"ONNX Runtime {ort.__version__} ({ort.get_device()} build); providers: " in out
    assert all(provider in out for provider in ort.get_available_providers())
    assert f"Numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads" in out
    assert f"Python {sys.version.split()[0]}" in out
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx")}
    assert "onnxruntime" in imported  # the import log is read right: the runtime's own engine is in it


def test_version_answers_before_any_command():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith(f"edge-inspect {__version__}")
    assert "--version" in runner.invoke(app, ["--help"]).output


def _named_extras(text: str) -> set[str]:
    """Extras a pip command in ``text`` installs: ``edge-inspect[train]``, ``.[train-gpu]``."""
    groups = re.findall(r"(?:edge-inspect|\.)\[([A-Za-z0-9_,-]+)\]", text)
    return {extra for group in groups for extra in group.split(",")}


def test_every_install_hint_in_the_code_names_an_extra_that_exists():
    hints = [(path, line) for folder in ("edge_inspect", "export") for path in sorted((ROOT / folder).rglob("*.py"))
             for line in path.read_text().splitlines() if "pip install" in line]
    assert hints  # the hints are found where they live
    for path, line in hints:
        assert _named_extras(line) <= EXTRAS, f"{path.relative_to(ROOT)}: {line.strip()} (extras: {sorted(EXTRAS)})"


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory):
    """A linear-ae exported by the CLI at 32 px."""
    base = tmp_path_factory.mktemp("hint")
    write_parts(base / "ok", 60, size=32, seed=5)
    for args in (["train", "--normal", str(base / "ok"), "--out", str(base / "run"), "--size", "32",
                  "--components", "8", "--val-fraction", "0.3"],
                 ["export", str(base / "run"), "--out", str(base / "model")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output + result.stderr
    return base


def test_cuda_without_cuda_gives_the_readmes_install_command(linear_model):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    result = runner.invoke(app, ["predict", "--model", str(linear_model / "model"), str(linear_model / "ok"),
                                 "--device", "cuda"])
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert message.startswith("Error: Device 'cuda' was asked for") and "no CUDA execution provider" in message
    # The command is the README's, and the installer's option exists.
    command = "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]'"
    assert command in message and command in (ROOT / "README.md").read_text()
    assert "deploy/install.sh --gpu" in message and "--gpu)" in (ROOT / "deploy" / "install.sh").read_text()
    assert _named_extras(message) <= EXTRAS and "[gpu]" not in message
    assert "--device cpu or auto" in message
