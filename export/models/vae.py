"""The variational autoencoder: its layers, its loss and its training step.

The encoder maps an image to ``z_mean`` and ``z_log_var`` (latent size 2 by
default); training samples ``z`` with the reparameterisation trick and
minimises reconstruction (per-image sum of pixel binary cross-entropy) plus
KL divergence, as in the keras.io VAE example. ``model(x)`` and
``model.predict(x)`` are deterministic, ``decoder(z_mean)``: the graph that is
exported to ONNX. The dilated VAE (``dilated_vae.py``) reuses everything here.

    >>> model = build_vae((128, 128, 1), seed=0)
    >>> model.compile(optimizer="adam")
    >>> history = model.fit(images, validation_data=val_images, epochs=10)
    >>> sorted(history.history)
    ['kl_loss', 'loss', 'reconstruction_loss', 'val_kl_loss', 'val_loss', ...]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
from keras import layers, ops

from edge_inspect.errors import ConfigError
from export.models.conv_ae import (
    Autoencoder,
    SeedSequence,
    crop_to_size,
    image_size,
    pad_to_stride,
    padded_size,
)

#: Four stride-2 convolutions halve the image four times.
STRIDE = 16

#: The decoder's first grid is a quarter of the padded image, 64 channels deep.
DECODER_GRID_FACTOR = 4
DECODER_GRID_CHANNELS = 64


@keras.saving.register_keras_serializable(package="edge_inspect")
class Sampling(layers.Layer):
    """Draws ``z = z_mean + exp(z_log_var / 2) * eps`` with ``eps ~ N(0, I)``.

    The noise comes from a ``keras.random.SeedGenerator``. Its state is saved
    with the model (Keras would not save it by itself), so training resumed
    from a ``.keras`` file carries on with the same noise stream.

    Args:
        seed: the generator's seed; ``None`` draws one from Keras' global seed.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        eps = keras.random.normal(ops.shape(z_mean), dtype=z_mean.dtype, seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}

    # Keras saves a layer's weights but not its SeedGenerator state, so a
    # reloaded model would replay the noise of the first steps. The layer has
    # no weights: its stored state is the generator's alone.
    def save_own_variables(self, store):
        store["seed_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        if "seed_state" in store:
            self.seed_generator.state.assign(store["seed_state"])


def vae_loss_terms(x, reconstruction, z_mean, z_log_var):
    """The VAE loss of a batch, as ``(total, reconstruction, kl)``.

    * reconstruction: binary cross-entropy summed over the pixels of each
      image, averaged over the batch;
    * kl: ``-0.5 * sum(1 + z_log_var - z_mean**2 - exp(z_log_var))`` over the
      latent dimensions, averaged over the batch;
    * total: reconstruction + kl.

    Args:
        x, reconstruction: ``(n, H, W, 1)`` float tensors in [0, 1].
        z_mean, z_log_var: ``(n, latent_dim)`` float tensors.

    Returns:
        Three scalar float32 tensors.
    """
    # keras.losses.binary_crossentropy averages over the last axis: the
    # single channel, so this is the per-pixel BCE, shape (n, H, W).
    # Under a mixed-precision policy the model's outputs are bfloat16; the loss is float32.
    reconstruction, z_mean, z_log_var = (ops.cast(t, "float32") for t in (reconstruction, z_mean, z_log_var))
    bce = keras.losses.binary_crossentropy(ops.cast(x, "float32"), reconstruction)
    reconstruction_loss = ops.mean(ops.sum(bce, axis=(1, 2)))
    kl = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
    kl_loss = ops.mean(ops.sum(kl, axis=1))
    return reconstruction_loss + kl_loss, reconstruction_loss, kl_loss


@keras.saving.register_keras_serializable(package="edge_inspect")
class VAE(Autoencoder):
    """A variational autoencoder with a custom ``train_step``.

    ``call(x)`` is the deterministic reconstruction ``decoder(z_mean)``.
    Training (and validation) sample ``z`` with :class:`Sampling` and minimise
    :func:`vae_loss_terms`; ``loss``, ``reconstruction_loss`` and ``kl_loss``
    are logged (``val_`` versions during validation). Compile with
    ``model.compile(optimizer=...)`` only; fit on batches of images alone.

    Args:
        encoder: a ``keras.Model`` named ``"encoder"``: image ->
            ``[z_mean, z_log_var]``.
        decoder: a ``keras.Model`` named ``"decoder"``: ``z`` -> image.
        seed: seed of the sampling noise; ``None`` uses Keras' global seed.
        **kwargs: ``keras.Model`` arguments (``name``, ...).
    """

    loss_names = ("loss", "reconstruction_loss", "kl_loss")

    def __init__(
        self, encoder: keras.Model, decoder: keras.Model, seed: int | None = None,
        **kwargs,
    ):
        super().__init__(encoder, decoder, **kwargs)
        self.seed = seed
        self.sampling = Sampling(seed, name="sampling")

    def call(self, x, training=False):
        """The reconstruction ``decoder(z_mean)`` of ``x``: no sampling."""
        z_mean, _ = self.encoder(x, training=training)
        return self.decoder(z_mean, training=training)

    def loss_terms(self, x, training: bool) -> dict:
        """The sampled VAE loss of a batch: see :func:`vae_loss_terms`."""
        z_mean, z_log_var = self.encoder(x, training=training)
        z = self.sampling([z_mean, z_log_var])
        reconstruction = self.decoder(z, training=training)
        total, rec, kl = vae_loss_terms(x, reconstruction, z_mean, z_log_var)
        return {"loss": total, "reconstruction_loss": rec, "kl_loss": kl}

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def build_vae_encoder(
    size: tuple[int, int],
    latent_dim: int,
    seeds: SeedSequence,
    bottleneck: Callable | None = None,
) -> keras.Model:
    """The VAE encoder: four 3x3 stride-2 convs, Dense 64, z_mean, z_log_var.

    Args:
        size: the image's ``(H, W)``; it is zero-padded to multiples of 16.
        latent_dim: size of ``z_mean`` and ``z_log_var``.
        seeds: where the initializers come from.
        bottleneck: ``f(tensor, seeds) -> tensor`` applied after the fourth
            conv, before ``Flatten`` (the dilation box); ``None`` for none.

    Returns:
        A ``keras.Model`` named ``"encoder"``: image -> ``[z_mean, z_log_var]``.
    """
    image = keras.Input(shape=(*size, 1), name="image")
    x = pad_to_stride(image, size, STRIDE)
    for i, filters in enumerate((64, 128, 128, 128), start=1):
        x = layers.Conv2D(
            filters, 3, strides=2, padding="same", activation="relu",
            kernel_initializer=seeds.initializer(), name=f"conv{i}",
        )(x)
    if bottleneck is not None:
        x = bottleneck(x, seeds)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(
        64, activation="relu", kernel_initializer=seeds.initializer(), name="dense"
    )(x)
    z_mean = layers.Dense(
        latent_dim, kernel_initializer=seeds.initializer(), name="z_mean"
    )(x)
    z_log_var = layers.Dense(
        latent_dim, kernel_initializer=seeds.initializer(), name="z_log_var"
    )(x)
    return keras.Model(image, [z_mean, z_log_var], name="encoder")


def build_vae_decoder(
    size: tuple[int, int], latent_dim: int, seeds: SeedSequence
) -> keras.Model:
    """The VAE decoder: Dense to a quarter-size 64-channel grid, two transposed convs.

    ``Dense(H'/4 * W'/4 * 64, relu)`` -> ``Reshape`` -> ``Conv2DTranspose``
    64 3x3 stride 2 (ReLU) -> ``Conv2DTranspose`` 1 3x3 stride 2 (sigmoid),
    which gives the padded ``(H', W')`` image, then a crop back to ``size``.

    Returns:
        A ``keras.Model`` named ``"decoder"``: ``z`` -> ``(H, W, 1)`` image.
    """
    grid = tuple(p // DECODER_GRID_FACTOR for p in padded_size(size, STRIDE))
    z = keras.Input(shape=(latent_dim,), name="z")
    y = layers.Dense(
        grid[0] * grid[1] * DECODER_GRID_CHANNELS, activation="relu",
        kernel_initializer=seeds.initializer(), name="dense",
    )(z)
    y = layers.Reshape((*grid, DECODER_GRID_CHANNELS), name="reshape")(y)
    y = layers.Conv2DTranspose(
        64, 3, strides=2, padding="same", activation="relu",
        kernel_initializer=seeds.initializer(), name="deconv1",
    )(y)
    y = layers.Conv2DTranspose(
        1, 3, strides=2, padding="same", activation="sigmoid",
        kernel_initializer=seeds.initializer(), name="reconstruction",
    )(y)
    y = crop_to_size(y, size, STRIDE)
    return keras.Model(z, y, name="decoder")


def build_vae(
    input_shape: Sequence[int],
    latent_dim: int = 2,
    *,
    seed: int | None = None,
    name: str = "vae",
    bottleneck: Callable | None = None,
) -> VAE:
    """The paper's VAE (see :func:`build_vae_encoder`, :func:`build_vae_decoder`).

    Args:
        input_shape: ``(H, W)`` or ``(H, W, 1)``, both sides at least 8;
            sides that are not multiples of 16 are zero-padded inside the
            encoder and cropped back at the end of the decoder.
        latent_dim: size of the latent space (the paper: 2).
        seed: fixes every initial weight and the sampling noise; ``None``
            uses Keras' global seed.
        name: the model's name.
        bottleneck: see :func:`build_vae_encoder`; the dilated VAE's hook.

    Returns:
        An uncompiled :class:`VAE` with sub-models ``"encoder"`` and
        ``"decoder"`` (also ``model.encoder`` and ``model.decoder``).

    Raises:
        ConfigError: an invalid ``input_shape`` or ``latent_dim``.
    """
    size = image_size(input_shape)
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ConfigError(
            f"latent_dim must be a positive integer, got {latent_dim!r}; "
            "the paper uses 2."
        )
    seeds = SeedSequence(seed)
    encoder = build_vae_encoder(size, latent_dim, seeds, bottleneck)
    decoder = build_vae_decoder(size, latent_dim, seeds)
    model = VAE(encoder, decoder, seed=seeds.seed(), name=name)
    model.build((None, *size, 1))
    return model
