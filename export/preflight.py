"""Before TensorFlow loads: check a training command's arguments, and keep TensorFlow quiet.

TensorFlow takes seconds to load. Each training command first checks its
flags, folders and files here, with nothing heavier than NumPy, so that a typo
fails at once; and :func:`quiet_tensorflow` keeps TensorFlow's start-up
lines (oneDNN and CPU-feature notes, absl's warning) and the training
libraries' logs off the terminal, unless the command runs with ``--debug``.

    >>> quiet_tensorflow(debug=False)
    >>> check_calibrate("runs/conv-ae", rule="quantile", false_alarm_rate=0.02, k=3.0, criterion="range")
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

from edge_inspect.errors import ConfigError, InputError, ModelCardError
from edge_inspect.preprocess import IMAGE_SUFFIXES, is_image_name

#: Python loggers of the training side's libraries, and the least level they show without --debug.
QUIET_LOGGERS = {"tensorflow": logging.ERROR, "absl": logging.ERROR, "tf2onnx": logging.WARNING}
#: Packages whose Python warnings are hidden without --debug.
QUIET_WARNINGS = r"(tensorflow|keras|tf2onnx|absl|google\.protobuf)(\.|$)"


def check_train(config, resume: bool) -> None:
    """Check a training run's configuration, output folder and image folder.

    Args:
        config: an :class:`export.train.TrainConfig`.
        resume: whether the run continues from a checkpoint in ``config.out_dir``.

    Raises:
        ConfigError, ModelCardError, InputError: with what to change.
    """
    from export.train import check_run_dir

    config.resolved()
    check_run_dir(config.out_dir, resume)
    _image_folder(config.normal_dir, "--normal", "normal (good) part images")


def check_calibrate(
    run_dir: str | os.PathLike,
    *,
    rule: str,
    false_alarm_rate: float,
    k: float,
    criterion: str | None,
    anomalous: str | os.PathLike | None = None,
) -> None:
    """Check a calibration's settings, the run folder and its held-out images, and the defective images.

    Raises:
        ConfigError: unknown rule or criterion, a number out of range.
        ModelCardError: not a trained run folder; held-out images gone, or too few.
        InputError: the defective-image folder is missing or holds no image.
    """
    from edge_inspect.calibrate import MIN_NORMAL, check_settings
    from edge_inspect.kernels import CRITERIA

    check_settings(rule, false_alarm_rate, k, criterion, CRITERIA)
    normals = _run_folder(run_dir).held_out_normals("Calibration")
    if len(normals) < MIN_NORMAL:
        raise ModelCardError(
            f"Run '{run_dir}' holds out {len(normals)} normal images; calibration needs at least {MIN_NORMAL} "
            "(a few hundred give a stable threshold). Train a new run on more normal images, or with a larger "
            "--val-fraction."
        )
    if anomalous is not None:
        _image_folder(anomalous, "--anomalous", "defective part images")


def check_evaluate(
    run_dir: str | os.PathLike,
    normal: str | os.PathLike,
    anomalous: str | os.PathLike,
    out: str | os.PathLike | None = None,
) -> None:
    """Check that the run is trained and calibrated and that both image folders hold images.

    Raises:
        ModelCardError: not a trained run folder, or not calibrated.
        InputError: an image folder is missing or holds no image.
        ConfigError: ``out`` is a file.
    """
    _run_folder(run_dir, calibrated_for="evaluate")
    _image_folder(normal, "--normal", "normal (good) part images the model has not trained on")
    _image_folder(anomalous, "--anomalous", "defective part images")
    if out is not None and Path(out).is_file():
        raise ConfigError(f"--out: '{out}' is a file. Give a folder for the report.")


def check_export(
    run_dir: str | os.PathLike,
    *,
    precisions: Sequence[str],
    opset: int,
    default_precision: str | None = None,
    anomalous: str | os.PathLike | None = None,
) -> None:
    """Check the export options, that the run is trained and calibrated, and its held-out images.

    Raises:
        ConfigError: unknown precision, unsupported opset.
        ModelCardError: not a trained run folder, not calibrated, held-out images gone.
        InputError: the defective-image folder is missing or holds no image.
    """
    from export.to_onnx import check_options

    check_options(precisions, opset, default_precision)
    _run_folder(run_dir, calibrated_for="put in the model card").held_out_normals("The parity check")
    if anomalous is not None:
        _image_folder(anomalous, "--anomalous", "defective part images")


def _run_folder(run_dir: str | os.PathLike, calibrated_for: str | None = None):
    """A finished training run: its model, config.json, split.json (and calibration.json if ``calibrated_for``).

    Returns:
        Its :class:`export.run_folder.RunFolder`.
    """
    from export.run_folder import RunFolder

    folder = RunFolder(run_dir)
    path = folder.path
    create = "Create one with: edge-inspect train --normal DIR --out RUN_DIR"
    if not path.exists():
        raise ModelCardError(f"Run folder '{path}' does not exist. {create}")
    if not path.is_dir():
        raise ModelCardError(f"'{path}' is a file, not a run folder. {create}")
    missing = folder.missing()
    if missing and folder.last_checkpoint.is_file():
        raise ModelCardError(
            f"'{path}' holds a training run that did not finish ({', '.join(missing)} missing). Finish it with: "
            f"edge-inspect train --normal DIR --out {path} --resume"
        )
    if missing:
        raise ModelCardError(f"'{path}' is not a trained run folder: {', '.join(missing)} missing. {create}")
    if calibrated_for:
        folder.require_calibration(calibrated_for)
    return folder


def _image_folder(folder: str | os.PathLike, flag: str, what: str) -> None:
    """A folder with at least one file named like an image, at any depth (whether it decodes is checked later)."""
    root = Path(folder)
    if not root.exists():
        raise InputError(f"{flag}: image folder '{root}' does not exist. Give the folder of {what}.")
    if not root.is_dir():
        raise InputError(f"{flag}: '{root}' is a file, not a folder. Give the folder that holds the {what}.")
    if not any(is_image_name(path) and path.is_file() for path in root.rglob("*")):
        raise InputError(
            f"{flag}: image folder '{root}' holds no image ({', '.join(IMAGE_SUFFIXES)}, in any subfolder). "
            f"Put the {what} there."
        )


def quiet_tensorflow(debug: bool = False) -> None:
    """Keep TensorFlow's start-up lines and the training libraries' chatter off the terminal, unless ``debug``.

    Call it before anything imports TensorFlow; it imports nothing itself,
    so a linear-ae run, which needs no TensorFlow, does not pay for it.

    TensorFlow 2.21 prints its oneDNN note twice on import (two of its
    libraries each log it) through absl's pre-initialisation logger, which
    ``TF_CPP_MIN_LOG_LEVEL`` does not filter: only pointing the process's
    standard error elsewhere while it imports keeps those lines off the
    terminal, so the first import of ``tensorflow`` runs that way (what it
    wrote is shown if it fails). ``TF_CPP_MIN_LOG_LEVEL`` (unless already
    set) quiets TensorFlow's later native logs; the Python loggers of
    TensorFlow, absl and tf2onnx (whose optimizer logs at INFO) are turned
    down, and their warnings hidden. With ``debug`` nothing is hidden.
    """
    if debug:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", module=QUIET_WARNINGS)
    logging.getLogger("tf2onnx").setLevel(QUIET_LOGGERS["tf2onnx"])
    if "tensorflow" in sys.modules:
        _quiet_loggers()
    elif not any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def _quiet_loggers() -> None:
    # After TensorFlow's import: absl must create its own logger (of its own class) first.
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` for its first import, with a loader that runs it with standard error set aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: and the lookup below must not come back here
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """Runs the wrapped loader with file descriptor 2 pointed at a temporary file; then steps aside."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with tempfile.TemporaryFile() as captured:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(captured.fileno(), 2)
            failed = True
            try:
                self.loader.exec_module(module)
                failed = False
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                if failed:
                    captured.seek(0)
                    sys.stderr.write(captured.read().decode(errors="replace"))
        module.__loader__ = module.__spec__.loader = self.loader
        _quiet_loggers()
