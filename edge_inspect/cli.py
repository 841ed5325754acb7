"""The ``edge-inspect`` command line: a thin typer layer over library functions.

Training commands import the training side (``export``) only when they run,
so the lean install answers every runtime command without TensorFlow, and a
training command without the ``train`` extra says which extra to install.

    $ edge-inspect train --model conv-ae --normal parts/ok --out runs/a
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from edge_inspect import numbers
from edge_inspect.errors import EdgeInspectError, MissingExtraError

app = typer.Typer(
    name="edge-inspect",
    help="Autoencoder-based visual inspection: train on good parts, inspect on the line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


def handle_errors(command):
    """Print ``Error: ...`` on stderr and exit 1 for errors the user can fix."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EdgeInspectError as exc:
            if _state["debug"]:
                err_console.print_exception()
            # escape: messages quote things like edge-inspect[train] that rich would read as markup
            err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper


def _warn(text: str | None) -> None:
    """Print ``Warning: ...`` on stderr, when there is something to say; the exit code is unchanged."""
    if text:
        err_console.print(f"[bold yellow]Warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


_TRAINING_MODULES = ("export", "tensorflow", "keras", "tf2onnx", "onnx", "sklearn", "matplotlib")


def _require_training_side():
    """Check that the training side is installed, or say which extra brings it; quiet TensorFlow unless --debug.

    Only looks the modules up: the runtime's CLI imports none of them itself.
    Every training command calls it first, then checks its arguments
    (``export.preflight``) before anything loads TensorFlow.
    """
    import importlib.util

    for name in _TRAINING_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtraError(
                f"This command needs the training extra ({name} is not installed). "
                "Install it with: pip install 'edge-inspect[train]'"
            )
    from export.preflight import quiet_tensorflow

    quiet_tensorflow(debug=_state["debug"])


def _show_version(value: bool) -> None:
    """``--version``: what this install runs on, then exit. Imports the runtime only, never TensorFlow."""
    if value:
        from edge_inspect.about import about, lines

        for line in lines(about()):
            typer.echo(line)
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks, debug logs and TensorFlow's own log lines (training commands).")] = False,
    version: Annotated[bool, typer.Option("--version", help="Show the versions of edge-inspect, ONNX Runtime (and its providers), Numba (and its threads) and Python, and exit.", is_eager=True, callback=_show_version)] = False,
) -> None:
    if ctx.invoked_subcommand not in ("watch", "serve"):
        from edge_inspect import signals

        signals.release()  # caught early for watch and serve only; every other command keeps the default actions
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[_log_handler(debug)], force=True)


def _log_handler(debug: bool) -> logging.Handler:
    """Rich's columns on a terminal; plain lines to journald, a pipe or a file.

    A Rich log line costs about 1.4 ms of CPU (layout and highlighting), a
    plain one about 20 us. ``watch`` logs a line per verdict: as a service,
    Rich would cost a burst more CPU than the pipeline's own work around
    inference (docs/benchmarks.md#watch).
    """
    if err_console.is_terminal:
        handler: logging.Handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=debug)
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler


