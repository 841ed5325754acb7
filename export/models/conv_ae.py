"""The convolutional autoencoder, and what every model of the package shares.

This module owns the plain autoencoder of the paper (three 5x5 conv + pool
stages down, three 5x5 stride-2 transposed convs up, MSE loss) and the pieces
the VAEs reuse: the input-size rule (zero-pad to a multiple of the model's
stride inside the encoder, crop back at the end of the decoder), the seeded
initializers, and :class:`Autoencoder`, the ``keras.Model`` that trains from
batches of images alone.

    >>> model = build_conv_ae((300, 300, 1), seed=0)   # padded to 304 inside
    >>> model.compile(optimizer="adam")
    >>> model.fit(images, validation_data=val_images, epochs=10)   # x only
    >>> model.predict(images).shape                    # (n, 300, 300, 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from edge_inspect.errors import ConfigError

#: The conv AE halves the image three times (2x2 max pooling).
STRIDE = 8

#: Smallest height and width any model accepts.
MIN_SIZE = 8


# ---------------------------------------------------------------- input size


def image_size(input_shape: Sequence[int]) -> tuple[int, int]:
    """Validate a model input shape and return its ``(height, width)``.

    Args:
        input_shape: ``(height, width)`` or ``(height, width, 1)``.

    Returns:
        ``(height, width)`` as Python ints.

    Raises:
        ConfigError: not two sizes (plus an optional single channel), a size
            below :data:`MIN_SIZE`, or more than one channel.
    """
    shape = tuple(input_shape)
    if len(shape) == 3 and shape[2] != 1:
        raise ConfigError(
            f"Model input shape {shape!r} has {shape[2]} channels; the models "
            "take grayscale images, shape (height, width) or (height, width, 1)."
        )
    if len(shape) not in (2, 3) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape
    ):
        raise ConfigError(
            f"Model input shape {shape!r} is not (height, width) or "
            "(height, width, 1) with integer sizes."
        )
    height, width = int(shape[0]), int(shape[1])
    if min(height, width) < MIN_SIZE:
        raise ConfigError(
            f"Model input size {height}x{width} is too small: both sides must "
            f"be at least {MIN_SIZE} pixels. Choose a larger input size."
        )
    return height, width


def padded_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Round ``(height, width)`` up to the next multiples of ``stride``.

    >>> padded_size((300, 300), 8), padded_size((28, 36), 16)
    ((304, 304), (32, 48))
    """
    return tuple(math.ceil(s / stride) * stride for s in size)


