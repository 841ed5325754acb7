"""The linear autoencoder: augmentation, training without TensorFlow, calibration, ONNX parity."""

import json
import subprocess
import sys

import keras
import numpy as np
import onnxruntime as ort
import pytest

from edge_inspect.card import load_card
from edge_inspect.errors import ConfigError, ModelCardError
from export.models import build_model
from export.models.linear_ae import augment_d4, build_linear_ae
from export.pca import ImageCache, fit_pca
from export.train import TrainConfig, train


def parts(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth random images: a few shared patterns mixed with noise, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    patterns = np.stack([np.sin(2 * np.pi * (k + 1) * xx) * np.cos(np.pi * k * yy) for k in range(6)])
    weights = rng.normal(size=(n, 6))
    images = 0.5 + 0.06 * np.einsum("nk,khw->nhw", weights, patterns) + 0.01 * rng.normal(size=(n, size, size))
    return np.clip(images, 0, 1).astype(np.float32)


def test_d4_gives_the_eight_symmetries():
    image = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    views = augment_d4(image)
    assert views.shape == (8, 3, 3)
    assert len({v.tobytes() for v in views}) == 8  # an asymmetric image has eight distinct views
    assert np.array_equal(views[0], image[0]) and np.array_equal(views[2], image[0][::-1, ::-1])
    with pytest.raises(ConfigError, match="square"):
        augment_d4(np.zeros((1, 3, 4), np.float32))


def test_d4_fit_reconstructs_turned_parts(tmp_path):
    """Fitted with d4, a part turned by a quarter turn is reconstructed as well as unturned ones."""
    train_images, test_images = parts(40, seed=0), parts(10, seed=1)
    turned = np.rot90(test_images, 1, axes=(1, 2)).copy()

    def error(augment, images):
        pca = fit_pca(ImageCache.from_array(tmp_path / augment, train_images, augment), 12)
        return float(np.mean((pca.reconstruct(images) - images) ** 2))

    assert error("d4", turned) < 0.5 * error("none", turned)
    assert error("d4", turned) < 2.0 * error("d4", test_images)


def test_an_earlier_runs_keras_form_still_loads(tmp_path):
    """Runs made before model.npz saved the linear-ae as a Keras model; they still load."""
    model = build_model("linear-ae", (16, 16), components=6)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    images = parts(3)[..., None]
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    with pytest.raises(ConfigError, match="pixel count"):
        build_linear_ae((8, 8), components=65)


# ---------------------------------------------------------------- training


def test_train_writes_a_run_and_calibrates(normal_dir, tmp_path):
    from export.scoring import calibrate_run, load_run

    out = tmp_path / "run"
    result = train(TrainConfig(model="linear-ae", normal_dir=str(normal_dir), out_dir=str(out), size=32, components=24),
                   progress=False)
    assert (out / "model.npz").is_file() and (out / "history.csv").is_file() and not (out / "model.keras").exists()
    assert not list(out.glob(".fit-images*")), "the fit's image file is removed"
    assert result.epochs_run == 1 and result.n_train + result.n_val == 80
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["model"] == "linear-ae" and config["train"]["augment"] == "d4"
    assert config["train"]["components"] == 24 and config["versions"]["numpy"] == np.__version__
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["fit"]["fitted_on"] == 8 * result.n_train and state["fit"]["components"] == 24
    assert sum(state["fit"]["components_per_block"].values()) < 24  # E's basis serves two components
    assert np.isfinite(result.best_val_loss) and result.best_val_loss < 0.01
    cal = calibrate_run(out)
    assert cal["n_normal"] == result.n_val
    assert load_run(out).kind == "linear-ae"


def test_the_default_model_trains_calibrates_and_exports_without_tensorflow(normal_dir, tmp_path):
    """Importing TensorFlow costs 600 MB and seconds: the default's whole path runs without it."""
    script = f"""
import sys
from export.train import TrainConfig, train
from export.scoring import calibrate_run
from export.to_onnx import export_run
train(TrainConfig(model="linear-ae", normal_dir={str(normal_dir)!r}, out_dir={str(tmp_path / "run")!r}, size=32,
                  components=16), progress=False)
calibrate_run({str(tmp_path / "run")!r})
export_run({str(tmp_path / "run")!r}, {str(tmp_path / "model")!r}, precisions=["int8"])
loaded = [m for m in ("tensorflow", "keras", "tf2onnx") if m in sys.modules]
assert not loaded, loaded
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model" / "model.int8.onnx").is_file()


def test_augment_defaults_and_resume_has_nothing_to_continue(normal_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown 'd8'"):
        TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(tmp_path / "a"), augment="d8").resolved()
    assert TrainConfig(model="linear-ae", normal_dir="x", out_dir="y").resolved().augment == "d4"
    assert TrainConfig(model="conv-ae", normal_dir="x", out_dir="y").resolved().augment == "none"
    with pytest.raises(ModelCardError, match="Cannot resume"):
        train(TrainConfig(model="linear-ae", normal_dir=str(normal_dir), out_dir=str(tmp_path / "b"), size=32,
                          components=8), resume=True, progress=False)


def test_too_many_components_for_the_images(normal_dir, tmp_path):
    with pytest.raises(ConfigError, match="--components"):
        train(TrainConfig(model="linear-ae", normal_dir=str(normal_dir), out_dir=str(tmp_path / "run"), size=32,
                          components=1000, augment="none"), progress=False)


# ------------------------------------------------------------------- export


def test_onnx_export_matches_the_fit_and_int8_quantises_the_weights_alone(normal_dir, tmp_path):
    import onnx

    from export.parity import FP32_TOLERANCE
    from export.scoring import calibrate_run, load_run, reconstruct
    from export.to_onnx import export_run

    run = tmp_path / "run"
    train(TrainConfig(model="linear-ae", normal_dir=str(normal_dir), out_dir=str(run), size=32, components=24),
          progress=False)
    calibrate_run(run)
    report = export_run(run, tmp_path / "model", precisions=["int8"])
    parity = report.files["fp32"]["parity"]
    assert parity["max_abs_diff"] <= FP32_TOLERANCE and parity["verdicts_identical"]
    int8 = report.files["int8"]["parity"]
    assert int8["score_change"]["max_relative_to_threshold"] < 0.01 and int8["verdict_agreement"] >= 0.99
    assert report.files["fp32"]["parity"]["reference"] == "fit"
    card = load_card(tmp_path / "model")
    assert card.model_kind == "linear-ae" and card.default_precision == "fp32"

    pca = load_run(run).model
    graph = onnx.load(tmp_path / "model" / "model.onnx").graph
    bases = sorted(tuple(t.dims) for t in graph.initializer if t.name.endswith("_basis"))
    assert bases == sorted(w.shape for w in pca.bases if len(w))  # each block's basis, stored once
    assert [n.op_type for n in graph.node].count("Gemm") == len(bases)
    int8_model = onnx.load(tmp_path / "model" / "model.int8.onnx")
    assert int8_model.ir_version <= 10  # what onnxruntime 1.18, the oldest the runtime accepts, loads
    int8 = int8_model.graph
    ops = [n.op_type for n in int8.node]
    assert ops.count("MatMulNBits") == 2 * len(bases) and "QuantizeLinear" not in ops  # float activations between

    images = parts(6, size=32, seed=5)
    session = ort.InferenceSession(str(tmp_path / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["reconstruction"], {"image": images})[0]
    np.testing.assert_allclose(got, reconstruct(pca, images), atol=1e-5)
