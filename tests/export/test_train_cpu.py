"""The cpu preset's two levers: bfloat16 maths while training, and a wall-clock budget."""

import json

import numpy as np
import onnx
import pytest

from edge_inspect.errors import ConfigError
from export.train import PRESETS, TrainConfig, native_bfloat16, resolve_compute, train

TINY = dict(size=32, batch_size=8)


def test_cpu_preset_resolves_to_its_budget_and_auto_compute(normal_dir):
    config = TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir="x", preset="cpu").resolved()
    assert (config.size, config.compute, config.time_budget) == (128, "auto", 140.0)
    assert PRESETS["paper"].compute == "float32" and PRESETS["paper"].time_budget is None
    explicit = TrainConfig(model="vae", normal_dir="n", out_dir="x", preset="cpu", time_budget=30, compute="float32").resolved()
    assert (explicit.time_budget, explicit.compute) == (30, "float32")


def test_cpu_preset_gives_the_vaes_a_wider_latent_and_longer_training_and_flags_still_win():
    def resolved(model, preset, **flags):
        config = TrainConfig(model=model, normal_dir="n", out_dir="x", preset=preset, **flags).resolved()
        return config.latent_dim, config.epochs, config.patience

    assert resolved("vae", "cpu") == resolved("dilated-vae", "cpu") == (32, 200, 20)
    assert resolved("conv-ae", "cpu")[1:] == (100, 10)
    assert resolved("vae", "paper") == (2, 100, 10) and resolved("vae", "fast") == (2, 40, 8)   # the paper's latent
    assert resolved("vae", "cpu", latent_dim=2, epochs=50) == (2, 50, 20)
    with pytest.raises(ConfigError, match="latent_dim"):
        resolved("vae", "cpu", latent_dim=0)


@pytest.mark.parametrize(("field", "value", "named"), [("compute", "bf16", "compute"), ("time_budget", 0, "time_budget"),
                                                       ("time_budget", -5.0, "time_budget")])
def test_bad_compute_or_budget_is_named(field, value, named):
    with pytest.raises(ConfigError, match=named):
        TrainConfig(model="conv-ae", normal_dir="n", out_dir="x", **{field: value}).resolved()


def test_native_bfloat16_reads_the_cpu_flags(tmp_path):
    with_bf16 = tmp_path / "zen4"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    without = tmp_path / "skylake"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert native_bfloat16(with_bf16) and not native_bfloat16(without)
    assert not native_bfloat16(tmp_path / "missing")
    assert resolve_compute("auto", on_gpu=True) == "float32"
    assert resolve_compute("bfloat16", on_gpu=True) == "bfloat16"
    assert resolve_compute("auto", on_gpu=False) == ("bfloat16" if native_bfloat16() else "float32")


@pytest.mark.parametrize("kind", ["conv-ae", "vae"])
def test_bfloat16_training_saves_a_float32_model(kind, normal_dir, tmp_path):
    import keras

    run = tmp_path / kind
    train(TrainConfig(model=kind, normal_dir=str(normal_dir), out_dir=str(run), epochs=2, compute="bfloat16", **TINY),
          progress=False)
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["compute"] == "bfloat16" and all(np.isfinite(h["loss"]) for h in state["history"])
    assert keras.config.dtype_policy().name == "float32"  # the process is left as it was
    model = keras.models.load_model(run / "model.keras")
    assert {layer.dtype_policy.name for layer in model._flatten_layers()} == {"float32"}
    assert {w.dtype for w in model.weights} == {"float32"}
    last = keras.models.load_model(run / "checkpoints" / "last.keras")  # resumes in the precision it trained in
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in last._flatten_layers()}
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    assert model.predict(x, verbose=0).dtype == np.float32


def test_bfloat16_run_exports_a_float32_graph(normal_dir, tmp_path):
    from export.scoring import calibrate_run
    from export.to_onnx import export_run

    run = tmp_path / "run"
    train(TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(run), epochs=1, compute="bfloat16", **TINY),
          progress=False)
    calibrate_run(run)
    report = export_run(run, tmp_path / "model")
    assert report.files["fp32"]["parity"]["verdicts_identical"]
    graph = onnx.load(tmp_path / "model" / "model.onnx")
    types = {t.type.tensor_type.elem_type for t in (*graph.graph.input, *graph.graph.output, *graph.graph.value_info)}
    types |= {t.data_type for t in graph.graph.initializer}
    assert onnx.TensorProto.BFLOAT16 not in types


def test_time_budget_stops_at_an_epoch_end_and_a_resume_gets_a_new_budget(normal_dir, tmp_path):
    run = tmp_path / "run"
    # A budget shorter than two epochs: the first epoch ends it.
    result = train(TrainConfig(model="vae", normal_dir=str(normal_dir), out_dir=str(run), epochs=5, time_budget=0.001,
                               **TINY), progress=False)
    assert (result.epochs_run, result.stopped_by, result.stopped_early) == (1, "budget", True)
    assert (run / "model.keras").is_file() and (run / "loss.png").is_file()
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["stopped_budget"] and state["epoch"] == 1
    resumed = train(TrainConfig(model="vae", normal_dir=str(normal_dir), out_dir=str(run), epochs=3, time_budget=60),
                    resume=True, progress=False)
    assert resumed.epochs_run == 3 and resumed.stopped_by is None


def test_a_generous_budget_changes_nothing(normal_dir, tmp_path):
    result = train(TrainConfig(model="vae", normal_dir=str(normal_dir), out_dir=str(tmp_path / "run"), epochs=2,
                               time_budget=60, **TINY), progress=False)
    assert (result.epochs_run, result.stopped_by) == (2, None)
