"""Tiny trained, calibrated and exported models, shared by the runtime and export tests.

Training is the slow part (TensorFlow), so each model kind is trained once
per test session, at 32 px for one epoch on synthetic parts, and cached here;
``tests/export/test_to_onnx.py`` imports these fixtures, and the module-level
cache keeps a full test run from training anything twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SIZE = 32
_cache: dict[str, Path] = {}


def _normal_parts(base: Path) -> Path:
    folder = base / "tiny-normal"
    if not folder.exists():
        from edge_inspect.synthetic import write_parts

        # 60 parts with a 0.3 validation share: 18 held out, enough for
        # calibration's minimum of 10.
        write_parts(folder, 60, size=SIZE, seed=11)
    return folder


def tiny_run(kind: str, base: Path) -> Path:
    """A trained and calibrated run folder of ``kind`` (cached per session)."""
    key = f"run:{kind}"
    if key not in _cache:
        from export.scoring import calibrate_run
        from export.train import TrainConfig, train

        out = base / f"tiny-run-{kind}"
        config = TrainConfig(model=kind, normal_dir=str(_normal_parts(base)), out_dir=str(out), size=SIZE,
                             epochs=1, batch_size=16, val_fraction=0.3, seed=0, components=32)
        train(config, progress=False)
        calibrate_run(out)
        _cache[key] = out
    return _cache[key]


def tiny_model(base: Path) -> Path:
    """The conv-ae run exported at fp32 and int8 (forced: a one-epoch model is no test of int8 quality)."""
    if "model" not in _cache:
        from export.to_onnx import export_run

        out = base / "tiny-model"
        export_run(tiny_run("conv-ae", base), out, precisions=("fp32", "int8"), force=True,
                   default_precision="fp32")
        _cache["model"] = out
    return _cache["model"]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp() / "tiny-models"
    base.mkdir(exist_ok=True)
    return base


@pytest.fixture(scope="session")
def conv_ae_run(tiny_base) -> Path:
    return tiny_run("conv-ae", tiny_base)


@pytest.fixture(scope="session")
def model_dir(tiny_base) -> Path:
    """An exported conv-ae model folder (fp32 default, int8 beside it). Do not modify: copy it."""
    return tiny_model(tiny_base)
