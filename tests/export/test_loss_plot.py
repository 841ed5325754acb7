"""The loss curve of a run: whole-number epochs, and a linear run that says why it has none."""

import json

import matplotlib.pyplot as plt
import pytest
from typer.testing import CliRunner

from edge_inspect.cli import app
from export import plots
from export.report import _training

runner = CliRunner()


@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 40])
def test_epoch_ticks_are_whole_numbers(epochs, tmp_path):
    history = [{"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "reconstruction_loss": 0.9 / e,
                "val_reconstruction_loss": 1.0 / e, "kl_loss": 0.1, "val_kl_loss": 0.1} for e in range(1, epochs + 1)]
    fig = plots.loss_figure(history, "vae")
    fig.canvas.draw()
    try:
        assert len(fig.axes) == 3
        for ax in fig.axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
            assert 1 <= min(ticks) and max(ticks) <= epochs
    finally:
        plt.close(fig)
    path = plots.loss(history, tmp_path / "loss.png", "vae")
    assert path.stat().st_size > 1000


def test_the_linear_run_says_why_it_has_no_loss_curve(normal_dir, tmp_path, monkeypatch):
    from edge_inspect import cli

    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "width", 200)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--normal", str(normal_dir), "--out", str(run), "--size", "32",
                                 "--components", "16"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "fitted in closed form, in one step, so it has no epochs (and no loss.png)" in result.output
    assert not (run / "loss.png").exists()
    assert json.loads((run / "config.json").read_text())["train"]["model"] == "linear-ae"
    assert "fitted in closed form, in one step, so it has no epochs" in "".join(_training(run))