def padding_for(size: tuple[int, int], stride: int) -> tuple[tuple[int, int], ...]:
    """The ``((top, bottom), (left, right))`` zero padding up to ``stride``.

    The padding is split evenly, the odd pixel going to the bottom or right,
    so that a centred part stays centred.

    >>> padding_for((300, 301), 8)
    ((2, 2), (1, 2))
    """
    amounts = []
    for s, p in zip(size, padded_size(size, stride)):
        extra = p - s
        amounts.append((extra // 2, extra - extra // 2))
    return tuple(amounts)


def pad_to_stride(x, size: tuple[int, int], stride: int):
    """Apply a ``ZeroPadding2D`` named ``"pad"`` when ``size`` needs one."""
    padding = padding_for(size, stride)
    if padding == ((0, 0), (0, 0)):
        return x
    return layers.ZeroPadding2D(padding, name="pad")(x)


def crop_to_size(x, size: tuple[int, int], stride: int):
    """Undo :func:`pad_to_stride` with a ``Cropping2D`` named ``"crop"``."""
    padding = padding_for(size, stride)
    if padding == ((0, 0), (0, 0)):
        return x
    return layers.Cropping2D(padding, name="crop")(x)


# --------------------------------------------------------------------- seeds


class SeedSequence:
    """Hands out one seeded initializer (or seed) per layer from a base seed.

    With ``seed=None`` it returns the initializer's name, so Keras draws from
    its global generator (set with ``keras.utils.set_random_seed``); with an
    int every layer gets its own seed drawn from a NumPy generator, so a base
    seed fixes every weight of the model whatever the global state.

    >>> seeds = SeedSequence(0)
    >>> layers.Dense(4, kernel_initializer=seeds.initializer("he_normal"))
    """

    _INITIALIZERS = {
        "glorot_uniform": keras.initializers.GlorotUniform,
        "he_normal": keras.initializers.HeNormal,
    }

    def __init__(self, seed: int | None):
        self._rng = None if seed is None else np.random.default_rng(seed)

    def seed(self) -> int | None:
        """The next seed, or ``None`` when unseeded."""
        if self._rng is None:
            return None
        return int(self._rng.integers(0, 2**31 - 1))

    def initializer(self, name: str = "glorot_uniform"):
        """A kernel initializer: ``name`` itself, or a seeded instance of it."""
        seed = self.seed()
        if seed is None:
            return name
        return self._INITIALIZERS[name](seed=seed)


# ------------------------------------------------------------------- model


def mse_loss(x, reconstruction):
    """Mean squared error over pixels and batch: the conv AE's loss.

    Args:
        x, reconstruction: float tensors of the same shape ``(n, H, W, 1)``.

    Returns:
        A scalar float32 tensor.
    """
    # Under a mixed-precision policy the reconstruction is bfloat16 or float16.
    return keras.ops.mean(keras.ops.square(x - keras.ops.cast(reconstruction, x.dtype)))


def images_of(data):
    """The images of a training batch: ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, w)``.

    The target is always the input itself, so ``y`` and sample weights are
    ignored; ``(x, x)`` pairs therefore train exactly like ``x`` alone.
    """
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    return x


@keras.saving.register_keras_serializable(package="edge_inspect")
class Autoencoder(keras.Model):
    """An ``encoder`` -> ``decoder`` pair that trains from images alone.

    ``call(x)`` is ``decoder(encoder(x))``: the reconstruction, of the same
    shape as ``x``. Training minimises :func:`mse_loss` between the two, so
    ``model.compile(optimizer=...)`` (no ``loss``: the model owns its loss;
    one passed to ``compile`` is ignored) then ``model.fit(x_batches,
    validation_data=...)`` is all it takes. Logged: ``loss``.

    Subclasses change :meth:`loss_terms` and ``loss_names``; the VAE does.

    Args:
        encoder: a ``keras.Model`` named ``"encoder"`` taking ``(H, W, 1)``.
        decoder: a ``keras.Model`` named ``"decoder"`` returning ``(H, W, 1)``.
        **kwargs: ``keras.Model`` arguments (``name``, ...).
    """

    #: The terms :meth:`loss_terms` returns, each tracked with a Mean metric.
    loss_names: tuple[str, ...] = ("loss",)

    def __init__(self, encoder: keras.Model, decoder: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.trackers = [keras.metrics.Mean(name=n) for n in self.loss_names]

    def build(self, input_shape):
        """Record the input shape; every variable lives in the sub-models.

        The builders call it, so a new model is built (``count_params()``
        works) and a loaded one is rebuilt from its saved build config before
        its optimizer variables are created and restored.
        """
        del input_shape  # the functional sub-models are built at construction

    def call(self, x, training=False):
        """The reconstruction of ``x``, shape ``(n, H, W, 1)``, in [0, 1]."""
        return self.decoder(self.encoder(x, training=training), training=training)

    def loss_terms(self, x, training: bool) -> dict:
        """The loss of a batch, as a dict with at least the key ``"loss"``."""
        return {"loss": mse_loss(x, self(x, training=training))}

    @property
    def metrics(self):
        # Listed here so that Keras resets them at the start of each epoch.
        return self.trackers

    def _record(self, terms: dict) -> dict:
        for tracker in self.trackers:
            tracker.update_state(terms[tracker.name])
        return {tracker.name: tracker.result() for tracker in self.trackers}

    def train_step(self, data):
        x = images_of(data)
        with tf.GradientTape() as tape:
            terms = self.loss_terms(x, training=True)
        grads = tape.gradient(terms["loss"], self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return self._record(terms)

    def test_step(self, data):
        return self._record(self.loss_terms(images_of(data), training=False))

    def get_config(self):
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        decoder = keras.saving.deserialize_keras_object(config.pop("decoder"))
        return cls(encoder=encoder, decoder=decoder, **config)


# ----------------------------------------------------------------- builder


def build_conv_ae(
    input_shape: Sequence[int], *, seed: int | None = None, name: str = "conv_ae"
) -> Autoencoder:
    """The paper's convolutional autoencoder.

    Encoder: ``Conv2D`` 5x5 with 32, 64 and 128 filters (ReLU, same padding),
    each followed by 2x2 ``MaxPooling2D``. Decoder: ``Conv2DTranspose`` 5x5
    stride 2 with 128, 64 and 32 filters (ReLU, same), then ``Conv2D`` 5x5
    with one filter and a sigmoid. Loss: MSE. An input whose sides are not
    multiples of 8 is zero-padded to the next multiples in the encoder and
    cropped back at the end of the decoder.

    Args:
        input_shape: ``(H, W)`` or ``(H, W, 1)``, both sides at least 8.
        seed: fixes every initial weight; ``None`` uses Keras' global seed.
        name: the model's name.

    Returns:
        An uncompiled :class:`Autoencoder` with sub-models ``"encoder"``
        (image -> ``(H'/8, W'/8, 128)``, H' and W' the padded sizes) and
        ``"decoder"`` (that grid -> ``(H, W, 1)`` image).

    Raises:
        ConfigError: an invalid ``input_shape``.
    """
    size = image_size(input_shape)
    grid = tuple(p // STRIDE for p in padded_size(size, STRIDE))
    seeds = SeedSequence(seed)

    image = keras.Input(shape=(*size, 1), name="image")
    x = pad_to_stride(image, size, STRIDE)
    for i, filters in enumerate((32, 64, 128), start=1):
        x = layers.Conv2D(
            filters, 5, padding="same", activation="relu",
            kernel_initializer=seeds.initializer(), name=f"conv{i}",
        )(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    encoder = keras.Model(image, x, name="encoder")

    latent = keras.Input(shape=(*grid, 128), name="latent")
    y = latent
    for i, filters in enumerate((128, 64, 32), start=1):
        y = layers.Conv2DTranspose(
            filters, 5, strides=2, padding="same", activation="relu",
            kernel_initializer=seeds.initializer(), name=f"deconv{i}",
        )(y)
    y = layers.Conv2D(
        1, 5, padding="same", activation="sigmoid",
        kernel_initializer=seeds.initializer(), name="reconstruction",
    )(y)
    y = crop_to_size(y, size, STRIDE)
    decoder = keras.Model(latent, y, name="decoder")

    model = Autoencoder(encoder, decoder, name=name)
    model.build((None, *size, 1))
    return model
