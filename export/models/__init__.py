"""The paper's three anomaly-detection models and the linear baseline, behind one builder.

``build_model(kind, input_size)`` returns an uncompiled ``keras.Model`` whose
``model(x)`` / ``model.predict(x)`` is the deterministic reconstruction of
``x``: shape ``(n, H, W, 1)`` float32 in [0, 1] in, same shape in [0, 1] out,
for any ``H, W >= 8`` (sizes off the model's stride are zero-padded inside
and cropped back). Every model has ``encoder`` and ``decoder`` sub-models,
owns its loss and trains from batches of images alone, except ``linear-ae``,
which is fitted in closed form without Keras (:mod:`export.pca`). See docs/models.md.

    >>> model = build_model("dilated-vae", (300, 300), seed=0)
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> history = model.fit(train_images, validation_data=val_images, epochs=50)
"""

from __future__ import annotations

import keras

from edge_inspect.card import MODEL_KINDS
from edge_inspect.errors import ConfigError
from export.models import conv_ae, linear_ae, vae
from export.models.conv_ae import Autoencoder, build_conv_ae
from export.models.dilated_vae import build_dilated_vae
from export.models.linear_ae import build_linear_ae
from export.models.vae import VAE, Sampling, build_vae, vae_loss_terms


#: The kinds trained by gradient descent, epoch by epoch.
DEEP_KINDS = ("conv-ae", "vae", "dilated-vae")

_STRIDES = {"linear-ae": linear_ae.STRIDE, "conv-ae": conv_ae.STRIDE, "vae": vae.STRIDE, "dilated-vae": vae.STRIDE}

__all__ = [
    "DEEP_KINDS",
    "MODEL_KINDS",
    "VAE",
    "Autoencoder",
    "Sampling",
    "build_conv_ae",
    "build_dilated_vae",
    "build_linear_ae",
    "build_model",
    "build_vae",
    "stride_of",
    "vae_loss_terms",
]


def _check_kind(kind: str) -> str:
    if kind not in MODEL_KINDS:
        raise ConfigError(
            f"Unknown model kind {kind!r}. Expected one of: "
            f"{', '.join(MODEL_KINDS)}."
        )
    return kind


def stride_of(kind: str) -> int:
    """The multiple an input side is zero-padded to inside a ``kind`` model.

    >>> stride_of("conv-ae"), stride_of("vae")
    (8, 16)

    Raises:
        ConfigError: an unknown ``kind``.
    """
    return _STRIDES[_check_kind(kind)]


def build_model(
    kind: str,
    input_size: tuple[int, int],
    *,
    latent_dim: int = 2,
    components: int = linear_ae.DEFAULT_COMPONENTS,
    seed: int | None = None,
) -> keras.Model:
    """Build an uncompiled model of the given kind.

    Args:
        kind: one of :data:`MODEL_KINDS`.
        input_size: ``(height, width)`` of the images, both at least 8.
        latent_dim: the VAEs' latent size; the other kinds ignore it.
        components: the linear AE's code size; the other kinds ignore it.
        seed: fixes every initial weight (and the VAEs' sampling noise);
            ``None`` uses Keras' global seed (``keras.utils.set_random_seed``).

    Returns:
        An :class:`Autoencoder` (linear-ae, conv-ae) or :class:`VAE` (vae,
        dilated-vae). Compile and fit the deep ones on images; fit the
        linear one with :func:`export.pca.fit_pca` (this Keras form is how
        earlier runs saved it).

    Raises:
        ConfigError: an unknown ``kind``, or an invalid size or latent size.
    """
    _check_kind(kind)
    if kind == "linear-ae":
        return build_linear_ae(input_size, components)
    if kind == "conv-ae":
        return build_conv_ae(input_size, seed=seed)
    if kind == "vae":
        return build_vae(input_size, latent_dim, seed=seed)
    return build_dilated_vae(input_size, latent_dim, seed=seed)
