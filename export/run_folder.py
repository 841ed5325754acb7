"""A training run's folder: the names of its files, and reading and writing them.

    RUN_DIR/
      model.npz            the linear-ae's bases (export.pca); or
      model.keras          the best Keras model so far (lowest validation loss)
      config.json          every hyperparameter, the data, the split, versions
      split.json           which images trained and which were held out
      skipped.txt          files that could not be used, with the reason
      history.csv          loss per epoch (and the VAE's two terms)
      loss.png             the loss curves (not for linear-ae: fitted in closed form, it has no epochs)
      checkpoints/         last.keras + state.json, for --resume
      calibration.json     the thresholds (edge-inspect calibrate)
      exports.json         the model folders exported from the run (edge-inspect export)

Training writes the folder, calibration adds its thresholds, and scoring,
evaluation, the command line's checks and the export read it: all of them
through :class:`RunFolder`, so that no other module joins these names
itself. Nothing here imports TensorFlow.

    >>> run = RunFolder("runs/conv-ae")
    >>> run.model_file                     # runs/conv-ae/model.keras, or None before training ends
    >>> run.held_out_normals("Calibration")[:1]
    [PosixPath('/data/casting/ok/cast_ok_0_12.jpeg')]
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

from edge_inspect.card import RUN_MODEL_FILES
from edge_inspect.errors import ModelCardError

log = logging.getLogger(__name__)

__all__ = ["RUN_MODEL_FILES", "RunFolder", "atomic_write_text"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it there."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolder:
    """The files of one training run, named once.

    Attributes:
        path: the folder.
        config_path, split_path, skipped_path, history_path, loss_plot_path,
        calibration_path, exports_path: its files (see the module docstring).
        checkpoints, state_path, last_checkpoint: ``checkpoints/`` and the
            two files in it that a resume needs.
        keras_path, npz_path: where training writes the model of each kind.
        fit_images_path: the linear-ae's preprocessed images during its
            fit, removed afterwards.
        eval_dir: the default folder of ``evaluate``'s report.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.split_path = self.path / "split.json"
        self.skipped_path = self.path / "skipped.txt"
        self.history_path = self.path / "history.csv"
        self.loss_plot_path = self.path / "loss.png"
        self.calibration_path = self.path / "calibration.json"
        self.exports_path = self.path / "exports.json"
        self.checkpoints = self.path / "checkpoints"
        self.state_path = self.checkpoints / "state.json"
        self.last_checkpoint = self.checkpoints / "last.keras"
        self.keras_path = self.path / "model.keras"
        self.npz_path = self.path / "model.npz"
        self.fit_images_path = self.path / ".fit-images.f32"  # the linear-ae's images while it fits
        self.eval_dir = self.path / "eval"  # what `evaluate` writes unless told another folder

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------ reading

    @property
    def model_file(self) -> Path | None:
        """The run's model file (``model.npz`` or ``model.keras``), or None if it has none yet."""
        for name in RUN_MODEL_FILES:
            if (self.path / name).is_file():
                return self.path / name
        return None

    def missing(self) -> list[str]:
        """What a finished run holds and this folder lacks: the model file, ``config.json``, ``split.json``."""
        model = [" or ".join(RUN_MODEL_FILES)] if self.model_file is None else []
        return model + [p.name for p in (self.config_path, self.split_path) if not p.is_file()]

    @property
    def has_checkpoint(self) -> bool:
        """Whether a training run can resume here (``checkpoints/last.keras`` and ``state.json``)."""
        return self.state_path.exists() and self.last_checkpoint.exists()

    def config(self) -> dict:
        """``config.json``: what :func:`export.train.train` recorded."""
        return json.loads(self.config_path.read_text())

    def split(self) -> dict:
        """``split.json``: ``{"root", "train", "val"}``, image paths relative to ``root``."""
        return json.loads(self.split_path.read_text())

    def training_images(self) -> list[Path]:
        """The training images of the split, as recorded (some may have gone since)."""
        split = self.split()
        return [Path(split["root"]) / rel for rel in split["train"]]

    def held_out_normals(self, needed_for: str = "This") -> list[Path]:
        """The validation images of the split, which training never fitted. Loads no model.

        Raises:
            ModelCardError: some of them are gone; ``needed_for`` names what
                needs them in the message.
        """
        split = self.split()
        root = Path(split["root"])
        normals = [root / rel for rel in split["val"]]
        gone = [p for p in normals if not p.is_file()]
        if gone:
            raise ModelCardError(
                f"{len(gone)} of the run's {len(normals)} held-out normal images are gone (first: {gone[0]}). "
                f"{needed_for} needs them; restore the training folder or train a new run."
            )
        return normals

    def require_calibration(self, needed_for: str) -> None:
        """Raise ModelCardError, naming the command to run, if there is no ``calibration.json``.

        ``needed_for`` completes "there is no threshold to ...".
        """
        if not self.calibration_path.is_file():
            raise ModelCardError(
                f"'{self.path}' has no calibration.json, so there is no threshold to {needed_for}. "
                f"Run: edge-inspect calibrate {self.path}"
            )

    def calibration(self) -> dict:
        """``calibration.json``, validated (:func:`edge_inspect.calibrate.load_calibration`)."""
        from edge_inspect.calibrate import load_calibration

        return load_calibration(self.calibration_path)

    def state(self) -> dict:
        """``checkpoints/state.json`` (epochs, best epoch, history, the linear fit's summary), or ``{}``."""
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def exports(self) -> list[dict]:
        """The model folders recorded in ``exports.json``; ``[]`` when it is missing or unreadable."""
        try:
            known = json.loads(self.exports_path.read_text())["exports"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return known if isinstance(known, list) else []

    # ------------------------------------------------------------ writing

    def write_config(self, record: dict) -> None:
        atomic_write_text(self.config_path, json.dumps(record, indent=2))

    def write_split(self, root: Path, train: list[str], val: list[str]) -> None:
        atomic_write_text(self.split_path, json.dumps({"root": str(root), "train": train, "val": val}, indent=1))

    def write_skipped(self, skipped: list[tuple[Path, str]]) -> None:
        atomic_write_text(self.skipped_path, "".join(f"{p}\t{reason}\n" for p, reason in skipped))

    def write_state(self, state: dict) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=1))

    def write_history(self, history: list[dict]) -> None:
        """``history.csv``: one row per epoch, the columns every row's keys, ``epoch`` first."""
        keys = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})
        tmp = self.path / ".history.csv.tmp"
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, self.history_path)

    def record_export(self, out_dir: Path, card: dict) -> None:
        """Add ``out_dir`` to ``exports.json`` (latest export per folder).

        Best effort: a run folder that cannot be written to loses only the
        hint that ``calibrate`` gives; the model folder is already complete.
        """
        folder = str(Path(out_dir).resolve())
        known = [e for e in self.exports() if isinstance(e, dict) and e.get("folder") != folder]
        known.append({"folder": folder, "exported_at": card["exported_at"], "precisions": list(card["files"]),
                      "default_precision": card["default_precision"]})
        path = self.exports_path
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            tmp.write_text(json.dumps({"exports": known}, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("Could not record the export in %s (%s); calibrate will not name %s", path, exc, out_dir)
