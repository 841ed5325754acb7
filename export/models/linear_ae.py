"""The linear autoencoder: PCA held as a Keras model.

A linear autoencoder trained to convergence spans the same subspace as the
leading principal components of its training images, so it is fitted in
closed form instead: centre the images, take the ``components`` leading
right singular vectors ``W`` (``(K, P)``, P = H * W pixels), and

    encoder(x) = (x - mean) @ W.T          # (n, K) codes
    decoder(z) = z @ W + mean              # (n, P) -> (n, H, W, 1)

Both halves are single ``Dense`` layers, so the model is an ordinary
:class:`~export.models.conv_ae.Autoencoder`: it saves as ``model.keras``,
scores, calibrates and exports through tf2onnx (two MatMuls) exactly like
the convolutional models. Unlike theirs, its reconstruction is not squashed
into [0, 1]: a projection can overshoot slightly.

The castings are round parts photographed at any rotation, so by default
the fit also sees each training image turned by 90, 180 and 270 degrees and
mirrored (the eight symmetries of the square, ``augment="d4"``): the
subspace then covers orientations the training set happens to lack.
``docs/models.md`` gives the measurements behind both defaults.

    >>> model = build_linear_ae((128, 128), components=1024)
    >>> summary = fit_linear_ae(model, images)          # images: (n, 128, 128) float32
    >>> model.predict(images[..., None]).shape           # (n, 128, 128, 1)
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

#: Augmentations of the fit: none, or the eight symmetries of the square.
AUGMENTATIONS = ("none", "d4")


def build_linear_ae(input_shape, components: int = DEFAULT_COMPONENTS) -> Autoencoder:
    """An unfitted linear autoencoder: ``encoder`` and ``decoder`` of one Dense layer each.

    Args:
        input_shape: ``(height, width)`` or ``(height, width, 1)``.
        components: the code size K, at least 1 and at most H * W.

    Returns:
        An :class:`Autoencoder` with zero weights; :func:`fit_linear_ae`
        sets them.

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


def principal_components(images: np.ndarray, components: int, *, seed: int = 0,
                         overwrite: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean and leading principal axes of ``(n, H, W)`` images.

    Randomized SVD (scikit-learn's, four power iterations) when far fewer
    components than images and pixels are asked for, otherwise a full SVD;
    both give the same subspace to well within what the criteria can tell
    apart (``tests/export/test_models.py`` compares them).

    With ``overwrite``, float32 ``images`` are centred in place instead of
    copied (the augmented views of a large fit are gigabytes).

    Returns:
        ``(mean (P,), axes (K, P), explained)``: float32 mean and orthonormal
        axes, and the share of the variance the axes explain.

    Raises:
        ConfigError: more components than images or pixels.
    """
    n = images.shape[0]
    x = images.reshape(n, -1).astype(np.float32, copy=not overwrite)
    if components > min(x.shape):
        raise ConfigError(
            f"components ({components}) must not exceed the number of training images ({n}, after "
            f"augmentation) nor the pixel count ({x.shape[1]}). Choose --components {min(x.shape)} or fewer."
        )
    mean = x.mean(axis=0)
    x -= mean
    total = float(np.einsum("ij,ij->", x, x, dtype=np.float64))
    if components < min(x.shape) // 2:
        from sklearn.utils.extmath import randomized_svd

        _, s, axes = randomized_svd(x, components, n_iter=4, random_state=seed)
    else:
        _, s, axes = np.linalg.svd(x, full_matrices=False)
        s, axes = s[:components], axes[:components]
    explained = float(np.sum(s.astype(np.float64) ** 2) / total) if total > 0 else 1.0
    return mean, np.ascontiguousarray(axes, dtype=np.float32), explained


def set_components(model: Autoencoder, mean: np.ndarray, axes: np.ndarray) -> None:
    """Write a PCA's mean and axes into :func:`build_linear_ae`'s layers."""
    axes = axes.astype(np.float32)
    mean = mean.astype(np.float32)
    model.encoder.get_layer("project").set_weights([axes.T, -(mean @ axes.T)])
    model.decoder.get_layer("reconstruct").set_weights([axes, mean])


def fit_linear_ae(model: Autoencoder, images: np.ndarray, *, augment: str = "d4", seed: int = 0) -> dict:
    """Fit a linear autoencoder in closed form on normal images.

    Args:
        model: from :func:`build_linear_ae`.
        images: ``(n, H, W)`` or ``(n, H, W, 1)`` float32 in [0, 1].
        augment: ``"d4"`` (default) or ``"none"``; see the module docstring.
        seed: of the randomized SVD.

    Returns:
        ``{"images", "fitted_on", "components", "explained_variance",
        "loss"}``: the training images, how many the fit saw after
        augmentation, K, the explained share and the training MSE.

    Raises:
        ConfigError: unknown ``augment``; images that do not match the model.
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}.")
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        images = images[..., 0]
    height, width = model.encoder.input_shape[1:3]
    if images.ndim != 3 or images.shape[1:] != (height, width):
        raise ConfigError(f"images must be (n, {height}, {width}) for this model, found {images.shape}.")
    views = augment_d4(images) if augment == "d4" else images
    components = model.encoder.get_layer("project").units
    mean, axes, explained = principal_components(views, components, seed=seed, overwrite=augment == "d4")
    set_components(model, mean, axes)
    recon = model.predict(images[..., None], batch_size=64, verbose=0)[..., 0]
    return {
        "images": int(images.shape[0]),
        "fitted_on": int(views.shape[0]),
        "components": int(components),
        "explained_variance": explained,
        "loss": float(np.mean((images - recon) ** 2)),
    }
