"""Score images with a trained run: reconstruct with Keras, criteria with the kernels.

The training side's reference scorer: the same preprocessing and the same
fused kernels as the runtime, with Keras in place of ONNX Runtime.

    >>> run = load_run("runs/conv-ae")
    >>> scores = score_paths(run, paths)            # (N, len(CRITERIA)) float64
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edge_inspect.errors import ModelCardError
from edge_inspect.kernels import criteria
from export.run_folder import RunFolder


@dataclass
class Run:
    """A trained run folder, loaded."""

    path: Path
    model: object
    config: dict

    @property
    def size(self) -> tuple[int, int]:
        pre = self.config["preprocessing"]
        return (pre["height"], pre["width"])

    @property
    def kind(self) -> str:
        return self.config["train"]["model"]

    @property
    def folder(self) -> RunFolder:
        """The run's files."""
        return RunFolder(self.path)

    def held_out_normals(self, needed_for: str = "This") -> list[Path]:
        """The validation images of the run's split (:meth:`RunFolder.held_out_normals`)."""
        return self.folder.held_out_normals(needed_for)


def load_run(run_dir: str | Path) -> Run:
    """Load the model (``model.npz`` or ``model.keras``) and ``config.json`` of a run folder.

    A linear-ae's ``model.npz`` loads without TensorFlow.

    Raises:
        ModelCardError: the folder is not a finished run folder.
    """
    folder = RunFolder(run_dir)
    path, missing = folder.path, folder.missing()
    if missing:
        raise ModelCardError(
            f"'{path}' is not a run folder: {', '.join(missing)} missing. "
            "Create one with: edge-inspect train --normal DIR --out RUN_DIR"
        )
    config, model_file = folder.config(), folder.model_file
    if model_file.suffix == ".npz":
        from export.pca import LinearPCA

        return Run(path, LinearPCA.load(model_file), config)
    import keras

    import export.models  # noqa: F401  (registers the custom model classes)

    return Run(path, keras.models.load_model(model_file), config)


def reconstruct(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """``(N, H, W)`` float32 images in, ``(N, H, W)`` float32 reconstructions out.

    Calls the model directly, batch by batch: ``model.predict`` would build a
    data pipeline and retrace its function for every differently sized call.
    """
    out = np.empty_like(images, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size, :, :, None]
        out[start : start + batch_size] = np.asarray(model(batch, training=False))[..., 0]
    return out


def score_paths(
    run: Run,
    paths: list[Path],
    *,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Every criterion for every image: ``(N, len(CRITERIA))`` float64."""
    from export.data import load_batch

    out = np.empty((len(paths), 0))
    rows = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = load_batch(chunk, run.size)[..., 0]
        rows.append(criteria(images, reconstruct(run.model, images, batch_size)))
        if on_batch:
            on_batch(len(chunk))
    return np.concatenate(rows) if rows else out


def calibrate_run(
    run_dir: str | Path,
    *,
    rule: str = "quantile",
    false_alarm_rate: float = 0.05,
    k: float = 3.0,
    anomalous_dir: str | Path | None = None,
    criterion: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Score the run's held-out normals, calibrate every criterion, write ``calibration.json``.

    Args:
        run_dir: a trained run folder.
        rule, false_alarm_rate, k: the threshold rule (see
            :func:`edge_inspect.calibrate.calibrate`).
        anomalous_dir: a few labelled defective images for few-shot mode,
            which picks polarities and the default criterion from them.
        criterion: the default criterion (label-free default: ``range``).
        on_start, on_batch: progress callbacks (image counts).

    Returns:
        The calibration, as written.

    Raises:
        ModelCardError: not a run folder, or held-out images are gone.
        InputError: the anomalous folder has no readable image.
    """
    from edge_inspect.calibrate import calibrate, save_calibration
    from edge_inspect.kernels import CRITERIA
    from export.data import scan_folder

    run = load_run(run_dir)
    normals = run.held_out_normals("Calibration")
    anomalous = scan_folder(anomalous_dir, run.size).paths if anomalous_dir else []
    if on_start:
        on_start(len(normals) + len(anomalous))
    normal_scores = score_paths(run, normals, on_batch=on_batch)
    anomalous_scores = score_paths(run, anomalous, on_batch=on_batch) if anomalous else None
    cal = calibrate(
        normal_scores,
        CRITERIA,
        rule=rule,
        false_alarm_rate=false_alarm_rate,
        k=k,
        anomalous_scores=anomalous_scores,
        default_criterion=criterion,
    )
    save_calibration(cal, run.folder.calibration_path)
    return cal
