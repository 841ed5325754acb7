"""The linear autoencoder as a Keras model: how runs made before ``model.npz`` hold it.

The linear-ae is PCA, fitted in closed form by :mod:`export.pca` and saved
as ``model.npz``; it needs no Keras. Earlier runs saved it as a Keras model
of two ``Dense`` layers sharing the axes ``W`` (``(K, P)``):

    encoder(x) = (x - mean) @ W.T          # (n, K) codes
    decoder(z) = z @ W + mean              # (n, P) -> (n, H, W, 1)

Such a ``model.keras`` still loads (its class is the shared
:class:`~export.models.conv_ae.Autoencoder`), scores and exports
(``export.linear_graph.dense_graph``). :func:`augment_d4` gives the eight
views of the square that the fit's symmetry stands for.

    >>> views = augment_d4(images)                       # (8n, H, W)
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from edge_inspect.errors import ConfigError
from export.models.conv_ae import Autoencoder, image_size

#: No padding: the linear model takes any size as is.
STRIDE = 1

#: Principal components kept unless configured.
DEFAULT_COMPONENTS = 1024



def build_linear_ae(input_shape, components: int = DEFAULT_COMPONENTS) -> Autoencoder:
    """An unfitted linear autoencoder: ``encoder`` and ``decoder`` of one Dense layer each.

    Args:
        input_shape: ``(height, width)`` or ``(height, width, 1)``.
        components: the code size K, at least 1 and at most H * W.

    Returns:
        An :class:`Autoencoder` with zero weights, the layout of an earlier
        run's ``model.keras``.

    Raises:
        ConfigError: a bad size or component count.
    """
    height, width = image_size(input_shape)
    pixels = height * width
    if not 1 <= components <= pixels:
        raise ConfigError(
            f"components must be between 1 and the pixel count {pixels} ({height}x{width}), got {components}. "
            "Choose fewer components or a larger input size."
        )
    x = keras.Input((height, width, 1), name="image")
    flat = layers.Reshape((pixels,), name="flatten")(x)
    code = layers.Dense(components, kernel_initializer="zeros", name="project")(flat)
    encoder = keras.Model(x, code, name="encoder")

    z = keras.Input((components,), name="code")
    back = layers.Dense(pixels, kernel_initializer="zeros", name="reconstruct")(z)
    out = layers.Reshape((height, width, 1), name="image_shape")(back)
    decoder = keras.Model(z, out, name="decoder")
    model = Autoencoder(encoder, decoder, name="linear_ae")
    model.build((None, height, width, 1))
    return model


def augment_d4(images: np.ndarray) -> np.ndarray:
    """The eight symmetries of the square of each image: ``(n, H, W)`` -> ``(8n, H, W)``.

    Rotations by 0, 90, 180 and 270 degrees, of the image and of its mirror
    image. Needs square images (a quarter turn swaps height and width).

    Raises:
        ConfigError: the images are not square.
    """
    if images.shape[1] != images.shape[2]:
        raise ConfigError(
            f"augment 'd4' turns images by quarter turns and needs square ones, found "
            f"{images.shape[1]}x{images.shape[2]}. Use a square --size or --augment none."
        )
    mirrored = images[:, :, ::-1]
    views = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    views += [np.rot90(mirrored, k, axes=(1, 2)) for k in range(4)]
    return np.concatenate(views)
