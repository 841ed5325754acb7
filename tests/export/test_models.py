"""The three models: the paper's layers, any input size, training, loss, saving.

Everything runs on tiny images (32x32 and odd sizes next to it) so the file
takes well under a minute or two on two CPU cores. One module-scoped fixture
trains each kind for a few epochs; the loss and the save/load tests share it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers  # noqa: E402

from edge_inspect.errors import ConfigError  # noqa: E402
from export.models import (  # noqa: E402
    DEEP_KINDS,
    MODEL_KINDS,
    VAE,
    build_conv_ae,
    build_dilated_vae,
    build_model,
    build_vae,
    stride_of,
    vae_loss_terms,
)
from export.models.conv_ae import padded_size, padding_for  # noqa: E402

EPOCHS = 8
# The VAEs' summed BCE moves slowly at 1e-3 on 16 images; 3e-3 makes the
# drop over 8 epochs large and robust (measured: about 10 % vs 65 % for the AE).
LEARNING_RATES = {"conv-ae": 1e-3, "vae": 3e-3, "dilated-vae": 3e-3}


def discs(n: int, size=(32, 32), seed: int = 0) -> np.ndarray:
    """``n`` casting-like images: a bright disc on a darker background, noisy.

    Returns:
        ``(n, H, W, 1)`` float32 in [0, 1].
    """
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    out = np.empty((n, h, w, 1), np.float32)
    for i in range(n):
        cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
        r = min(h, w) * rng.uniform(0.28, 0.36)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = np.where(disc, 0.8, 0.2) + rng.normal(0, 0.03, (h, w))
        out[i, ..., 0] = np.clip(img, 0, 1)
    return out


def inner_layers(model: keras.Model, kind: type) -> list:
    return [layer for layer in model.layers if type(layer) is kind]


# ------------------------------------------------------------ architecture


def test_conv_ae_has_the_papers_layers():
    model = build_conv_ae((32, 32, 1), seed=0)
    encoder, decoder = model.get_layer("encoder"), model.get_layer("decoder")
    assert encoder is model.encoder and decoder is model.decoder

    convs = inner_layers(encoder, layers.Conv2D)
    assert [c.filters for c in convs] == [32, 64, 128]
    for conv in convs:
        assert conv.kernel_size == (5, 5)
        assert conv.strides == (1, 1)
        assert conv.padding == "same"
        assert conv.activation is keras.activations.relu
    pools = inner_layers(encoder, layers.MaxPooling2D)
    assert [p.pool_size for p in pools] == [(2, 2)] * 3
    # conv, pool, conv, pool, conv, pool: each conv is followed by its pool.
    kinds = [type(x) for x in encoder.layers[1:]]
    assert kinds == [layers.Conv2D, layers.MaxPooling2D] * 3

    deconvs = inner_layers(decoder, layers.Conv2DTranspose)
    assert [d.filters for d in deconvs] == [128, 64, 32]
    for deconv in deconvs:
        assert deconv.kernel_size == (5, 5)
        assert deconv.strides == (2, 2)
        assert deconv.activation is keras.activations.relu
    (last,) = inner_layers(decoder, layers.Conv2D)
    assert last is decoder.layers[-1]
    assert (last.filters, last.kernel_size) == (1, (5, 5))
    assert last.activation is keras.activations.sigmoid


@pytest.mark.parametrize("builder", [build_vae, build_dilated_vae])
def test_vae_has_the_papers_layers(builder):
    model = builder((32, 32, 1), seed=0)
    assert isinstance(model, VAE)
    encoder, decoder = model.get_layer("encoder"), model.get_layer("decoder")
    assert encoder is model.encoder and decoder is model.decoder

    convs = [c for c in inner_layers(encoder, layers.Conv2D)
             if not c.name.startswith("dilation_box")]
    assert [c.filters for c in convs] == [64, 128, 128, 128]
    for conv in convs:
        assert (conv.kernel_size, conv.strides) == ((3, 3), (2, 2))
        assert conv.activation is keras.activations.relu
    assert encoder.get_layer("dense").units == 64
    assert encoder.get_layer("z_mean").units == 2
    assert encoder.get_layer("z_log_var").units == 2
    assert [tuple(o.shape) for o in encoder.outputs] == [(None, 2), (None, 2)]

    # Decoder: Dense to a (H/4, W/4, 64) grid, then exactly two conv layers.
    assert decoder.get_layer("reshape").output.shape[1:] == (8, 8, 64)
    deconvs = inner_layers(decoder, layers.Conv2DTranspose)
    assert [d.filters for d in deconvs] == [64, 1]
    assert [d.strides for d in deconvs] == [(2, 2), (2, 2)]
    assert deconvs[-1].activation is keras.activations.sigmoid
    assert not inner_layers(decoder, layers.Conv2D)


def test_latent_dim_is_configurable():
    model = build_model("vae", (32, 32), latent_dim=5, seed=0)
    assert model.encoder.get_layer("z_mean").units == 5
    assert model.decoder.input.shape == (None, 5)


def test_dilated_vae_has_the_dilation_box():
    encoder = build_dilated_vae((32, 32, 1), seed=0).encoder
    conv4 = encoder.get_layer("conv4")
    box = [encoder.get_layer(f"dilation_box_r{r}") for r in (1, 2, 4, 8)]
    for layer, rate in zip(box, (1, 2, 4, 8)):
        assert isinstance(layer, layers.Conv2D)
        assert (layer.filters, layer.kernel_size) == (128, (3, 3))
        assert layer.dilation_rate == (rate, rate)
        assert layer.padding == "same"
        assert isinstance(layer.kernel_initializer, keras.initializers.HeNormal)
        # Parallel: every branch reads the fourth conv's output.
        assert layer.input is conv4.output
    concat = encoder.get_layer("dilation_box_concat")
    assert isinstance(concat, layers.Concatenate)
    assert concat.output.shape[-1] == 4 * 128
    assert encoder.get_layer("flatten").input is concat.output
    # The plain VAE has no box.
    names = [layer.name for layer in build_vae((32, 32), seed=0).encoder.layers]
    assert not any(n.startswith("dilation_box") for n in names)


# -------------------------------------------------------------- input size


def test_padding_rule():
    assert padded_size((300, 300), 8) == (304, 304)
    assert padded_size((300, 300), 16) == (304, 304)
    assert padded_size((128, 128), 16) == (128, 128)
    assert padding_for((300, 300), 8) == ((2, 2), (2, 2))
    assert padding_for((28, 36), 16) == ((2, 2), (6, 6))
    assert padding_for((30, 33), 8) == ((1, 1), (3, 4))
    assert stride_of("conv-ae") == 8
    assert stride_of("vae") == stride_of("dilated-vae") == 16


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("size", [(32, 32), (30, 30), (28, 36)])
def test_output_shape_equals_input_shape(kind, size):
    model = build_model(kind, size, seed=0, components=16)
    x = discs(2, size)
    y = model.predict(x, verbose=0)
    assert y.shape == x.shape and y.dtype == np.float32
    assert 0.0 <= y.min() and y.max() <= 1.0
    stride = stride_of(kind)
    needs_pad = any(s % stride for s in size)
    names = [layer.name for layer in model.encoder.layers]
    assert ("pad" in names) == needs_pad
    if needs_pad:
        assert model.encoder.get_layer("pad").padding == padding_for(size, stride)
        assert model.decoder.get_layer("crop").cropping == padding_for(size, stride)


def test_smallest_size_and_bad_shapes():
    for kind in MODEL_KINDS:
        assert build_model(kind, (8, 8), seed=0, components=16)(discs(1, (8, 8))).shape == (1, 8, 8, 1)
    with pytest.raises(ConfigError, match="at least 8"):
        build_model("vae", (7, 32))
    with pytest.raises(ConfigError, match="channels"):
        build_conv_ae((32, 32, 3))
    with pytest.raises(ConfigError, match="latent_dim"):
        build_model("vae", (32, 32), latent_dim=0)


def test_unknown_kind_is_a_config_error():
    for call in (lambda: build_model("gan", (32, 32)), lambda: stride_of("gan")):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert "'gan'" in message
        assert all(kind in message for kind in MODEL_KINDS)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_new_models_are_built(kind):
    model = build_model(kind, (28, 36), seed=0, components=16)
    assert model.built and model.count_params() > 0
    assert model.get_build_config() == {"input_shape": (None, 28, 36, 1)}


@pytest.mark.parametrize("kind", DEEP_KINDS)
def test_seed_fixes_the_initial_weights(kind):
    def weights(seed):
        return [w.numpy() for w in build_model(kind, (16, 16), seed=seed).weights]

    a, b, c = weights(3), weights(3), weights(4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


# -------------------------------------------------------------------- loss


def test_vae_loss_on_a_hand_checked_case():
    # All-ones images reconstructed as 0.5: BCE is ln 2 per pixel, 4 pixels.
    # z_mean 0, z_log_var 0 gives KL 0; z_mean 1 adds 0.5 per latent dim.
    x = np.ones((2, 2, 2, 1), np.float32)
    recon = np.full_like(x, 0.5)
    z_mean = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    z_log_var = np.zeros((2, 2), np.float32)
    total, rec, kl = (float(t) for t in vae_loss_terms(x, recon, z_mean, z_log_var))
    assert rec == pytest.approx(4 * np.log(2), rel=1e-6)
    assert kl == pytest.approx((0.0 + 1.0) / 2, rel=1e-6)
    assert total == pytest.approx(rec + kl, rel=1e-6)


def test_vae_loss_matches_a_numpy_twin():
    rng = np.random.default_rng(7)
    x = rng.uniform(size=(3, 4, 5, 1)).astype(np.float32)
    recon = rng.uniform(0.05, 0.95, size=x.shape).astype(np.float32)
    z_mean = rng.normal(size=(3, 2)).astype(np.float32)
    z_log_var = rng.normal(scale=0.5, size=(3, 2)).astype(np.float32)

    x64, r64 = x.astype(np.float64), recon.astype(np.float64)
    bce = -(x64 * np.log(r64) + (1 - x64) * np.log(1 - r64))
    want_rec = bce.sum(axis=(1, 2, 3)).mean()
    m, v = z_mean.astype(np.float64), z_log_var.astype(np.float64)
    want_kl = (-0.5 * (1 + v - m**2 - np.exp(v))).sum(axis=1).mean()

    total, rec, kl = (float(t) for t in vae_loss_terms(x, recon, z_mean, z_log_var))
    assert rec == pytest.approx(want_rec, rel=1e-5)
    assert kl == pytest.approx(want_kl, rel=1e-5)
    assert total == pytest.approx(want_rec + want_kl, rel=1e-5)


@pytest.mark.parametrize("builder", [build_vae, build_dilated_vae])
def test_vae_call_is_deterministic(builder):
    model = builder((28, 36), seed=0)
    x = discs(3, (28, 36))
    first, second = model(x).numpy(), model(x).numpy()
    np.testing.assert_array_equal(first, second)
    z_mean, _ = model.encoder(x)
    np.testing.assert_allclose(first, model.decoder(z_mean).numpy(), atol=1e-6)
    np.testing.assert_allclose(first, model.predict(x, verbose=0), atol=1e-6)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module", params=DEEP_KINDS)
def trained(request):
    """``(kind, model, history, images)`` after a few epochs on 16 discs."""
    kind = request.param
    keras.utils.set_random_seed(0)
    images, val_images = discs(16, seed=0), discs(8, seed=1)
    model = build_model(kind, (32, 32), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATES[kind]))
    history = model.fit(
        images, validation_data=val_images, epochs=EPOCHS, batch_size=8, verbose=0
    )
    return kind, model, history.history, images


def test_training_lowers_the_loss(trained):
    kind, _, history, _ = trained
    expected = {"loss", "val_loss"}
    if kind != "conv-ae":
        expected |= {"reconstruction_loss", "kl_loss",
                     "val_reconstruction_loss", "val_kl_loss"}
    assert set(history) == expected
    assert all(len(v) == EPOCHS for v in history.values())
    assert history["loss"][-1] < 0.95 * history["loss"][0]
    assert history["val_loss"][-1] < 0.95 * history["val_loss"][0]
    if kind != "conv-ae":
        # The logged total is the sum of the logged terms (vae_loss_terms).
        for prefix in ("", "val_"):
            np.testing.assert_allclose(
                history[f"{prefix}loss"],
                np.add(history[f"{prefix}reconstruction_loss"],
                       history[f"{prefix}kl_loss"]),
                rtol=1e-5,
            )


def test_training_accepts_x_x_pairs_and_datasets():
    import tensorflow as tf

    images = discs(8, seed=3)
    model = build_model("conv-ae", (32, 32), seed=0)
    model.compile(optimizer="adam")
    pairs = tf.data.Dataset.from_tensor_slices((images, images)).batch(4)
    only_x = tf.data.Dataset.from_tensor_slices(images).batch(4)
    model.fit(pairs, validation_data=only_x, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        model.evaluate(pairs, verbose=0), model.evaluate(only_x, verbose=0), rtol=1e-6
    )


def test_save_load_round_trip_and_resume(trained, tmp_path):
    kind, model, _, images = trained
    path = tmp_path / f"{kind}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects needed

    assert type(loaded) is type(model)
    assert loaded.get_layer("encoder") is loaded.encoder
    np.testing.assert_array_equal(
        loaded.predict(images, verbose=0), model.predict(images, verbose=0)
    )
    # The optimizer state (step count, Adam moments) comes back too.
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) > 0
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())

    if isinstance(model, VAE):
        # So does the sampling noise's generator: resumed training carries on
        # with the stream it would have drawn.
        np.testing.assert_array_equal(
            loaded.sampling.seed_generator.state.numpy(),
            model.sampling.seed_generator.state.numpy(),
        )

    steps = int(loaded.optimizer.iterations)
    history = loaded.fit(
        images[:8], epochs=EPOCHS + 1, initial_epoch=EPOCHS, batch_size=8, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()
    assert int(loaded.optimizer.iterations) == steps + 1
