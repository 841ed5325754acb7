"""Training: presets, fit with early stopping, resumable checkpoints, the run folder.

A run folder holds everything the rest of the tool needs:

    RUN_DIR/
      model.keras          the best model so far (lowest validation loss)
      config.json          every hyperparameter, the data, the split, versions
      split.json           which images trained and which were held out
      skipped.txt          files that could not be used, with the reason
      history.csv          loss per epoch (and the VAE's two terms)
      loss.png             the loss curves
      checkpoints/         last.keras + state.json, for --resume

    >>> from export.train import TrainConfig, train
    >>> train(TrainConfig(model="conv-ae", normal_dir="parts/ok", out_dir="runs/a"))
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from edge_inspect import __version__
from edge_inspect.errors import ConfigError, InputError, ModelCardError
from edge_inspect.preprocess import Preprocessing

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamax", "adam")


@dataclass(frozen=True)
class Preset:
    """Defaults that a named preset sets; explicit flags override them."""

    size: int
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adamax"
    patience: int = 10
    #: Input size of the linear-ae, which costs seconds where deep models cost hours.
    linear_size: int | None = None


#: The linear-ae's input size in the fast preset: on the leak-bounded casting
#: split, the smoothed criteria gain with resolution up to here while the
#: fit stays within minutes on a 2-core CPU (docs/results.md).
LINEAR_SIZE = 256

PRESETS = {
    # The paper's configuration.
    "paper": Preset(size=300, epochs=100, batch_size=64, lr=1e-4),
    # CPU-friendly: at 128 px a pinhole is still 2-4 pixels wide while an
    # epoch costs 6-7x less than at 300 px; see docs/training.md.
    "fast": Preset(size=128, epochs=40, batch_size=32, lr=1e-3, patience=8, linear_size=LINEAR_SIZE),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` means: from the preset."""

    model: str
    normal_dir: str
    out_dir: str
    preset: str = "fast"
    size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    patience: int | None = None
    seed: int = 0
    val_fraction: float = 0.2
    latent_dim: int = 2
    components: int = 1024
    augment: str | None = None
    group_split: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` filled from the preset, validated.

        Raises:
            ConfigError: unknown preset, model or optimizer, or a bad number.
        """
        from export.models import MODEL_KINDS
        from export.models.linear_ae import AUGMENTATIONS

        if self.preset not in PRESETS:
            raise ConfigError(f"Unknown preset '{self.preset}'. Choose one of: {', '.join(PRESETS)}.")
        if self.model not in MODEL_KINDS:
            raise ConfigError(f"Unknown model '{self.model}'. Choose one of: {', '.join(MODEL_KINDS)}.")
        preset = asdict(PRESETS[self.preset])
        linear_size = preset.pop("linear_size")
        if self.model == "linear-ae" and self.size is None and linear_size is not None:
            preset["size"] = linear_size
        filled = replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})
        if filled.augment is None:
            filled = replace(filled, augment="d4" if filled.model == "linear-ae" else "none")
        if filled.augment not in AUGMENTATIONS:
            raise ConfigError(f"At 'augment': unknown '{filled.augment}'. Choose one of: {', '.join(AUGMENTATIONS)}.")
        if filled.augment != "none" and filled.model != "linear-ae":
            raise ConfigError(
                f"At 'augment': '{filled.augment}' is only available for linear-ae; the {filled.model} "
                "trains on the images as they are. Use --augment none."
            )
        checks = {
            "size": filled.size >= 16,
            "epochs": filled.epochs >= 1,
            "batch_size": filled.batch_size >= 1,
            "lr": 0 < filled.lr < 1,
            "patience": filled.patience >= 1,
            "latent_dim": filled.latent_dim >= 1,
            "components": filled.components >= 1,
            "val_fraction": 0 < filled.val_fraction < 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"At '{key}': {getattr(filled, key)!r} is out of range.")
        if filled.optimizer not in OPTIMIZERS:
            raise ConfigError(f"At 'optimizer': unknown '{filled.optimizer}'. Choose one of: {', '.join(OPTIMIZERS)}.")
        return filled

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.size, self.size)


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    seconds: float
    n_train: int
    n_val: int
    n_skipped: int


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_model(model, path: Path) -> None:
    # Keras insists on the .keras suffix, so the temporary name keeps it.
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def versions() -> dict:
    """Versions of the software a run was made with."""
    import keras
    import tensorflow as tf

    return {
        "edge_inspect": __version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def devices() -> list[str]:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in gpus] or ["CPU"]


def _strategy():
    """One GPU or the CPU: the default strategy; several GPUs: mirrored."""
    import tensorflow as tf

    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _make_optimizer(name: str, lr: float):
    import keras

    return {"adamax": keras.optimizers.Adamax, "adam": keras.optimizers.Adam}[name](learning_rate=lr)


def _needs_targets(model) -> bool:
    """Plain autoencoders fit (x, x); models with their own train_step fit x."""
    import keras

    return type(model).train_step is keras.Model.train_step


def _checkpoint_callback(run_dir: Path, state: dict, patience: int):
    """Saves last.keras + state.json every epoch and model.keras on improvement.

    The state records the epochs done, the history, the early-stopping
    counter and the training seconds so far. The state file is written
    after the model it describes, each atomically,
    so a kill at any instant leaves a consistent pair to resume from.
    Early stopping lives here too, so its counter survives a resume.
    """
    import keras

    class Checkpoint(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start, self.seconds_before = time.monotonic(), state.get("seconds", 0.0)

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            state["history"].append({"epoch": epoch + 1, **logs})
            state["seconds"] = self.seconds_before + time.monotonic() - self.start
            val = logs.get("val_loss", logs.get("loss"))
            if val is not None and np.isfinite(val) and val < state["best_val_loss"]:
                state.update(best_val_loss=val, best_epoch=epoch + 1, wait=0)
                _atomic_save_model(self.model, run_dir / "model.keras")
            else:
                state["wait"] += 1
            state["epoch"] = epoch + 1
            _atomic_save_model(self.model, run_dir / "checkpoints" / "last.keras")
            _atomic_write_text(run_dir / "checkpoints" / "state.json", json.dumps(state, indent=1))
            _write_history(run_dir, state["history"])
            if state["wait"] >= patience:
                state["stopped_early"] = True
                self.model.stop_training = True

    return Checkpoint()


def _write_history(run_dir: Path, history: list[dict]) -> None:
    keys = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})
    tmp = run_dir / ".history.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, run_dir / "history.csv")


def plot_history(run_dir: Path, history: list[dict], title: str) -> Path:
    """Write ``loss.png``: training and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    terms = [k for k in ("loss", "reconstruction_loss", "kl_loss") if any(k in row for row in history)]
    fig, axes = plt.subplots(1, len(terms), figsize=(4.5 * len(terms), 3.5), squeeze=False)
    for ax, key in zip(axes[0], terms):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [row.get(prefix + key, np.nan) for row in history]
            ax.plot(epochs, values, style, marker=".", label=("validation " if prefix else "training ") + key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _progress_callback(epochs: int, steps: int, initial_epoch: int):
    """A rich progress bar: epoch, loss, validation loss and ETA."""
    import keras
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    class RichProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  val_loss {task.fields[val_loss]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train",
                total=(epochs - initial_epoch) * steps,
                epoch=initial_epoch + 1,
                epochs=epochs,
                loss="-",
                val_loss="-",
            )

        def on_epoch_begin(self, epoch, logs=None):
            self.progress.update(self.task, epoch=epoch + 1)

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            self.progress.update(self.task, advance=1, loss=f"{float(loss):.5g}" if loss is not None else "-")

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            self.progress.update(self.task, completed=(epoch + 1 - initial_epoch) * steps, val_loss=f"{float(logs.get('val_loss', np.nan)):.5g}")
            self.progress.console.print(
                f"{time.strftime('%H:%M:%S')} epoch {epoch + 1}/{epochs}: loss {float(logs.get('loss', np.nan)):.5g}, "
                f"val_loss {float(logs.get('val_loss', np.nan)):.5g}"
            )

        def on_train_end(self, logs=None):
            self.progress.stop()

    return RichProgress()


def _log_callback(epochs: int):
    import keras

    class LogEpochs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            log.info("epoch %d/%d: loss %.5g, val_loss %.5g", epoch + 1, epochs, logs.get("loss", np.nan), logs.get("val_loss", np.nan))

    return LogEpochs()


def _prepare_run_dir(run_dir: Path, resume: bool) -> dict | None:
    """Check the output folder; on resume, return the saved checkpoint state."""
    state_path = run_dir / "checkpoints" / "state.json"
    if resume:
        if not state_path.exists() or not (run_dir / "checkpoints" / "last.keras").exists():
            raise ModelCardError(
                f"Cannot resume: '{run_dir}' has no checkpoint (checkpoints/last.keras and state.json). "
                "Start a new run without --resume."
            )
        return json.loads(state_path.read_text())
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"Output folder '{run_dir}' already holds files. Continue that run with --resume, "
            "or choose a new --out folder."
        )
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return None


def _resume_config(run_dir: Path, overrides: TrainConfig) -> TrainConfig:
    """The saved configuration; only ``epochs`` may be raised on resume."""
    saved = json.loads((run_dir / "config.json").read_text())
    names = {f.name for f in fields(TrainConfig)}
    # Runs from before grouped splits held out a plain hashed share: keep it.
    config = TrainConfig(**{"group_split": False, **{k: v for k, v in saved["train"].items() if k in names}})
    if overrides.epochs is not None and overrides.epochs != config.epochs:
        config = replace(config, epochs=overrides.epochs)
    return config


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a model on normal images and write the run folder.

    Args:
        config: what to train; ``None`` fields come from ``config.preset``.
        resume: continue the run in ``config.out_dir`` from its checkpoint;
            the saved configuration is used and only ``epochs`` may change.
        progress: show rich progress bars over the image check and the
            epochs (else log one line an epoch).

    Returns:
        A summary of the run.

    Raises:
        ConfigError, InputError, ModelCardError: with a message that says
        what to change. KeyboardInterrupt passes through after the last
        finished epoch has been checkpointed.
    """
    run_dir = Path(config.out_dir)
    state = _prepare_run_dir(run_dir, resume)
    if resume:
        config = _resume_config(run_dir, config)
    config = config.resolved()

    import keras

    from export.data import make_dataset, scan_folder, split_paths
    from export.models import build_model

    size = config.input_size
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("Checking images", total=None)
        folder = scan_folder(config.normal_dir, size, on_file=lambda: bar.advance(task))
    groups = _near_duplicate_groups(folder.paths, progress) if config.group_split else None
    split = split_paths(folder.root, folder.paths, val_fraction=config.val_fraction, seed=config.seed, groups=groups)
    if len(split.train) < 1 or len(split.val) < 1:
        raise InputError(
            f"Need at least 2 readable normal images in '{folder.root}' (one to train, one to validate); "
            f"found {len(folder.paths)}."
        )
    if resume:
        saved_split = json.loads((run_dir / "split.json").read_text())
        if [p.relative_to(folder.root).as_posix() for p in split.train] != saved_split["train"]:
            log.warning("The image folder changed since the run started; the new split is used.")

    _write_run_files(run_dir, config, folder, split)
    if config.model == "linear-ae":
        return _fit_linear(config, run_dir, split, len(folder.skipped), progress)

    keras.utils.set_random_seed(config.seed)
    train_ds = make_dataset(split.train, size, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    val_ds = make_dataset(split.val, size, batch_size=config.batch_size, shuffle=False, seed=config.seed)

    with _strategy().scope():
        if state is not None:
            model = keras.models.load_model(run_dir / "checkpoints" / "last.keras")
            initial_epoch = state["epoch"]
            log.info("Resuming %s from epoch %d", run_dir, initial_epoch)
        else:
            model = build_model(config.model, size, latent_dim=config.latent_dim, seed=config.seed)
            model.compile(optimizer=_make_optimizer(config.optimizer, config.lr), **_compile_args(model))
            initial_epoch = 0
            state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": 0, "wait": 0, "stopped_early": False, "history": []}

    if _needs_targets(model):
        train_ds = train_ds.map(lambda x: (x, x))
        val_ds = val_ds.map(lambda x: (x, x))

    steps = -(-len(split.train) // config.batch_size)
    callbacks = [_checkpoint_callback(run_dir, state, config.patience)]
    callbacks.append(_progress_callback(config.epochs, steps, initial_epoch) if progress else _log_callback(config.epochs))
    log.info("Training %s on %s (%d train, %d validation images) with %s", config.model, ", ".join(devices()), len(split.train), len(split.val), config.preset)
    if initial_epoch < config.epochs and not state["stopped_early"]:
        model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=0, shuffle=False)
    seconds = state.get("seconds", 0.0)
    if state["history"]:
        plot_history(run_dir, state["history"], f"{config.model}, {config.size} px, {len(split.train)} images")
    return TrainResult(
        run_dir=run_dir,
        epochs_run=state["epoch"],
        best_epoch=state["best_epoch"],
        best_val_loss=state["best_val_loss"],
        stopped_early=state["stopped_early"],
        seconds=seconds,
        n_train=len(split.train),
        n_val=len(split.val),
        n_skipped=len(folder.skipped),
    )


#: Above this many images the split skips grouping near-duplicates (the
#: comparison grows with the square of the count); the run log says so.
MAX_GROUPED_IMAGES = 20_000


def _near_duplicate_groups(paths: list[Path], progress: bool) -> np.ndarray | None:
    """Near-duplicate group of each image, for a validation split of unseen parts."""
    from rich.progress import Progress

    from export.data import NEAR_DUPLICATE_SIZE, load_batch, near_duplicate_groups

    if len(paths) > MAX_GROUPED_IMAGES:
        log.warning("%d images: more than %d, so the validation split does not group near-duplicates; "
                    "calibration may then see copies of training images", len(paths), MAX_GROUPED_IMAGES)
        return None
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("Grouping near-duplicate images", total=len(paths))
        thumbs = load_batch(paths, (NEAR_DUPLICATE_SIZE, NEAR_DUPLICATE_SIZE), on_image=lambda: bar.advance(task))
        groups = near_duplicate_groups(thumbs[..., 0])
    sizes = np.bincount(groups)
    log.info("%d images in %d near-duplicate groups (largest %d); validation takes whole groups",
             len(paths), len(sizes), sizes.max())
    return groups


def _fit_linear(config: TrainConfig, run_dir: Path, split, n_skipped: int, progress: bool) -> TrainResult:
    """Fit the linear AE in closed form and write it as the run's model.

    One "epoch": the fit sees every training image (and its augmented
    views) at once. The history row holds the training and validation MSE.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from export.data import load_batch
    from export.models import build_model, fit_linear_ae
    from export.scoring import reconstruct

    start = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("Loading training images", total=len(split.train))
        images = load_batch(split.train, config.input_size, on_image=lambda: bar.advance(task))[..., 0]
        views = 8 * len(images) if config.augment == "d4" else len(images)
        bar.add_task(f"Fitting {config.components} components to {views} images (SVD)", total=None)
        log.info("Fitting linear-ae: %d components, %d training images, augment %s", config.components, len(images), config.augment)
        model = build_model("linear-ae", config.input_size, components=config.components)
        summary = fit_linear_ae(model, images, augment=config.augment, seed=config.seed)
        val = load_batch(split.val, config.input_size)[..., 0]
        val_loss = float(np.mean((val - reconstruct(model, val)) ** 2))
    _atomic_save_model(model, run_dir / "model.keras")
    seconds = time.monotonic() - start
    history = [{"epoch": 1, "loss": summary["loss"], "val_loss": val_loss}]
    _write_history(run_dir, history)
    _atomic_write_text(run_dir / "checkpoints" / "state.json", json.dumps(
        {"epoch": 1, "best_val_loss": val_loss, "best_epoch": 1, "wait": 0, "stopped_early": False,
         "history": history, "seconds": seconds, "fit": summary}, indent=1))
    log.info("linear-ae fitted in %.1f s: %.1f%% of the variance explained, val_loss %.5g",
             seconds, 100 * summary["explained_variance"], val_loss)
    return TrainResult(run_dir=run_dir, epochs_run=1, best_epoch=1, best_val_loss=val_loss, stopped_early=False,
                       seconds=seconds, n_train=len(split.train), n_val=len(split.val), n_skipped=n_skipped)


def _compile_args(model) -> dict:
    return {"loss": "mse"} if _needs_targets(model) else {}


def _write_run_files(run_dir: Path, config: TrainConfig, folder, split) -> None:
    rel = lambda paths: [p.relative_to(folder.root).as_posix() for p in paths]  # noqa: E731
    record = {
        "schema": 1,
        "kind": "edge-inspect-run",
        "train": asdict(config),
        "preprocessing": Preprocessing(*config.input_size).to_dict(),
        "data": {
            "normal_dir": str(folder.root.resolve()),
            "n_files": len(folder.paths) + len(folder.skipped),
            "n_readable": len(folder.paths),
            "n_skipped": len(folder.skipped),
            "n_train": len(split.train),
            "n_val": len(split.val),
        },
        "split": {"seed": split.seed, "val_fraction": split.val_fraction, "rule": split.rule, "groups": split.groups},
        "versions": versions(),
        "devices": devices(),
    }
    _atomic_write_text(run_dir / "config.json", json.dumps(record, indent=2))
    _atomic_write_text(
        run_dir / "split.json",
        json.dumps({"root": str(folder.root.resolve()), "train": rel(split.train), "val": rel(split.val)}, indent=1),
    )
    _atomic_write_text(run_dir / "skipped.txt", "".join(f"{p}\t{reason}\n" for p, reason in folder.skipped))
