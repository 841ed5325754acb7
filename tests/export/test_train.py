"""Training runs end to end on tiny synthetic parts: run folder, resume, stops, errors."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_inspect.errors import ConfigError, InputError, ModelCardError
from export.train import PRESETS, TrainConfig, _checkpoint_callback, train

TINY = dict(size=32, batch_size=8, preset="fast")


def _history(run_dir: Path) -> list[dict]:
    with (run_dir / "history.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("kind", ["conv-ae", "vae", "dilated-vae"])
def test_train_writes_a_complete_run_folder(kind, normal_dir, tmp_path):
    run = tmp_path / kind
    result = train(TrainConfig(model=kind, normal_dir=str(normal_dir), out_dir=str(run), epochs=2, **TINY), progress=False)
    for name in ("model.keras", "config.json", "split.json", "history.csv", "loss.png", "skipped.txt", "checkpoints/last.keras"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["model"] == kind and config["train"]["epochs"] == 2 and config["train"]["lr"] == PRESETS["fast"].lr
    assert config["data"]["n_readable"] == 80 and config["data"]["n_train"] + config["data"]["n_val"] == 80
    assert config["preprocessing"]["height"] == 32 and config["versions"]["tensorflow"]
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == result.n_train and len(split["val"]) == result.n_val
    rows = _history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(float(r["val_loss"]) > 0 for r in rows)
    if kind != "conv-ae":
        assert {"reconstruction_loss", "kl_loss", "val_reconstruction_loss", "val_kl_loss"} <= set(rows[0])


def test_resume_continues_from_the_checkpoint(normal_dir, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(run), epochs=2, **TINY), progress=False)
    before = json.loads((run / "checkpoints" / "state.json").read_text())
    assert before["epoch"] == 2
    result = train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(run), epochs=3), resume=True, progress=False)
    assert result.epochs_run == 3
    rows = _history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows[:2]] == [str(h["loss"]) for h in before["history"]]


def test_a_run_from_before_grouped_splits_resumes_with_its_own_split(normal_dir, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(run), epochs=1, group_split=False, **TINY),
          progress=False)
    config = json.loads((run / "config.json").read_text())
    del config["train"]["group_split"]  # as config.json was written before the option existed
    (run / "config.json").write_text(json.dumps(config))
    split = json.loads((run / "split.json").read_text())
    train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(run), epochs=2), resume=True, progress=False)
    assert json.loads((run / "split.json").read_text())["val"] == split["val"]
    assert json.loads((run / "config.json").read_text())["train"]["group_split"] is False


def test_early_stopping_keeps_the_best_model(tmp_path):
    import keras

    from export.models import build_model

    (tmp_path / "checkpoints").mkdir()
    model = build_model("conv-ae", (16, 16))
    model.compile(optimizer="adam", loss="mse")
    state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": 0, "wait": 0, "stopped_early": False, "history": []}
    callback = _checkpoint_callback(tmp_path, state, patience=2)
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, val in enumerate([1.0, 0.5, 0.7, 0.6]):
        model.stop_training = False
        if epoch == 1:
            best_weights = [w.copy() for w in model.get_weights()]
        callback.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val})
        model.set_weights([w + 1.0 for w in model.get_weights()])
    assert state["best_epoch"] == 2 and state["best_val_loss"] == 0.5
    assert model.stop_training and state["stopped_early"]
    saved = keras.models.load_model(tmp_path / "model.keras")
    for a, b in zip(saved.get_weights(), best_weights):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_run(normal_dir, tmp_path):
    losses = []
    for name in ("a", "b"):
        train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(tmp_path / name), epochs=1, **TINY), progress=False)
        losses.append(float(_history(tmp_path / name)[0]["val_loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_bad_configuration_and_folders(normal_dir, tmp_path):
    with pytest.raises(ConfigError, match="Unknown model"):
        train(TrainConfig(model="gan", normal_dir=str(normal_dir), out_dir=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="At 'lr'"):
        train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(tmp_path / "y"), lr=-1.0))
    with pytest.raises(InputError, match="is empty"):
        (tmp_path / "empty").mkdir()
        train(TrainConfig(model="conv-ae", normal_dir=str(tmp_path / "empty"), out_dir=str(tmp_path / "z")))
    with pytest.raises(ModelCardError, match="Cannot resume"):
        train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(tmp_path / "w")), resume=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("x")
    with pytest.raises(ConfigError, match="--resume"):
        train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(busy)))


def _train_in_subprocess(normal_dir, run, epochs):
    return subprocess.Popen(
        [sys.executable, "-m", "edge_inspect.cli", "train", "--model", "conv-ae", "--normal", str(normal_dir),
         "--out", str(run), "--size", "32", "--batch-size", "4", "--epochs", str(epochs), "--patience", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # PYTHONFAULTHANDLER: a crash of the interrupted process (a SIGSEGV once on CI) prints every thread's stack
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONFAULTHANDLER": "1"},
        # a test run started in the background inherits SIGINT ignored, and so would the training: a Ctrl-C
        # must reach it as it reaches a user's
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_epoch(run: Path, epoch: int, proc, timeout=240.0):
    state = run / "checkpoints" / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.exists() and json.loads(state.read_text())["epoch"] >= epoch:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("training made no checkpoint in time")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_training_resumes(sig, normal_dir, tmp_path):
    """A kill -9 or a Ctrl-C mid-run leaves a checkpoint that --resume finishes."""
    run = tmp_path / "run"
    proc = _train_in_subprocess(normal_dir, run, epochs=200)
    _wait_for_epoch(run, 1, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, out
        assert "--resume" in out
    done = json.loads((run / "checkpoints" / "state.json").read_text())["epoch"]
    result = subprocess.run(
        [sys.executable, "-m", "edge_inspect.cli", "train", "--model", "conv-ae", "--normal", str(normal_dir),
         "--out", str(run), "--epochs", str(done + 1), "--resume"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [int(r["epoch"]) for r in _history(run)] == list(range(1, done + 2))
