"""The VAE with a dilation box in the encoder's bottleneck.

The dilation box sits after the encoder's four convolutions and before
``Flatten``: four parallel 3x3 ``Conv2D`` with 128 filters, ``he_normal``
initialisation, same padding and dilation rates 1, 2, 4 and 8, concatenated
into 512 channels. It widens the receptive field at the bottleneck without
losing resolution. Everything else (decoder, loss, training) is the VAE's.

    >>> model = build_dilated_vae((300, 300, 1), seed=0)
    >>> model.get_layer("encoder").get_layer("dilation_box_r8").dilation_rate
    (8, 8)
"""

from __future__ import annotations

from collections.abc import Sequence

from keras import layers

from export.models.conv_ae import SeedSequence
from export.models.vae import VAE, build_vae

#: Dilation rates of the box's parallel branches.
DILATION_RATES = (1, 2, 4, 8)

#: Filters of each branch.
DILATION_FILTERS = 128


def dilation_box(x, seeds: SeedSequence):
    """Four parallel dilated 3x3 convolutions of ``x``, concatenated.

    The branches are named ``dilation_box_r1`` ... ``dilation_box_r8`` and the
    concatenation ``dilation_box_concat``. The paper gives no activation;
    they use ReLU, which is what ``he_normal`` is made for.

    Args:
        x: a ``(h, w, c)`` feature map (symbolic tensor).
        seeds: where the initializers come from.

    Returns:
        The ``(h, w, 512)`` concatenation.
    """
    branches = [
        layers.Conv2D(
            DILATION_FILTERS, 3, padding="same", dilation_rate=rate,
            activation="relu", kernel_initializer=seeds.initializer("he_normal"),
            name=f"dilation_box_r{rate}",
        )(x)
        for rate in DILATION_RATES
    ]
    return layers.Concatenate(name="dilation_box_concat")(branches)


def build_dilated_vae(
    input_shape: Sequence[int],
    latent_dim: int = 2,
    *,
    seed: int | None = None,
    name: str = "dilated_vae",
) -> VAE:
    """The paper's VAE with a dilation box (see :func:`dilation_box`).

    Args:
        input_shape: ``(H, W)`` or ``(H, W, 1)``, both sides at least 8;
            padded to multiples of 16 inside, cropped back at the end.
        latent_dim: size of the latent space (the paper: 2).
        seed: fixes every initial weight and the sampling noise.
        name: the model's name.

    Returns:
        An uncompiled :class:`~export.models.vae.VAE`.

    Raises:
        ConfigError: an invalid ``input_shape`` or ``latent_dim``.
    """
    return build_vae(
        input_shape, latent_dim, seed=seed, name=name, bottleneck=dilation_box
    )
