"""Training: presets, fit with early stopping, resumable checkpoints.

Training writes the run folder (:class:`export.run_folder.RunFolder` names
its files): the model, ``config.json``, ``split.json``, ``skipped.txt``,
``history.csv``, ``loss.png`` and ``checkpoints/`` for ``--resume``.

    >>> from export.train import TrainConfig, train
    >>> train(TrainConfig(model="conv-ae", normal_dir="parts/ok", out_dir="runs/a"))
"""

from __future__ import annotations

import functools
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
from export.run_folder import RunFolder

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamax", "adam")

#: How the deep models compute while training. ``bfloat16`` is Keras' mixed
#: precision (bfloat16 maths, float32 weights); ``auto`` picks it on a CPU
#: that computes bfloat16 natively, else ``float32``. The saved model is
#: float32 either way.
COMPUTE = ("float32", "bfloat16", "auto")


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
    compute: str = "float32"
    #: Wall-clock minutes after which training stops at an epoch's end, or None.
    time_budget: float | None = None
    latent_dim: int = 2
    #: What the VAEs (vae, dilated-vae) take instead of the fields above: a field name -> value.
    vae: tuple[tuple[str, object], ...] = ()


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
    # The paper's models within 150 minutes on a 2-core CPU, in one go:
    # bfloat16 maths where the CPU has it (an epoch 1.5x faster than float32,
    # docs/training.md), and a budget that ends training in time for calibration.
    # The VAEs get a 32-dimensional latent and 200 epochs: with the paper's 2 their
    # reconstruction is a blurred mean part, and none of their criteria reached
    # the paper's row; with 32 and 200 epochs the VAE's did (docs/results.md).
    "cpu": Preset(size=128, epochs=100, batch_size=32, lr=1e-3, patience=10, linear_size=LINEAR_SIZE,
                  compute="auto", time_budget=140.0,
                  vae=(("latent_dim", 32), ("epochs", 200), ("patience", 20))),
}

