"""The ``edge-inspect`` command line: a thin typer layer over library functions.

Training commands import the training side (``export``) only when they run,
so the lean install answers every runtime command without TensorFlow, and a
training command without the ``train`` extra says which extra to install.

    $ edge-inspect train --model conv-ae --normal parts/ok --out runs/a
"""

from __future__ import annotations

import functools
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

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
            err_console.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper


def _require_training_side():
    """Import the training side, or explain which extra brings it."""
    try:
        import export.train  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            f"This command needs the training extra ({exc.name} is not installed). "
            "Install it with: pip install 'edge-inspect[train]'"
        ) from exc


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=debug)],
        force=True,
    )


class ModelKind(str, Enum):
    conv_ae = "conv-ae"
    vae = "vae"
    dilated_vae = "dilated-vae"


class PresetName(str, Enum):
    fast = "fast"
    paper = "paper"


@app.command()
@handle_errors
def train(
    model: Annotated[ModelKind, typer.Option(help="Which model to train.")],
    normal: Annotated[Path, typer.Option(help="Folder of normal (good) part images, read recursively.")],
    out: Annotated[Path, typer.Option(help="Run folder to create (or to continue with --resume).")],
    preset: Annotated[PresetName, typer.Option(help="fast: CPU-friendly defaults; paper: the paper's configuration.")] = PresetName.fast,
    size: Annotated[Optional[int], typer.Option(help="Input size in pixels (square). Default: from the preset.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs. Default: from the preset.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size. Default: from the preset.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate. Default: from the preset.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience in epochs. Default: from the preset.")] = None,
    latent_dim: Annotated[int, typer.Option(help="Latent dimension of the VAEs.")] = 2,
    val_fraction: Annotated[float, typer.Option(help="Share of normal images held out for validation and calibration.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split, the shuffling and the initial weights.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
) -> None:
    """Train a model on normal images only and write a run folder.

    Example:

        edge-inspect train --model conv-ae --normal parts/ok --out runs/conv-ae
    """
    _require_training_side()
    from rich.progress import Progress

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
    )
    interactive = console.is_terminal
    with Progress(console=err_console, transient=True, disable=not interactive) as bar:
        task = bar.add_task("Checking images", total=None)
        try:
            result = run_training(config, resume=resume, progress=interactive, on_scan=lambda: bar.advance(task))
        except KeyboardInterrupt:
            err_console.print(
                f"Interrupted. The last finished epoch is saved in {out}/checkpoints; "
                f"continue with: edge-inspect train --model {model.value} --normal {normal} --out {out} --resume"
            )
            raise typer.Exit(130) from None

    table = Table(title=f"Trained {model.value}", show_header=False)
    table.add_row("run folder", str(result.run_dir))
    table.add_row("images", f"{result.n_train} training, {result.n_val} validation")
    table.add_row("skipped files", f"{result.n_skipped}" + (f" (listed in {result.run_dir}/skipped.txt)" if result.n_skipped else ""))
    table.add_row("epochs", f"{result.epochs_run}" + (" (stopped early)" if result.stopped_early else ""))
    table.add_row("best validation loss", f"{result.best_val_loss:.6g} at epoch {result.best_epoch}")
    table.add_row("wall time", f"{result.seconds:.1f} s")
    console.print(table)


@app.command()
@handle_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's images and run.")] = Path("demo"),
    count: Annotated[int, typer.Option(help="Normal synthetic parts to generate.")] = 300,
    size: Annotated[int, typer.Option(help="Image and model size in pixels.")] = 64,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 8,
) -> None:
    """Run the main job end to end on synthetic parts: generate, train, report.

    Example:

        edge-inspect demo --out demo
    """
    from edge_inspect.synthetic import write_parts

    if out.exists() and any(out.iterdir()):
        raise EdgeInspectError(f"Demo folder '{out}' already holds files. Remove it or pass another --out.")
    normal_dir, defect_dir = out / "parts" / "ok", out / "parts" / "ng"
    write_parts(normal_dir, count, size=size, seed=0)
    write_parts(defect_dir, max(count // 10, 3), size=size, seed=1, defective=True)
    console.print(f"Wrote {count} normal parts to {normal_dir} and defective ones to {defect_dir}.")
    train(
        model=ModelKind.conv_ae, normal=normal_dir, out=out / "runs" / "conv-ae", preset=PresetName.fast,
        size=size, epochs=epochs, batch_size=32, lr=None, patience=None, latent_dim=2,
        val_fraction=0.2, seed=0, resume=False,
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