class _StderrHandler(logging.StreamHandler):
    """Plain lines to whatever ``sys.stderr`` is when a record is written, not when the handler was made.

    A library thread (an OPC UA client's cleanup) may log after the command
    returned and its caller swapped stderr back (a test runner's capture):
    the stream it was made with is closed by then.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass  # always sys.stderr


class ModelKind(str, Enum):
    linear_ae = "linear-ae"
    conv_ae = "conv-ae"
    vae = "vae"
    dilated_vae = "dilated-vae"


class Augment(str, Enum):
    d4 = "d4"
    none = "none"


class PresetName(str, Enum):
    fast = "fast"
    cpu = "cpu"
    paper = "paper"


class Compute(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    auto = "auto"


@app.command()
@handle_errors
def train(
    normal: Annotated[Path, typer.Option(help="Folder of normal (good) part images, read recursively.")],
    out: Annotated[Path, typer.Option(help="Run folder to create (or to continue with --resume).")],
    model: Annotated[ModelKind, typer.Option(help="Which model to train; linear-ae fits in a minute or two on a CPU.")] = ModelKind.linear_ae,
    preset: Annotated[PresetName, typer.Option(help="fast: CPU-friendly defaults; cpu: the paper's models within 150 minutes on a 2-core CPU (bfloat16 where it helps, a time budget); paper: the paper's configuration.")] = PresetName.fast,
    size: Annotated[Optional[int], typer.Option(help="Input size in pixels (square). Default: from the preset.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs. Default: from the preset.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size. Default: from the preset.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. Default: from the preset.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience in epochs. Default: from the preset.")] = None,
    compute: Annotated[Optional[Compute], typer.Option(help="Deep models' arithmetic while training: bfloat16 (mixed precision) makes an epoch about 1.5x faster on a CPU that has it; auto picks it there. The saved model is float32. Default: from the preset (cpu: auto, else float32).")] = None,
    time_budget: Annotated[Optional[float], typer.Option(help="Minutes of wall time: training stops at the end of the last epoch that leaves room for calibration, keeping the best model. Default: from the preset (cpu: 140).")] = None,
    latent_dim: Annotated[Optional[int], typer.Option(help="Latent dimension of the VAEs. Default: from the preset (the paper's 2; cpu: 32).")] = None,
    components: Annotated[int, typer.Option(help="Principal components of the linear-ae.")] = 1024,
    augment: Annotated[Optional[Augment], typer.Option(help="d4: the 8 quarter-turned and mirrored views of each image; linear-ae fits them all (its default), the deep models see one drawn anew each epoch (default for them: none).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of normal images held out for validation and calibration.")] = 0.2,
    group_split: Annotated[bool, typer.Option(help="Hold out whole groups of near-duplicate images (rotated or flipped copies of one part), so calibration sees unseen parts.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the split, the shuffling and the initial weights.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
) -> None:
    """Train a model on normal images only and write a run folder.

    The default, linear-ae, is fitted in closed form in a minute or two on a
    CPU; the paper's deep models train epoch by epoch (hours on a CPU).

    Example:

        edge-inspect train --normal parts/ok --out runs/linear-ae
        edge-inspect train --model conv-ae --normal parts/ok --out runs/conv-ae
    """
    _require_training_side()
    from export import preflight
    from export.train import TrainConfig
    from export.train import train as run_training

    config = TrainConfig(
        model=model.value,
        normal_dir=str(normal),
        out_dir=str(out),
        preset=preset.value,
        size=size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        seed=seed,
        val_fraction=val_fraction,
        latent_dim=latent_dim,
        components=components,
        augment=augment.value if augment else None,
        group_split=group_split,
        compute=compute.value if compute else None,
        time_budget=time_budget,
    )
    preflight.check_train(config, resume)
    try:
        result = run_training(config, resume=resume, progress=console.is_terminal)
    except KeyboardInterrupt:
        err_console.print(
            f"Interrupted. The last finished epoch is saved in {out}/checkpoints; "
            f"continue with: edge-inspect train --model {model.value} --normal {normal} --out {out} --resume"
        )
        raise typer.Exit(130) from None

    from export.scoring import calibrate_run

    bar, on_start, on_batch = _scoring_progress("Calibrating on held-out normals")
    try:
        with bar:
            cal = calibrate_run(out, on_start=on_start, on_batch=on_batch)
    except EdgeInspectError as exc:
        raise type(exc)(f"The model is trained and saved in {out}, but calibration failed: {exc}") from exc

    table = Table(title=f"Trained {model.value}", show_header=False)
    table.add_row("images", f"{result.n_train} training, {result.n_val} validation")
    table.add_row("skipped files", f"{result.n_skipped}" + (" (listed in skipped.txt)" if result.n_skipped else ""))
    if model is ModelKind.linear_ae:
        table.add_row("fit", f"{components} components, closed form; validation loss {numbers.score(result.best_val_loss)}")
        table.add_row("loss curve", "none: the linear model is fitted in closed form, in one step, so it has no "
                                    "epochs (and no loss.png)")
    else:
        why = {"budget": " (stopped by the time budget)", "patience": " (stopped early)"}.get(result.stopped_by, "")
        table.add_row("epochs", f"{result.epochs_run}{why}")
        table.add_row("best validation loss", f"{numbers.score(result.best_val_loss)} at epoch {result.best_epoch}")
    table.add_row("wall time", f"{result.seconds:.1f} s")
    entry = cal["criteria"][cal["default_criterion"]]
    table.add_row("threshold", f"{numbers.score(entry['threshold'])} ({cal['mode']}, rule {cal['rule']}), criterion "
                  f"{cal['default_criterion']}: {numbers.meaning(cal['default_criterion'], entry['polarity'], entry['center'])}"
                  "; ng when score > threshold")
    console.print(table)
    console.print(f"Run folder: {escape(str(result.run_dir))}", highlight=False, soft_wrap=True)
    console.print(f"Recalibrate with: edge-inspect calibrate {escape(shlex.quote(str(out)))}", highlight=False,
                  soft_wrap=True)


class Rule(str, Enum):
    quantile = "quantile"
    mad = "mad"


def _scoring_progress(description: str):
    """A progress bar over images; returns (progress, on_start, on_batch)."""
    from rich.progress import Progress

    bar = Progress(console=err_console, transient=True, disable=not err_console.is_terminal)
    task = bar.add_task(description, total=None)
    return bar, (lambda total: bar.update(task, total=total)), (lambda n: bar.advance(task, n))


@app.command()
@handle_errors
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
    rule: Annotated[Rule, typer.Option(help="quantile: a target false-alarm rate; mad: median + k robust deviations.")] = Rule.quantile,
    false_alarm_rate: Annotated[float, typer.Option(help="Share of normal parts allowed over the threshold (rule quantile).")] = 0.05,
    k: Annotated[float, typer.Option(help="Robust deviations above the median (rule mad).")] = 3.0,
    anomalous: Annotated[Optional[Path], typer.Option(help="A few labelled defective images: few-shot mode picks polarity and criterion.")] = None,
    criterion: Annotated[Optional[str], typer.Option(help="Default criterion (label-free default: range).")] = None,
) -> None:
    """Set a threshold for every criterion from the run's held-out normal images.

    Without --anomalous no defect label is used (label-free mode).

    Example:

        edge-inspect calibrate runs/conv-ae --false-alarm-rate 0.02
    """
    _require_training_side()
    from export import preflight
    from export.scoring import calibrate_run

    preflight.check_calibrate(run_dir, rule=rule.value, false_alarm_rate=false_alarm_rate, k=k, criterion=criterion,
                              anomalous=anomalous)
    bar, on_start, on_batch = _scoring_progress("Scoring held-out normals")
    with bar:
        cal = calibrate_run(run_dir, rule=rule.value, false_alarm_rate=false_alarm_rate, k=k,
                            anomalous_dir=anomalous, criterion=criterion, on_start=on_start, on_batch=on_batch)
    _print_calibration(cal, run_dir, asked=criterion is not None)
    from export.to_onnx import reexport_hint

    console.print(reexport_hint(run_dir), highlight=False, soft_wrap=True)


def _print_calibration(cal: dict, run_dir: Path, asked: bool = False) -> None:
    from edge_inspect.calibrate import default_choice, weak_auc_warning

    few_shot = cal["mode"] == "few-shot"
    counted = f"{cal['n_normal']} normal, {cal['n_anomalous']} defective images" if few_shot else f"{cal['n_normal']} normal images"
    table = Table(title=f"Calibration ({cal['mode']}, rule {cal['rule']}, {counted})")
    columns = ("criterion", "polarity", "threshold", "median", "p99") + (("AUC-ROC",) if few_shot else ())
    for column in columns:
        table.add_column(column, justify="left" if column in ("criterion", "polarity") else "right")
    for name, entry in cal["criteria"].items():
        q = entry["quantiles"]
        mark = " *" if name == cal["default_criterion"] else ""
        table.add_row(name + mark, entry["polarity"], numbers.score(entry["threshold"]), numbers.score(q.get("0.5")),
                      numbers.score(q.get("0.99")), *((numbers.metric(entry["auc"]),) if few_shot else ()))
    console.print(table)
    console.print("* the default criterion. threshold: on the decision score, ng when over it: the criterion's value "
                  "(polarity high), minus it (low), or its distance from the normal median (two-sided). median, p99: "
                  "the criterion's values on the normal images.", highlight=False, soft_wrap=True)
    if few_shot:
        console.print(default_choice(cal, asked), highlight=False, soft_wrap=True)
        _warn(weak_auc_warning(cal["criteria"][cal["default_criterion"]]["auc"], cal["default_criterion"], counted))
    console.print(f"Wrote {run_dir / 'calibration.json'}", soft_wrap=True)


@app.command()
@handle_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A trained and calibrated run folder.")],
    normal: Annotated[Path, typer.Option(help="Folder of normal images the model has not trained on.")],
    anomalous: Annotated[Path, typer.Option(help="Folder of defective images.")],
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default: RUN_DIR/eval).")] = None,
) -> None:
    """Measure every criterion on labelled images and write a report with plots.

    Example:

        edge-inspect evaluate runs/conv-ae --normal data/test/ok --anomalous data/test/def
    """
    _require_training_side()
    from export import preflight
    from export.evaluate import METRIC_COLUMNS
    from export.evaluate import evaluate as run_evaluation

    preflight.check_evaluate(run_dir, normal, anomalous, out)

    bar, on_start, on_batch = _scoring_progress("Scoring images")
    with bar:
        result = run_evaluation(run_dir, normal, anomalous, out_dir=out, on_start=on_start, on_batch=on_batch)
    table = Table(title=f"{result.n_normal} normal, {result.n_anomalous} defective; chance AUC-PR {numbers.metric(result.prevalence)}; "
                        f"thresholds {result.calibration_mode}")
    headers = {"auc_roc": "AUC-ROC", "auc_pr": "AUC-PR", "f1": "F1", "accuracy": "acc", "false_alarm_rate": "FAR",
               "recall": "recall", "f1_oracle": "F1*", "accuracy_oracle": "acc*"}
    table.add_column("criterion", no_wrap=True)
    shown = [c for c in METRIC_COLUMNS if c != "recall"]  # in the report; the terminal keeps 80 columns
    for column in shown:
        table.add_column(headers[column], justify="right", no_wrap=True)
    for name, row in result.metrics.items():
        style = "bold" if name == result.default_criterion else None
        table.add_row(name, *(numbers.metric(row[c]) for c in shown), style=style)
    console.print(table)
    console.print("FAR: false-alarm rate at the calibrated threshold. * oracle: best threshold on this set, chosen with its labels.")
    console.print(f"Report: {escape(str(result.report.resolve()))} (open it in a browser; report.md and the plots "
                  "are beside it)", highlight=False, soft_wrap=True)
    _warn(result.warning)


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command(name="export")
@handle_errors
def export_model(
    run_dir: Annotated[Path, typer.Argument(help="A trained and calibrated run folder.")],
    out: Annotated[Path, typer.Option(help="Model folder to write (model.onnx, model.json, ...).")],
    precision: Annotated[Optional[list[Precision]], typer.Option(help="Also write this precision (repeatable); fp32 is always written.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (13 to 18).")] = 17,
    force: Annotated[bool, typer.Option("--force", help="Write fp16/int8 even if its verdicts agree with fp32 on fewer than 99.5% of images.")] = False,
    anomalous: Annotated[Optional[Path], typer.Option(help="Defective images, to report the AUC-ROC of fp32 and the AUC change of fp16/int8.")] = None,
    default_precision: Annotated[Optional[Precision], typer.Option(help="The precision predict, watch and serve load unless told otherwise; one of those written. Default: fp32.")] = None,
) -> None:
    """Export a run to a model folder the lean runtime loads: ONNX graphs and the model card.

    Checks fp32 against Keras on the run's held-out images, and fp16/int8
    against fp32. The folder is written whole or not at all; an earlier
    export in it is kept beside it as a dated backup (NAME.YYYY-mm-ddTHHMMSS).

    Example:

        edge-inspect export runs/conv-ae --out models/conv-ae --precision int8 --default-precision int8
    """
    _require_training_side()
    from export import preflight
    from export.to_onnx import export_run

    preflight.check_export(run_dir, precisions=[p.value for p in precision or []], opset=opset,
                           default_precision=default_precision.value if default_precision else None, anomalous=anomalous)
    report = export_run(run_dir, out, precisions=[p.value for p in precision or []], opset=opset, force=force,
                        anomalous_dir=anomalous, default_precision=default_precision.value if default_precision else None)
    console.print(f"Exported {report.card['model']['kind']} to {escape(str(report.out_dir))} in {report.seconds:.1f} s:",
                  highlight=False, soft_wrap=True)
    table = Table()
    for column in ("precision", "file", "MB", "checked\nagainst", "max\n|diff|", "verdicts\nagree", "AUC\nchange"):
        # figures and file names never wrap (nor shrink to an ellipsis); the words of the other two do
        table.add_column(column, justify="left" if column in ("precision", "file", "checked\nagainst") else "right",
                         no_wrap=column not in ("checked\nagainst", "verdicts\nagree"))
    for name, entry in report.files.items():
        parity = entry["parity"]
        agree = "all" if name == "fp32" else f"{parity['verdict_agreement']:.1%}" + (" (forced)" if parity["forced"] else "")
        auc = parity.get("auc")
        table.add_row(name + (" *" if name == report.card["default_precision"] else ""), entry["file"],
                      f"{entry['bytes'] / 1e6:.2f}", f"{parity['reference']}, {parity['images']} images",
                      f"{parity['max_abs_diff']:.2g}", agree,
                      numbers.metric_change(auc["change"]) if isinstance(auc, dict) else numbers.MISSING)
    console.print(table)
    default = report.card["default_precision"]
    others = [p for p in report.files if p != default]
    console.print(f"* Default precision: {default} (what predict, watch and serve load without --precision)"
                  + (f"; make {' or '.join(others)} the default with --default-precision." if others else "."),
                  highlight=False, soft_wrap=True)
    if report.auc is not None:
        console.print(f"AUC-ROC of fp32, criterion {report.auc['criterion']}: {numbers.metric(report.auc['fp32'])} on "
                      f"{report.auc['normal']} held-out normal, {report.auc['anomalous']} defective images.",
                      highlight=False, soft_wrap=True)
    if report.backup is not None:
        console.print(f"Kept the previous model folder as {report.backup}; remove it when no longer needed: "
                      f"rm -r {shlex.quote(str(report.backup))}", highlight=False, soft_wrap=True)
    _warn(report.warning)


@app.command()
@handle_errors
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (read recursively).")],
    model: Annotated[Path, typer.Option(help="Model folder written by edge-inspect export.")],
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per image instead of a table.")] = False,
    heatmaps: Annotated[Optional[Path], typer.Option(help="Write an anomaly-map overlay (PNG) of each NG part to this folder.")] = None,
    heatmaps_all: Annotated[bool, typer.Option("--heatmaps-all", help="Overlays of OK parts too (with --heatmaps).")] = False,
    criterion: Annotated[Optional[str], typer.Option(help="Decide with this criterion instead of the card's default.")] = None,
    precision: Annotated[Optional[Precision], typer.Option(help="Which graph of the folder to run (default: the card's).")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA if it loads, else CPU; cuda: fail unless CUDA runs.")] = Device.auto,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per session run (default: the model's: 32 for linear-ae, 8 for the deep models).")] = None,
) -> None:
    """Inspect images: a verdict (ok, ng or error) per image.

    A file that cannot be read gets an error verdict with the reason; the
    others are still inspected. Exit code 0 when every image was inspected,
    1 when any got an error verdict.

    Example:

        edge-inspect predict --model models/conv-ae parts/today/ --json
    """
    import json

    from edge_inspect.errors import ConfigError
    from edge_inspect.inspector import Inspector, write_heatmap
    from edge_inspect.sources.files import inspect_files

    if heatmaps_all and heatmaps is None:
        raise ConfigError("--heatmaps-all writes overlays of OK parts too, but no folder was given: add --heatmaps FOLDER.")
    inspector = Inspector.load(model, precision=precision.value if precision else None, device=device.value,
                               criterion=criterion, batch_size=batch_size, anomaly_map=heatmaps is not None)
    about = {"model": os.path.abspath(model), "model_sha256": inspector.card.data["files"][inspector.precision]["sha256"],
             "precision": inspector.precision}
    counts = {"ok": 0, "ng": 0, "error": 0}
    written: set[Path] = set()
    shown: list = []
    for result, image in inspect_files(inspector, paths, keep_images=heatmaps is not None):
        counts[result.verdict] += 1
        record = {**result.to_dict(), **about, "inspected_at": numbers.timestamp(time.time())}
        if heatmaps is not None and result.anomaly_map is not None and (result.verdict == "ng" or heatmaps_all):
            target = heatmaps / f"{Path(result.source).stem}.png"
            k = 2
            while target in written:
                target, k = heatmaps / f"{Path(result.source).stem}-{k}.png", k + 1
            written.add(write_heatmap(target, image, result.anomaly_map, score=result.score,
                                      threshold=result.threshold, verdict=result.verdict, criterion=result.criterion))
            record["heatmap"] = os.path.abspath(target)
        if json_lines:
            typer.echo(json.dumps(record))
        else:
            shown.append(result)
    if not json_lines:
        _print_predictions(shown, inspector, about["model"])
    err_console.print(f"{counts['ok']} ok, {counts['ng']} ng, {counts['error']} error", highlight=False)
    if counts["error"]:
        raise typer.Exit(1)


def _print_predictions(results: list, inspector, model: str) -> None:
    """The table of ``predict``: whole paths and figures within the console's width, and what the score means."""
    entry = inspector.entry
    console.print(f"Model {escape(model)} ({inspector.precision} on {inspector.device}), criterion "
                  f"{inspector.criterion}: {numbers.meaning(inspector.criterion, entry['polarity'], entry.get('center'))}"
                  "; ng when score > threshold.", highlight=False, soft_wrap=True)
    raw = entry["polarity"] != "high"  # the criterion's own value is not the score: show both
    cells = []
    for r in results:
        score, threshold = numbers.score_pair(r.score, r.threshold)
        value = [numbers.score(r.criteria.get(r.criterion))] if raw else []
        cells.append([r.verdict, score, *value, threshold, f"{r.latency_ms:.1f}"])
    headers = ["verdict", "score", *([inspector.criterion] if raw else []), "threshold", "ms"]
    folder, names = _relative_names([r.source for r in results])
    listed = max(map(len, names), default=0) > max(_room([max([len(h), *(len(c[i]) for c in cells)])
                                                          for i, h in enumerate(headers)]), 5)
    notes = [f"#{i} {n}" for i, n in enumerate(names, 1)] if listed else []
    if listed:  # a name would not fit whole: number the rows, and list the names after the table
        names = [f"#{i}" for i in range(1, len(names) + 1)]
    console.print(f"Images in {escape(folder)}:", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("image", overflow="fold")
    for header in headers:
        table.add_column(escape(header), justify="left" if header == "verdict" else "right", no_wrap=True)
    style = {"ok": "green", "ng": "bold red", "error": "yellow"}
    for name, row in zip(names, cells):
        table.add_row(escape(name), f"[{style[row[0]]}]{row[0]}[/]", *row[1:])
    console.print(table)
    for note in notes:
        console.print(escape(note), highlight=False, soft_wrap=True)
    for r in results:
        if r.verdict == "error":
            reason = (r.error or "").removeprefix(f"{r.source}: ")
            console.print(f"[yellow]error[/] {escape(r.source)}: {escape(reason)}", highlight=False, soft_wrap=True)


def _relative_names(paths: list[str]) -> tuple[str, list[str]]:
    """``(folder, names)``: the paths' common folder, and each path relative to it."""
    if not paths:
        return os.getcwd(), []
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return folder, [os.path.relpath(os.path.abspath(p), folder) for p in paths]


def _room(widths: list[int]) -> int:
    """Characters left for one more column of a rich table beside columns of these widths."""
    return console.width - sum(widths) - 3 * (len(widths) + 1) - 1


@app.command(name="benchmark")
@handle_errors
def benchmark_model(
    model: Annotated[Path, typer.Option(help="Model folder written by edge-inspect export.")],
    data: Annotated[Optional[Path], typer.Option(help="Images to time; with ok/ and ng/ (or def/) subfolders, AUC-ROC too.")] = None,
    device: Annotated[Device, typer.Option(help="auto, cpu or cuda.")] = Device.auto,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per session run in the batched measurement (default: the model's, as predict).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads of the session (default: all available).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many images per label.")] = None,
) -> None:
    """Measure latency, throughput, peak memory and AUC-ROC of each precision in a model folder.

    Each precision runs in a fresh process, so its peak memory is its own.

    Example:

        edge-inspect benchmark --model models/conv-ae --data data/test
    """
    from edge_inspect.benchmark import benchmark as run_benchmark

    report = run_benchmark(model, data=data, device=device.value, batch_size=batch_size, threads=threads, limit=limit)
    device_name = report.rows[0].device if report.rows else device.value
    console.print(f"Model {escape(str(report.model_dir))} on {device_name}, {report.threads} threads: "
                  f"{escape(str(report.data))}", highlight=False, soft_wrap=True)
    table = Table()
    batched = report.rows[0].batch_size if report.rows else batch_size  # the model's unless --batch-size
    columns = ("precision", "1 image ms\np50/p95", f"batch {batched}\nms/img\np50/p95", "images/s",
               "speed", "peak MiB\n(model)", "AUC-ROC")
    for column in columns:
        table.add_column(column, justify="left" if column == "precision" else "right",
                         no_wrap=True)  # figures never shrink to an ellipsis; the peak and its (model) are two lines
    base = report.rows[0].images_per_s if report.rows else 1.0
    for row in report.rows:
        table.add_row(row.precision, f"{row.single_p50_ms:.2f}/{row.single_p95_ms:.2f}",
                      f"{row.batch_p50_ms:.2f}/{row.batch_p95_ms:.2f}", f"{row.images_per_s:.1f}",
                      f"{row.images_per_s / base:.2f}x", f"{row.peak_rss_mib:.0f}\n(+{row.model_rss_mib:.0f})",
                      numbers.metric(row.auc_roc))
    console.print(table)
    if report.rows:
        console.print(f"AUC of criterion {report.rows[0].criterion} on {report.rows[0].images} images" if report.labelled
                      else "No labelled data (--data DIR with ok/ and ng/ subfolders): no AUC.")
    _warn(report.warning)


@app.command()
@handle_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's images, run, model and line.")] = Path("demo"),
    count: Annotated[int, typer.Option(help="Normal synthetic parts to generate (50 or more).")] = 300,
    size: Annotated[int, typer.Option(help="Image and model size in pixels (16 or more).")] = 64,
    model: Annotated[ModelKind, typer.Option(help="Which model to train.")] = ModelKind.linear_ae,
    components: Annotated[int, typer.Option(help="Principal components of the linear-ae.")] = 256,
    epochs: Annotated[int, typer.Option(help="Training epochs of a deep model.")] = 8,
    rate: Annotated[float, typer.Option(help="Parts per second dropped into the line's hot folder.")] = 10.0,
    line: Annotated[bool, typer.Option("--line/--no-line", help="After export, run the line: watch a hot folder fed the test parts like a camera.")] = True,
) -> None:
    """Run the main job end to end on synthetic parts: generate, train, calibrate, evaluate, export, watch.

    The last step starts edge-inspect watch on a hot folder in the demo
    folder, drops the test parts into it at --rate parts per second, shows
    each verdict as it is committed, and stops the watcher as a service
    manager would (SIGTERM: the parts in hand are finished, exit 0).

    Example:

        edge-inspect demo --out demo
    """
    _require_training_side()
    if out.exists() and any(out.iterdir()):
        raise EdgeInspectError(f"Demo folder '{out}' already holds files. Remove it or pass another --out.")
    checks = {"--count": (count, count >= DEMO_MIN_COUNT, f"{DEMO_MIN_COUNT} or more, so that calibration holds "
                                                          "out 10 normal parts"),
              "--size": (size, size >= 16, "16 pixels or more"), "--components": (components, components >= 1, "1 or more"),
              "--epochs": (epochs, epochs >= 1, "1 or more"),
              "--rate": (rate, 0 < rate <= 1000, "more than 0 and at most 1000 parts per second, e.g. 10")}
    for flag, (value, ok, expected) in checks.items():
        if not ok:
            raise EdgeInspectError(f"{flag}: {value!r} is out of range; expected {expected}.")
    from edge_inspect.synthetic import write_parts

    parts = out / "parts"
    write_parts(parts / "ok", count, size=size, seed=0)
    write_parts(parts / "test" / "ok", max(count // 5, 10), size=size, seed=1)
    write_parts(parts / "test" / "ng", max(count // 5, 10), size=size, seed=2, defective=True)
    console.print(f"Wrote synthetic parts under {parts}: ok/ to train on, test/ok and test/ng to evaluate.")
    run = out / "runs" / model.value
    train(
        model=model, normal=parts / "ok", out=run, preset=PresetName.fast,
        size=size, epochs=epochs, batch_size=32, lr=None, patience=None, latent_dim=None,
        val_fraction=0.2, seed=0, resume=False, components=components,
    )
    evaluate(run_dir=run, normal=parts / "test" / "ok", anomalous=parts / "test" / "ng", out=None)
    model_dir = out / "models" / model.value
    export_model(run_dir=run, out=model_dir, precision=None, opset=17, force=False, anomalous=None)

    tests = {"ok": parts / "test" / "ok", "ng": parts / "test" / "ng"}
    if line:
        _demo_line(model_dir, tests, out / "line", rate)
    else:
        from edge_inspect.inspector import Inspector
        from edge_inspect.sources.files import inspect_files

        inspector = Inspector.load(model_dir)
        counts = {label: {"ok": 0, "ng": 0, "error": 0} for label in tests}
        for label, folder in tests.items():
            for result, _ in inspect_files(inspector, [folder]):
                counts[label][result.verdict] += 1
        console.print(_demo_counts(f"The lean runtime on the test parts ({inspector.precision}, {inspector.device}, "
                                   f"{inspector.criterion})", counts))
    console.print(f"Inspect your own images with: edge-inspect predict --model {escape(str(model_dir))} PATH...",
                  highlight=False, soft_wrap=True)
    from export.run_folder import RunFolder

    report = (RunFolder(run).eval_dir / "report.html").resolve()
    console.print(f"Report: {escape(str(report))} (open it in a browser)", highlight=False, soft_wrap=True)


#: The demo's least --count: a fifth is held out, and calibration needs 10 normal parts.
DEMO_MIN_COUNT = 50
_VERDICT_STYLE = {"ok": "green", "ng": "bold red", "error": "yellow"}


def _demo_counts(title: str, counts: dict[str, dict[str, int]]) -> Table:
    """Verdicts per true label: a row per label, a column per verdict."""
    table = Table(title=title)
    table.add_column("true label")
    for verdict in ("ok", "ng", "error"):
        table.add_column(verdict, justify="right")
    for label, row in counts.items():
        table.add_row(f"{label} parts", *(str(row[v]) for v in ("ok", "ng", "error")))
    return table


def _demo_line(model_dir: Path, tests: dict[str, Path], folder: Path, rate: float) -> None:
    """Run the demo's line (edge_inspect.demo) and show each verdict as it commits: a live table on a terminal."""
    from edge_inspect.card import load_card
    from edge_inspect.demo import Line, plan

    drops = plan(tests)
    the_line = Line(model_dir, folder, drops, rate)
    card = load_card(model_dir)
    criterion = card.default_criterion
    entry = card.calibration["criteria"][criterion]
    console.print(f"The line: edge-inspect watch on {escape(str(the_line.hot))}, fed {len(drops)} test parts at "
                  f"{rate:g} per second.", highlight=False, soft_wrap=True)
    console.print(f"Criterion {criterion}: {numbers.meaning(criterion, entry['polarity'], entry.get('center'))}; "
                  f"ng when score > {numbers.score(entry['threshold'])}. ms: from the part's arrival to its "
                  "committed verdict.", highlight=False, soft_wrap=True)
    counts = {label: {"ok": 0, "ng": 0, "error": 0} for label in tests}
    rows: list[list[str]] = []
    width = max(len(d.name) for d in drops)
    headers = ["part", "true", "verdict", "score", "ms"]

    def cells(drop, record) -> list[str]:
        return [drop.name, drop.label, record.verdict, numbers.score_pair(record.score, record.threshold)[0],
                f"{record.latency_ms:.0f}"]

    def view() -> Table:
        table = Table(title=f"{len(rows)} of {len(drops)} parts inspected")
        for header in headers:
            table.add_column(header, justify="right" if header in ("score", "ms") else "left", no_wrap=True)
        for row in rows[-max(5, console.size.height - 12):]:
            table.add_row(row[0], row[1], f"[{_VERDICT_STYLE[row[2]]}]{row[2]}[/]", *row[3:])
        return table

    if console.is_terminal:
        from rich.live import Live

        with Live(view(), console=console, refresh_per_second=8) as live:
            for drop, record in the_line.run():
                counts[drop.label][record.verdict] += 1
                rows.append(cells(drop, record))
                live.update(view())
    else:
        line_format = f"{{:<{width}}}  {{:<4}}  {{:<7}}  {{:>10}}  {{:>6}}"
        console.print(line_format.format(*headers), highlight=False, markup=False)
        for drop, record in the_line.run():
            counts[drop.label][record.verdict] += 1
            rows.append(cells(drop, record))
            console.print(line_format.format(*rows[-1]), highlight=False, markup=False)
    console.print(f"The watcher stopped cleanly (SIGTERM, exit {the_line.exit_code}) after {len(rows)} parts"
                  + (", each inspected once." if the_line.committed == len(drops) else "."), highlight=False,
                  soft_wrap=True)
    if the_line.committed != len(drops):
        _warn(f"The line's ledger holds {the_line.committed} verdicts for {len(drops)} parts dropped; see "
              f"{the_line.log}.")
    console.print(_demo_counts("The line's verdicts", counts))
    console.print(f"The line's files, in {escape(str(folder))}: hot/ok and hot/ng (the parts, sorted), "
                  "verdicts.jsonl, heatmaps/ (NG overlays), watch.log (the watcher's log).", highlight=False,
                  soft_wrap=True)
    console.print(f"See its verdicts again with: edge-inspect results {escape(shlex.quote(str(the_line.hot)))}",
                  highlight=False, soft_wrap=True)


def _about(key: str, kind: str = "folder") -> str:
    """A flag's help: the configuration key's description and default, from the one place they live."""
    from edge_inspect.config import CameraSource, FolderSource, Sinks

    parts = key.split(".")
    owner = Sinks if parts[0] == "sinks" else CameraSource if kind == "camera" else FolderSource
    field = owner.model_fields[parts[-1]]
    default = field.default
    shown = "" if default is None or field.is_required() else f" Default: {default}."
    return f"{field.description}{shown} (key {key})"


#: Flags of `watch` -> the configuration key they set (under sources.watch). The one table that maps them.
WATCH_FLAGS = {
    "model": "--model", "path": "FOLDER", "uri": "--camera", "poll": "--poll", "settle": "--settle",
    "settle_unsure": "--settle-unsure", "backlog": "--backlog/--no-backlog", "recursive": "--recursive",
    "ignore": "--ignore",
    "sinks.sort": "--sort", "sinks.heatmaps": "--heatmaps", "sinks.heatmaps_all": "--heatmaps-all",
    "sinks.results": "--results", "ledger": "--ledger",
    "max_pixels": "--max-pixels", "batch_size": "--batch-size", "device": "--device", "criterion": "--criterion",
    "threshold": "--threshold", "precision": "--precision", "every": "--every", "fps": "--fps",
}
WATCH_SOURCE = "watch"


def _flag_errors(message: str, typed: set[str]) -> str:
    """Name the flag the user typed instead of its configuration key: "At 'sources.watch.settle'" -> "--settle"."""
    import re

    def swap(match):
        key = match.group(1)
        flag = WATCH_FLAGS.get(key) if key in typed else None
        if flag == "FOLDER":  # the folder argument: its message names the folder itself
            return ""
        return f"{flag}: " if flag else match.group(0)

    return re.sub(rf"At 'sources\.{WATCH_SOURCE}\.([a-z_.]+)': ?", swap, message)


@app.command()
def watch(
    model: Annotated[Path, typer.Option(help=_about("model"))],
    folder: Annotated[Optional[Path], typer.Argument(help="The hot folder to watch (or give --camera).")] = None,
    camera: Annotated[Optional[str], typer.Option(help=_about("uri", "camera"))] = None,
    poll: Annotated[Optional[float], typer.Option(help=_about("poll"))] = None,
    settle: Annotated[Optional[float], typer.Option(help=_about("settle"))] = None,
    settle_unsure: Annotated[Optional[float], typer.Option(help=_about("settle_unsure"))] = None,
    backlog: Annotated[Optional[bool], typer.Option("--backlog/--no-backlog", help=_about("backlog"))] = None,
    recursive: Annotated[bool, typer.Option("--recursive", help=_about("recursive"))] = False,
    ignore: Annotated[Optional[list[str]], typer.Option(help=_about("ignore") + " Repeatable.")] = None,
    sort: Annotated[bool, typer.Option("--sort", help=_about("sinks.sort"))] = False,
    heatmaps: Annotated[Optional[Path], typer.Option(help=_about("sinks.heatmaps"))] = None,
    heatmaps_all: Annotated[bool, typer.Option("--heatmaps-all", help=_about("sinks.heatmaps_all"))] = False,
    results: Annotated[Optional[Path], typer.Option(help=_about("sinks.results"))] = None,
    ledger: Annotated[Optional[Path], typer.Option(help=_about("ledger"))] = None,
    max_pixels: Annotated[Optional[int], typer.Option(help=_about("max_pixels"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_about("batch_size"))] = None,
    device: Annotated[Optional[Device], typer.Option(help=_about("device"))] = None,
    criterion: Annotated[Optional[str], typer.Option(help=_about("criterion"))] = None,
    threshold: Annotated[Optional[float], typer.Option(help=_about("threshold"))] = None,
    precision: Annotated[Optional[Precision], typer.Option(help=_about("precision"))] = None,
    every: Annotated[Optional[int], typer.Option(help=_about("every", "camera"))] = None,
    fps: Annotated[Optional[float], typer.Option(help=_about("fps", "camera"))] = None,
) -> None:
    """Watch a hot folder (or a camera) and give every part exactly one durable verdict.

    Each verdict is committed to a SQLite ledger before anything else
    happens to the part; restarts (after a crash or a power cut) inspect
    nothing twice and miss nothing. SIGTERM, SIGHUP or Ctrl-C finishes the
    parts in hand and exits 0. Logs each verdict; see them later with
    edge-inspect results. The flags set the keys of one source of the
    service configuration (edge-inspect serve); EDGE_INSPECT_SOURCES__WATCH__KEY
    variables set the others.

    Examples:

        edge-inspect watch /srv/parts --model models/linear-ae --sort --results /var/log/verdicts.jsonl

        edge-inspect watch --camera rtsp://10.0.0.7/stream1 --model models/linear-ae --every 5
    """
    values = {"model": model, "path": folder, "uri": camera, "poll": poll, "settle": settle,
              "settle_unsure": settle_unsure, "backlog": backlog, "recursive": recursive or None,
              "ignore": ignore or None,
              "sinks.sort": sort or None, "sinks.heatmaps": heatmaps,
              "sinks.heatmaps_all": heatmaps_all or None, "sinks.results": results, "ledger": ledger,
              "max_pixels": max_pixels, "batch_size": batch_size, "device": device.value if device else None,
              "criterion": criterion, "threshold": threshold, "precision": precision.value if precision else None,
              "every": every, "fps": fps}
    typed = {key for key, value in values.items() if value is not None}
    try:
        summary = _watch(values, typed, folder, camera)
    except EdgeInspectError as exc:
        _fail(_flag_errors(str(exc), typed), exc)
    err_console.print(f"{summary.ok} ok, {summary.ng} ng, {summary.error} error; {summary.duplicates} already "
                      f"inspected, {summary.replayed} with sinks replayed; {summary.seconds:.1f} s", highlight=False)


def _fail(message: str, exc: BaseException):
    if _state["debug"]:
        err_console.print_exception()
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


def _watch(values: dict, typed: set[str], folder: Path | None, camera: str | None):
    from edge_inspect import config as configuration
    from edge_inspect.errors import ConfigError
    from edge_inspect.service import Service

    if (folder is None) == (camera is None):
        raise ConfigError("Watch needs a folder to watch or --camera URI (exactly one of them).")
    if camera is not None and "sinks.sort" in typed:
        raise ConfigError("--sort moves files of a watched folder; a camera's frames are not files. Drop --sort.")
    if camera is not None and "recursive" in typed:
        raise ConfigError("--recursive watches the sub-folders of a hot folder; a camera has none. Drop --recursive.")
    if folder is not None and ({"every", "fps"} & typed):
        raise ConfigError("--every and --fps select camera frames; they do not apply to a folder.")
    at = f"sources.{WATCH_SOURCE}"
    overrides = {f"{at}.{key}": (str(value) if isinstance(value, Path) else value) for key, value in values.items()
                 if key in typed}
    overrides[f"{at}.kind"] = "folder" if folder is not None else "camera"
    overrides["http.enabled"] = False
    config = configuration.load(None, overrides=overrides)
    problems = configuration.check(config)
    if problems:
        raise ConfigError("\n".join(problems))
    summaries = Service(config, overrides=overrides, reload=False).run()
    return summaries[WATCH_SOURCE]


@app.command()
@handle_errors
def serve(
    config: Annotated[Optional[Path], typer.Option("--config", help="The configuration file (TOML); default: $EDGE_INSPECT_CONFIG.")] = None,
) -> None:
    """Run every source of a configuration file: hot folders and cameras, health and metrics, reload on SIGHUP.

    Every part of every source gets exactly one durable verdict, as with
    watch. SIGHUP reloads the configuration and the models without losing a
    part; SIGTERM or Ctrl-C finishes the parts in hand and exits 0. Check a
    file first with edge-inspect config check.

    Example:

        edge-inspect serve --config /etc/edge-inspect/config.toml
    """
    import os

    from edge_inspect import config as configuration
    from edge_inspect.errors import ConfigError
    from edge_inspect.service import Service

    if config is None:
        if not os.environ.get("EDGE_INSPECT_CONFIG"):
            raise ConfigError("serve needs a configuration file: --config FILE, or EDGE_INSPECT_CONFIG=FILE. Start "
                              "from deploy/config.example.toml.")
        config = Path(os.environ["EDGE_INSPECT_CONFIG"])
    try:
        loaded = configuration.load(config)
        problems = configuration.check(loaded)
        if problems:
            raise ConfigError(f"{config} cannot start:\n" + "\n".join(problems))
    except ConfigError as exc:
        # Exit 2: a wrong configuration does not heal by itself; the unit does not restart on it.
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    summaries = Service(loaded, config_path=config).run()
    for name, summary in summaries.items():
        err_console.print(f"{name}: {summary.ok} ok, {summary.ng} ng, {summary.error} error; {summary.duplicates} "
                          f"already inspected", highlight=False)


@app.command()
@handle_errors
def results(
    folder: Annotated[Optional[Path], typer.Argument(help="A watched folder (its ledger is FOLDER/.edge-inspect/ledger.sqlite), or a ledger file.")] = None,
    ledger: Annotated[Optional[Path], typer.Option(help="The ledger file.")] = None,
    last: Annotated[int, typer.Option(help="Show the last N parts.")] = 20,
    csv: Annotated[Optional[Path], typer.Option(help="Export every part (since --since) to this CSV file.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Only parts committed since: 30m, 12h, 7d, today, or an ISO date/time.")] = None,
) -> None:
    """Show what a watcher decided: counts per verdict, NG rate, the last parts.

    Examples:

        edge-inspect results /srv/parts --since today

        edge-inspect results --ledger edge-inspect-ledger.sqlite --csv verdicts.csv
    """
    import datetime as dt

    from edge_inspect.errors import ConfigError
    from edge_inspect.ledger import Ledger, parse_since
    from edge_inspect.watch import default_ledger

    if folder is not None and ledger is not None:
        raise ConfigError("Give a watched folder or --ledger, not both.")
    path = ledger or (folder if folder is not None and folder.is_file() else default_ledger(folder))
    start = parse_since(since) if since else None
    with Ledger.open(path, readonly=True) as book:
        counts = book.counts(start)
        rows = book.last(last, start) if last > 0 else []
        exported = book.write_csv(csv, start) if csv is not None else None
    total = sum(counts.values())
    decided = counts["ok"] + counts["ng"]
    rate = f"{counts['ng'] / decided:.2%}" if decided else "-"
    scope = f" since {dt.datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S}" if start is not None else ""
    console.print(f"Ledger {path}{scope}: {total} parts", highlight=False, soft_wrap=True)
    summary = Table()
    for column in ("ok", "ng", "error", "NG rate (of ok + ng)"):
        summary.add_column(column, justify="right")
    summary.add_row(str(counts["ok"]), str(counts["ng"]), str(counts["error"]), rate)
    console.print(summary)
    if rows:
        _print_last_parts(rows)
        noted = [row for row in rows if row.input_note]
        if noted:
            console.print("Input notes (inspected, but not as the model was trained):", highlight=False)
            for row in noted:
                part = Path(row.source).name if row.kind == "file" else f"{row.source} #{row.frame_index}"
                console.print(f"  #{row.id} {escape(part)}: {escape(row.input_note)}", highlight=False,
                              soft_wrap=True)
    if exported is not None:
        err_console.print(f"Wrote {exported} parts to {csv}", highlight=False, soft_wrap=True)


def _print_last_parts(rows: list) -> None:
    """The last parts of ``results``: whole names and figures within the console's width, and what the score means."""
    import datetime as dt

    days = {f"{dt.datetime.fromtimestamp(r.committed_at):%Y-%m-%d}" for r in rows}
    when = "%H:%M:%S" if len(days) == 1 else "%m-%d %H:%M:%S"
    raw = any(r.polarity != "high" for r in rows)  # some score is not the criterion's own value: show both
    criteria = {r.criterion for r in rows if r.criterion}
    value = next(iter(criteria)) if len(criteria) == 1 else "value"
    cells = []
    for r in rows:
        score, threshold = numbers.score_pair(r.score, r.threshold)
        cells.append([str(r.id), f"{dt.datetime.fromtimestamp(r.committed_at):{when}}", r.verdict, score,
                      *([numbers.score(r.raw_score)] if raw else []), threshold, f"{r.latency_ms:.0f}"])
    headers = ["id", "committed", "verdict", "score", *([value] if raw else []), "threshold", "ms"]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers)]
    files = all(r.kind == "file" for r in rows)
    uris = {r.source for r in rows if r.kind == "frame"}
    if files:
        folder, names = _relative_names([r.source for r in rows])
    else:
        folder = next(iter(uris)) if len(uris) == 1 else None
        names = [f"{'' if folder else r.source + ' '}#{r.frame_index}" if r.kind == "frame" else r.source
                 for r in rows]
    listed = max(map(len, names)) > max(_room(widths), 5)  # a name would not fit whole: list them after the table
    where = f" ({'in' if files else 'frames of'} {escape(folder)})" if folder else ""
    console.print(f"Last {len(rows)} parts{where}" + (f", {days.pop()}" if len(days) == 1 else "") + ":",
                  highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("committed", no_wrap=True)
    if not listed:
        table.add_column("part", overflow="fold")
    for header in headers[2:]:
        table.add_column(escape(header), justify="left" if header == "verdict" else "right", no_wrap=True)
    style = {"ok": "green", "ng": "bold red", "error": "yellow"}
    for name, row in zip(names, cells):
        table.add_row(*row[:2], *([] if listed else [escape(name)]), f"[{style[row[2]]}]{row[2]}[/]", *row[3:])
    console.print(table)
    for name, r in zip(names, rows):
        if listed or r.verdict == "error":
            reason = (r.error or "").removeprefix(f"{r.source}: ").removeprefix(f"{Path(r.source).name}: ")
            text = f"#{r.id} {escape(name)}" + (f" [yellow]error[/]: {escape(reason)}" if r.verdict == "error" else "")
            console.print(text, highlight=False, soft_wrap=True)
    meanings = sorted({numbers.meaning(r.criterion, r.polarity) for r in rows if r.verdict != "error"})
    if meanings:
        console.print("; ".join(meanings) + "; ng when score > threshold.", highlight=False, soft_wrap=True)


ledger_app = typer.Typer(name="ledger", help="Check a ledger, or save the readable rows of a damaged one.",
                         no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
_LEDGER_ARGUMENT = "A ledger file, or a watched folder (its ledger is FOLDER/.edge-inspect/ledger.sqlite)."


def _ledger_path(path: Path) -> Path:
    """The ledger file as given, or a watched folder's ledger, as edge-inspect results reads it."""
    from edge_inspect.watch import default_ledger

    return path if path.is_file() or not path.exists() else default_ledger(path)


def _id_ranges(ids: tuple[int, ...], most: int = 12) -> str:
    """Sorted ids as runs: ``4097-4160, 5001``; the rest counted after ``most`` runs."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:most])
    return text + (f" and {len(runs) - most} more runs" if len(runs) > most else "")


@ledger_app.command("check")
@handle_errors
def ledger_check(
    path: Annotated[Path, typer.Argument(help=_LEDGER_ARGUMENT)],
) -> None:
    """Check a ledger with SQLite's full integrity check, reading only: exit 0 when healthy, 2 when damaged.

    Safe while a watcher writes to it.

    Example:

        edge-inspect ledger check /srv/parts
    """
    from edge_inspect.ledger import Ledger
    from edge_inspect.ledger_repair import check

    file = _ledger_path(path)
    problems = check(file)
    if problems:
        console.print(f"Ledger {file} is damaged: SQLite's integrity check reports {len(problems)} problem(s):",
                      highlight=False, soft_wrap=True)
        for problem in problems[:20]:
            console.print(f"  {escape(problem)}", highlight=False, soft_wrap=True)
        console.print(f"Stop the watcher, then save the rows that can still be read with: "
                      f"edge-inspect ledger recover {escape(shlex.quote(str(file)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    with Ledger.open(file, readonly=True) as book:
        counts = book.counts()
    console.print(f"Ledger {file} is healthy: {sum(counts.values())} parts ({counts['ok']} ok, {counts['ng']} ng, "
                  f"{counts['error']} error).", highlight=False, soft_wrap=True)


@ledger_app.command("recover")
@handle_errors
def ledger_recover(
    path: Annotated[Path, typer.Argument(help=_LEDGER_ARGUMENT)],
) -> None:
    """Save every row that can still be read from a damaged ledger into a new ledger at the same path.

    Stop the watcher first. Salvaged rows keep their ids, verdicts and
    pending sinks. The damaged file is kept beside the new one as
    PATH.damaged-YYYYmmdd-HHMMSS. Parts whose rows were lost and that are
    still in the watched folder are inspected again at the next start.

    Example:

        edge-inspect ledger recover /srv/parts/.edge-inspect/ledger.sqlite
    """
    from edge_inspect.ledger_repair import recover

    report = recover(_ledger_path(path))
    console.print(f"Recovered ledger {report.path}: {report.salvaged} parts salvaged, {len(report.lost)} lost.",
                  highlight=False, soft_wrap=True)
    if report.lost:
        console.print(f"Lost rows (ids): {_id_ranges(report.lost)}.", highlight=False, soft_wrap=True)
        for row_id, source in list(report.lost_sources.items())[:20]:
            console.print(f"  #{row_id} {escape(source)}", highlight=False, soft_wrap=True)
        if len(report.lost_sources) > 20:
            console.print(f"  ... and {len(report.lost_sources) - 20} more", highlight=False)
    if report.unknown_from is not None:
        console.print(f"Rows from id {report.unknown_from} on, if there were any, could not be read either: the "
                      "file ends early or its last pages are damaged, and no index tells how many there were.",
                      highlight=False, soft_wrap=True)
    if report.lost or report.unknown_from is not None:
        console.print("Parts whose rows were lost and that are still in the watched folder are inspected again at "
                      "the next start of edge-inspect watch.", highlight=False, soft_wrap=True)
    console.print(f"The damaged file is kept as {report.damaged} (with its -wal and -shm, if it had them).",
                  highlight=False, soft_wrap=True)


config_app = typer.Typer(name="config", help="Check, show and describe the service configuration file.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("check")
@handle_errors
def config_check(
    file: Annotated[Path, typer.Argument(help="The configuration file (TOML).")],
    offline: Annotated[bool, typer.Option("--offline", help="Do not connect to the OPC UA server to check its nodes.")] = False,
) -> None:
    """Validate a configuration without starting anything: types, paths, permissions, models, camera URIs.

    Exit 0 when it would start; 2 with one line per problem when not.

    Example:

        edge-inspect config check /etc/edge-inspect/config.toml
    """
    from edge_inspect import config as configuration
    from edge_inspect.errors import ConfigError

    try:
        loaded = configuration.load(file)
    except ConfigError as exc:
        err_console.print(f"{escape(str(file))}: invalid.\n{escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    problems = configuration.check(loaded, network=not offline)
    if problems:
        err_console.print(f"{escape(str(file))}: {len(problems)} problem(s).\n" + escape("\n".join(problems)),
                          highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    names = ", ".join(f"{name} ({source.kind})" for name, source in loaded.sources.items())
    console.print(f"{escape(str(file))}: OK. Sources: {escape(names)}.", highlight=False, soft_wrap=True)


@config_app.command("show")
@handle_errors
def config_show(
    file: Annotated[Optional[Path], typer.Argument(help="The configuration file (default: $EDGE_INSPECT_CONFIG).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per key: key, value, from.")] = False,
) -> None:
    """Print the effective configuration, each value with where it came from (default, file, environment); secrets masked.

    Example:

        EDGE_INSPECT_HTTP__PORT=9200 edge-inspect config show /etc/edge-inspect/config.toml
    """
    import os

    from edge_inspect import config as configuration

    file = file or (Path(os.environ["EDGE_INSPECT_CONFIG"]) if os.environ.get("EDGE_INSPECT_CONFIG") else None)
    loaded = configuration.load_with_origins(file)
    if as_json:
        import json

        for key, value, origin in configuration.effective(loaded):
            sys.stdout.write(json.dumps({"key": key, "value": json.loads(value) if value != "****" else value,
                                         "from": origin}) + "\n")
        return
    table = Table(title=f"Effective configuration{f' of {file}' if file else ''}")
    table.add_column("key", overflow="fold")
    table.add_column("value", overflow="fold")
    table.add_column("from", overflow="fold")
    for key, value, origin in configuration.effective(loaded):
        means = configuration.unset_means(loaded.config, key) if value == "null" else None
        table.add_row(escape(key), escape(f"null: {means}" if means else value), escape(origin))
    console.print(table)


@config_app.command("schema")
@handle_errors
def config_schema(
    out: Annotated[Optional[Path], typer.Option(help="Write it to this file instead of standard output.")] = None,
) -> None:
    """Write the JSON Schema of the configuration file, for editors to complete and check it.

    Example:

        edge-inspect config schema --out edge-inspect.schema.json
    """
    import json

    from edge_inspect import config as configuration

    text = json.dumps(configuration.schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        err_console.print(f"Wrote {out}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