#: The model kinds that take a preset's ``vae`` overrides.
VAE_KINDS = ("vae", "dilated-vae")


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
    latent_dim: int | None = None
    components: int = 1024
    augment: str | None = None
    group_split: bool = True
    compute: str | None = None
    time_budget: float | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` filled from the preset, validated.

        Needs no TensorFlow, so the command line checks its flags with it
        before TensorFlow loads (seconds).

        Raises:
            ConfigError: unknown preset, model, augmentation or optimizer, or
                a bad number.
        """
        from edge_inspect.card import MODEL_KINDS
        from export.pca import AUGMENTATIONS

        if self.preset not in PRESETS:
            raise ConfigError(f"Unknown preset '{self.preset}'. Choose one of: {', '.join(PRESETS)}.")
        if self.model not in MODEL_KINDS:
            raise ConfigError(f"Unknown model '{self.model}'. Choose one of: {', '.join(MODEL_KINDS)}.")
        preset = asdict(PRESETS[self.preset])
        linear_size = preset.pop("linear_size")
        vae = dict(preset.pop("vae"))
        if self.model == "linear-ae" and self.size is None and linear_size is not None:
            preset["size"] = linear_size
        if self.model in VAE_KINDS:
            preset.update(vae)
        filled = replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})
        if filled.augment is None:
            filled = replace(filled, augment="d4" if filled.model == "linear-ae" else "none")
        if filled.augment not in AUGMENTATIONS:
            raise ConfigError(f"At 'augment': unknown '{filled.augment}'. Choose one of: {', '.join(AUGMENTATIONS)}.")
        checks = {
            "size": (filled.size >= 16, "16 pixels or more"),
            "epochs": (filled.epochs >= 1, "1 or more"),
            "batch_size": (filled.batch_size >= 1, "1 or more"),
            "lr": (0 < filled.lr < 1, "between 0 and 1, e.g. 0.001"),
            "patience": (filled.patience >= 1, "1 epoch or more"),
            "latent_dim": (filled.latent_dim >= 1, "1 or more"),
            "components": (filled.components >= 1, "1 or more"),
            "val_fraction": (0 < filled.val_fraction < 1, "between 0 and 1, e.g. 0.2"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"At '{key}': {getattr(filled, key)!r} is out of range; expected {expected}.")
        if filled.time_budget is not None and not filled.time_budget > 0:
            raise ConfigError(f"At 'time_budget': {filled.time_budget!r} is out of range; expected minutes above 0, e.g. 140.")
        if filled.compute not in COMPUTE:
            raise ConfigError(f"At 'compute': unknown '{filled.compute}'. Choose one of: {', '.join(COMPUTE)}.")
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
    #: Why training ended before its last epoch: "patience", "budget" or None.
    stopped_by: str | None = None


def _atomic_save_model(model, path: Path) -> None:
    # Keras insists on the .keras suffix, so the temporary name keeps it.
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def versions(*packages: str) -> dict:
    """Versions of the software a run was made with, read from the installed packages.

    Reading package metadata imports nothing: the linear-ae's runs never
    load TensorFlow.
    """
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        for package in (name, f"{name}-cpu", f"{name}_cpu", f"{name}-gpu"):  # TensorFlow's CPU-only wheel
            try:
                return version(package)
            except PackageNotFoundError:
                continue
        return None

    found = {"edge_inspect": __version__, "python": platform.python_version()}
    for name in ("tensorflow", "keras", "numpy", *packages):
        found[name] = installed(name)
    return found


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


def native_bfloat16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX).

    Elsewhere bfloat16 is emulated and slower than float32.
    """
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_compute(compute: str, on_gpu: bool) -> str:
    """``auto``: bfloat16 on a CPU with native bfloat16, float32 on a GPU or elsewhere."""
    if compute != "auto":
        return compute
    return "bfloat16" if not on_gpu and native_bfloat16() else "float32"


def _float32_saver(build):
    """Saves a model as float32, whatever precision it trained in.

    ``build()`` makes an uncompiled float32 model of the same architecture;
    it is built once, under a float32 policy, and takes the weights at each
    save. A model that already computes in float32 is saved as it is.
    """
    import keras

    twin = None

    def save(model, path: Path) -> None:
        nonlocal twin
        if model.dtype_policy.name == "float32":
            _atomic_save_model(model, path)
            return
        if twin is None:
            policy = keras.config.dtype_policy()
            keras.config.set_dtype_policy("float32")
            try:
                twin = build()
            finally:
                keras.config.set_dtype_policy(policy)
        twin.set_weights(model.get_weights())
        _atomic_save_model(twin, path)

    return save


def _checkpoint_callback(run_dir: Path, state: dict, patience: int, *, save_best=None,
                         budget_s: float | None = None, started: float | None = None):
    """Saves last.keras + state.json every epoch and model.keras on improvement.

    The state records the epochs done, the history, the early-stopping
    counter and the training seconds so far. The state file is written
    after the model it describes, each atomically,
    so a kill at any instant leaves a consistent pair to resume from.
    Early stopping lives here too, so its counter survives a resume, and
    so does the time budget: with ``budget_s`` seconds of wall time counted
    from ``started`` (``time.monotonic()``), training stops at the end of
    the epoch after which two more (the next, and a margin for calibration)
    would not fit.
    """
    import keras

    folder = RunFolder(run_dir)
    save_best = save_best or _atomic_save_model

    class Checkpoint(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start, self.seconds_before = time.monotonic(), state.get("seconds", 0.0)
            self.epochs_here = 0

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            state["history"].append({"epoch": epoch + 1, **logs})
            state["seconds"] = self.seconds_before + time.monotonic() - self.start
            val = logs.get("val_loss", logs.get("loss"))
            if val is not None and np.isfinite(val) and val < state["best_val_loss"]:
                state.update(best_val_loss=val, best_epoch=epoch + 1, wait=0)
                save_best(self.model, folder.keras_path)
            else:
                state["wait"] += 1
            state["epoch"] = epoch + 1
            self.epochs_here += 1
            if budget_s is not None:
                now = time.monotonic()
                per_epoch = (now - self.start) / self.epochs_here
                if now - (started or self.start) + 2 * per_epoch > budget_s:
                    state["stopped_budget"] = True
            if state["wait"] >= patience or state.get("stopped_budget"):
                state["stopped_early"] = True
            _atomic_save_model(self.model, folder.last_checkpoint)
            folder.write_state(state)
            folder.write_history(state["history"])
            if state["stopped_early"]:
                if state.get("stopped_budget"):
                    log.warning("Stopped after epoch %d: another would not fit the time budget of %g minutes "
                                "(best validation loss at epoch %d)", epoch + 1, budget_s / 60, state["best_epoch"])
                self.model.stop_training = True

    return Checkpoint()


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


def check_run_dir(run_dir: str | os.PathLike, resume: bool) -> None:
    """Check that a run may start in ``run_dir`` (empty or new), or resume there (a checkpoint).

    Raises:
        ModelCardError: resume asked for, but no checkpoint there.
        ConfigError: a new run asked for in a folder that holds files.
    """
    run_dir = Path(run_dir)
    if resume:
        if not RunFolder(run_dir).has_checkpoint:
            raise ModelCardError(
                f"Cannot resume: '{run_dir}' has no checkpoint (checkpoints/last.keras and state.json). "
                "Start a new run without --resume."
            )
    elif run_dir.is_file():
        raise ConfigError(f"Output folder '{run_dir}' is a file. Choose a new --out folder.")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"Output folder '{run_dir}' already holds files. Continue that run with --resume, "
            "or choose a new --out folder."
        )


def _prepare_run_dir(run_dir: Path, resume: bool) -> dict | None:
    """Check the output folder; on resume, return the saved checkpoint state."""
    check_run_dir(run_dir, resume)
    folder = RunFolder(run_dir)
    if resume:
        return folder.state()
    folder.checkpoints.mkdir(parents=True, exist_ok=True)
    return None


def _resume_config(run_dir: Path, overrides: TrainConfig) -> TrainConfig:
    """The saved configuration; only ``epochs`` and ``time_budget`` may change on resume."""
    saved = RunFolder(run_dir).config()
    names = {f.name for f in fields(TrainConfig)}
    # Runs from before grouped splits held out a plain hashed share: keep it.
    config = TrainConfig(**{"group_split": False, **{k: v for k, v in saved["train"].items() if k in names}})
    if overrides.epochs is not None and overrides.epochs != config.epochs:
        config = replace(config, epochs=overrides.epochs)
    if overrides.time_budget is not None:  # the budget is this process's, not the run's
        config = replace(config, time_budget=overrides.time_budget)
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
    started = time.monotonic()
    run_dir = Path(config.out_dir)
    files = RunFolder(run_dir)
    state = _prepare_run_dir(run_dir, resume)
    if state is not None and state.pop("stopped_budget", False):
        state["stopped_early"] = False  # a new process has a new time budget
    if resume:
        config = _resume_config(run_dir, config)
    config = config.resolved()

    from export.data import scan_folder, split_paths

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
        saved_split = files.split()
        if [p.relative_to(folder.root).as_posix() for p in split.train] != saved_split["train"]:
            log.warning("The image folder changed since the run started; the new split is used.")

    _write_run_files(run_dir, config, folder, split)
    if config.model == "linear-ae":
        return _fit_linear(config, run_dir, split, len(folder.skipped), progress)

    import keras  # not before: the linear-ae's fit runs without TensorFlow

    from export.data import make_dataset
    from export.models import build_model

    keras.utils.set_random_seed(config.seed)
    compute = resolve_compute(config.compute, on_gpu=devices() != ["CPU"])
    keras.config.set_dtype_policy("mixed_bfloat16" if compute == "bfloat16" else "float32")
    train_ds = make_dataset(split.train, size, batch_size=config.batch_size, shuffle=True, seed=config.seed,
                            augment=config.augment)
    val_ds = make_dataset(split.val, size, batch_size=config.batch_size, shuffle=False, seed=config.seed)

    with _strategy().scope():
        if state is not None:
            model = keras.models.load_model(files.last_checkpoint)
            initial_epoch = state["epoch"]
            log.info("Resuming %s from epoch %d", run_dir, initial_epoch)
        else:
            model = build_model(config.model, size, latent_dim=config.latent_dim, seed=config.seed)
            # Every model has its own train_step (the loss on x alone): no targets, no compiled loss.
            model.compile(optimizer=_make_optimizer(config.optimizer, config.lr))
            initial_epoch = 0
            state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": 0, "wait": 0, "stopped_early": False, "history": []}

    state["compute"] = compute
    steps = -(-len(split.train) // config.batch_size)
    float32_model = functools.partial(build_model, config.model, size, latent_dim=config.latent_dim, seed=config.seed)
    budget_s = config.time_budget * 60 if config.time_budget else None
    callbacks = [_checkpoint_callback(run_dir, state, config.patience, save_best=_float32_saver(float32_model),
                                      budget_s=budget_s, started=started)]
    callbacks.append(_progress_callback(config.epochs, steps, initial_epoch) if progress else _log_callback(config.epochs))
    log.info("Training %s on %s in %s (%d train, %d validation images) with the %s preset%s", config.model,
             ", ".join(devices()), compute, len(split.train), len(split.val), config.preset,
             f", within {config.time_budget:g} minutes" if budget_s else "")
    try:
        if initial_epoch < config.epochs and not state["stopped_early"]:
            model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                      callbacks=callbacks, verbose=0, shuffle=False)
    finally:
        keras.config.set_dtype_policy("float32")
    seconds = state.get("seconds", 0.0)
    if state["history"]:
        from export import plots

        plots.loss(state["history"], files.loss_plot_path, f"{config.model}, {config.size} px, {len(split.train)} images")
    return TrainResult(
        run_dir=run_dir,
        epochs_run=state["epoch"],
        best_epoch=state["best_epoch"],
        best_val_loss=state["best_val_loss"],
        stopped_early=state["stopped_early"],
        seconds=seconds,
        stopped_by="budget" if state.get("stopped_budget") else "patience" if state["stopped_early"] else None,
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
    """Fit the linear AE in closed form and write it as the run's ``model.npz``.

    The images are decoded once into a float16 file in the run folder and
    streamed through the fit (:mod:`export.pca`), so memory stays flat in
    their number; the file is removed afterwards. One "epoch": the history
    row holds the training and validation MSE.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from export.pca import ImageCache, fit_pca

    start = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    run = RunFolder(run_dir)
    cache_path = run.fit_images_path
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("Loading training images", total=len(split.train))
        try:
            images = ImageCache.build(cache_path, split.train, config.input_size, config.augment,
                                      on_image=lambda: bar.advance(task))
            views = 8 * images.count if config.augment == "d4" else images.count
            log.info("Fitting linear-ae: %d components, %d training images, augment %s",
                     config.components, images.count, config.augment)
            step = bar.add_task(f"Fitting {config.components} components to {views} images", total=None)
            pca = fit_pca(images, config.components, seed=config.seed,
                          on_pass=lambda what: bar.update(step, description=f"Fitting {config.components} components "
                                                                           f"to {views} images: {what}"))
            train_loss = _mse(pca, images.images(), config.input_size)
        finally:
            cache_path.unlink(missing_ok=True)
        val_loss = _mse(pca, _val_chunks(split.val, config.input_size), config.input_size)
    pca.save(run.npz_path)
    seconds = time.monotonic() - start
    history = [{"epoch": 1, "loss": train_loss, "val_loss": val_loss}]
    run.write_history(history)
    summary = {"images": len(split.train), "fitted_on": views, "components": pca.components,
               "components_per_block": {b.name: len(w) for b, w in zip(pca.basis.blocks, pca.bases)},
               "weights": pca.weight_count, "explained_variance": pca.explained_variance, "loss": train_loss}
    run.write_state({"epoch": 1, "best_val_loss": val_loss, "best_epoch": 1, "wait": 0, "stopped_early": False,
                     "history": history, "seconds": seconds, "fit": summary})
    log.info("linear-ae fitted in %.1f s: %.1f%% of the variance explained, val_loss %.5g",
             seconds, 100 * pca.explained_variance, val_loss)
    return TrainResult(run_dir=run_dir, epochs_run=1, best_epoch=1, best_val_loss=val_loss, stopped_early=False,
                       seconds=seconds, n_train=len(split.train), n_val=len(split.val), n_skipped=n_skipped)


def _val_chunks(paths: list[Path], size: tuple[int, int], chunk: int = 128):
    from export.data import load_batch

    for start in range(0, len(paths), chunk):
        yield load_batch(paths[start : start + chunk], size)[..., 0].reshape(-1, size[0] * size[1])


def _mse(pca, chunks, size: tuple[int, int]) -> float:
    """Mean squared reconstruction error over ``(m, P)`` chunks."""
    total, count = 0.0, 0
    for flat in chunks:
        images = flat.reshape(-1, *size)
        total += float(np.sum((images - pca.reconstruct(images)) ** 2, dtype=np.float64))
        count += images.size
    return total / max(count, 1)


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
        "devices": ["CPU"] if config.model == "linear-ae" else devices(),  # the linear fit runs in NumPy
    }
    run = RunFolder(run_dir)
    run.write_config(record)
    run.write_split(folder.root.resolve(), rel(split.train), rel(split.val))
    run.write_skipped(folder.skipped)
