"""The linear autoencoder: closed-form fit against a NumPy PCA, augmentation, training, ONNX parity."""

import json

import keras
import numpy as np
import onnxruntime as ort
import pytest

from edge_inspect.card import load_card
from edge_inspect.errors import ConfigError, ModelCardError
from export.models import build_model
from export.models.linear_ae import augment_d4, build_linear_ae, fit_linear_ae, principal_components
from export.train import TrainConfig, train


def parts(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth random images: a few shared patterns mixed with noise, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    patterns = np.stack([np.sin(2 * np.pi * (k + 1) * xx) * np.cos(np.pi * k * yy) for k in range(6)])
    weights = rng.normal(size=(n, 6))
    images = 0.5 + 0.06 * np.einsum("nk,khw->nhw", weights, patterns) + 0.01 * rng.normal(size=(n, size, size))
    return np.clip(images, 0, 1).astype(np.float32)


def numpy_pca_reconstruction(train_images: np.ndarray, images: np.ndarray, k: int) -> np.ndarray:
    x = train_images.reshape(len(train_images), -1).astype(np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    v = vt[:k]
    y = images.reshape(len(images), -1).astype(np.float64) - mean
    return (y @ v.T @ v + mean).reshape(images.shape)


@pytest.mark.parametrize("k", [4, 40])  # 4: randomized SVD; 40 of 60 images: the full SVD
def test_reconstruction_equals_numpy_pca(k):
    train_images, test_images = parts(60, seed=0), parts(10, seed=1)
    model = build_linear_ae((16, 16), components=k)
    summary = fit_linear_ae(model, train_images, augment="none")
    got = model.predict(test_images[..., None], verbose=0)[..., 0]
    want = numpy_pca_reconstruction(train_images, test_images, k)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert summary["fitted_on"] == 60 and summary["components"] == k
    assert 0.0 < summary["explained_variance"] <= 1.0


def test_encoder_and_decoder_are_the_two_halves():
    images = parts(30)
    model = build_linear_ae((16, 16), components=8)
    fit_linear_ae(model, images, augment="none")
    code = model.encoder(images[..., None]).numpy()
    assert code.shape == (30, 8)
    np.testing.assert_allclose(model.decoder(code).numpy(), model(images[..., None]).numpy(), atol=1e-6)
    # Orthonormal axes: the codes of the training images are centred.
    np.testing.assert_allclose(code.mean(axis=0), 0.0, atol=1e-4)


def test_d4_gives_the_eight_symmetries():
    image = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    views = augment_d4(image)
    assert views.shape == (8, 3, 3)
    assert len({v.tobytes() for v in views}) == 8  # an asymmetric image has eight distinct views
    assert np.array_equal(views[0], image[0]) and np.array_equal(views[2], image[0][::-1, ::-1])
    with pytest.raises(ConfigError, match="square"):
        augment_d4(np.zeros((1, 3, 4), np.float32))


def test_d4_fit_reconstructs_turned_parts():
    """Fitted with d4, a part turned by a quarter turn is reconstructed as well as unturned ones."""
    train_images, test_images = parts(40, seed=0), parts(10, seed=1)
    turned = np.rot90(test_images, 1, axes=(1, 2)).copy()

    def error(augment, images):
        model = build_linear_ae((16, 16), components=12)
        fit_linear_ae(model, train_images, augment=augment)
        return float(np.mean((model.predict(images[..., None], verbose=0)[..., 0] - images) ** 2))

    assert error("d4", turned) < 0.5 * error("none", turned)
    assert error("d4", turned) < 2.0 * error("d4", test_images)


def test_bad_component_counts():
    with pytest.raises(ConfigError, match="pixel count"):
        build_linear_ae((8, 8), components=65)
    with pytest.raises(ConfigError, match="training images"):
        principal_components(parts(5), 6)
    model = build_linear_ae((16, 16), components=4)
    with pytest.raises(ConfigError, match="augment"):
        fit_linear_ae(model, parts(10), augment="rotate")
    with pytest.raises(ConfigError, match=r"\(n, 16, 16\)"):
        fit_linear_ae(model, parts(10, size=12))


def test_saved_model_loads_without_custom_objects(tmp_path):
    images = parts(30)
    model = build_model("linear-ae", (16, 16), components=6)
    fit_linear_ae(model, images)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(images[..., None], verbose=0), model.predict(images[..., None], verbose=0))


# ---------------------------------------------------------------- training


def test_train_writes_a_run_and_calibrates(normal_dir, tmp_path):
    from export.scoring import calibrate_run, load_run

    out = tmp_path / "run"
    result = train(TrainConfig(model="linear-ae", normal_dir=str(normal_dir), out_dir=str(out), size=32, components=24),
                   progress=False)
    assert (out / "model.keras").is_file() and (out / "history.csv").is_file()
    assert result.epochs_run == 1 and result.n_train + result.n_val == 80
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["model"] == "linear-ae" and config["train"]["augment"] == "d4"
    assert config["train"]["components"] == 24
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["fit"]["fitted_on"] == 8 * result.n_train
    assert np.isfinite(result.best_val_loss) and result.best_val_loss < 0.01
    cal = calibrate_run(out)
    assert cal["n_normal"] == result.n_val
    assert load_run(out).kind == "linear-ae"


def test_augment_is_linear_only_and_resume_has_nothing_to_continue(normal_dir, tmp_path):
    with pytest.raises(ConfigError, match="only available for linear-ae"):
        TrainConfig(model="conv-ae", normal_dir=str(normal_dir), out_dir=str(tmp_path / "a"), augment="d4").resolved()
    assert TrainConfig(model="conv-ae", normal_dir="x", out_dir="y").resolved().augment == "none"
    with pytest.raises(ModelCardError, match="Cannot resume"):
        train(TrainConfig(model="linear-ae", normal_dir=str(normal_dir), out_dir=str(tmp_path / "b"), size=32,
                          components=8), resume=True, progress=False)


def test_too_many_components_for_the_images(normal_dir, tmp_path):
    with pytest.raises(ConfigError, match="--components"):
        train(TrainConfig(model="linear-ae", normal_dir=str(normal_dir), out_dir=str(tmp_path / "run"), size=32,
                          components=1000, augment="none"), progress=False)


# ------------------------------------------------------------------- export


def test_onnx_export_matches_keras(normal_dir, tmp_path):
    from export.scoring import calibrate_run, load_run, reconstruct
    from export.to_onnx import FP32_TOLERANCE, export_run

    run = tmp_path / "run"
    train(TrainConfig(model="linear-ae", normal_dir=str(normal_dir), out_dir=str(run), size=32, components=24),
          progress=False)
    calibrate_run(run)
    report = export_run(run, tmp_path / "model")
    parity = report.files["fp32"]["parity"]
    assert parity["max_abs_diff"] <= FP32_TOLERANCE and parity["verdicts_identical"]
    card = load_card(tmp_path / "model")
    assert card.model_kind == "linear-ae"
    import onnx

    graph = onnx.load(tmp_path / "model" / "model.onnx").graph
    matrices = [t for t in graph.initializer if len(t.dims) == 2]
    assert [tuple(t.dims) for t in matrices] == [(24, 32 * 32)]  # the axes, stored once for both products
    assert [n.op_type for n in graph.node].count("Gemm") == 2

    images = parts(6, size=32, seed=5)
    session = ort.InferenceSession(str(tmp_path / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["reconstruction"], {"image": images})[0]
    want = reconstruct(load_run(run).model, images)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fast_preset_gives_the_linear_ae_its_own_size():
    from export.train import LINEAR_SIZE, PRESETS

    assert TrainConfig(model="linear-ae", normal_dir="x", out_dir="y").resolved().size == LINEAR_SIZE
    assert TrainConfig(model="conv-ae", normal_dir="x", out_dir="y").resolved().size == PRESETS["fast"].size
    assert TrainConfig(model="linear-ae", normal_dir="x", out_dir="y", size=64).resolved().size == 64
    assert TrainConfig(model="linear-ae", normal_dir="x", out_dir="y", preset="paper").resolved().size == 300
