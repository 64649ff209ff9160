"""The paper's convolutional model: a gated-convolution VAE after Tomczak & Welling (2017)."""

import math

import torch
from torch import nn

from .layers import ClampedLogVarHead, Gated, GaussianHead, apply_flat, glorot_init_
from .vae import VAE

#: Encoder gated convolutions ``(out_channels, kernel_size, stride, padding)`` of Tomczak &
#: Welling's convolutional VAEs (their ``q(z2|x)`` in ``convHVAE_2level``): 28x28 -> 7x7x6.
TW_ENCODER = ((32, 7, 1, 3), (32, 3, 2, 1), (64, 5, 1, 2), (64, 3, 2, 1), (6, 3, 1, 1))
#: Decoder gated 3x3 convolutions (output channels) of the same model, all at full resolution.
TW_DECODER = (64, 64, 64, 64)
#: Hidden gated dense layers of the official IWEM CNN's decoder, between ``z`` and the image.
TW_DECODER_HIDDEN = (300,)
#: The interval of the encoder's log-variance (Tomczak & Welling's ``Hardtanh(-6, 2)``).
TW_LOGVAR_BOUNDS = (-6.0, 2.0)


class ConvVAE(VAE):
    r"""The IWEM paper's CNN for binary images (``--model cnn``): a VAE with a gated
    convolutional encoder and decoder after Tomczak & Welling (2017), "VAE with a VampPrior",
    with one 40-d Gaussian latent layer and a standard Normal prior.

    A gated layer is ``h = a(x) * sigmoid(g(x))`` (see :class:`~pyro_iwem.models.layers.Gated`),
    with no other activation.

    - encoder: image ``(1, H, W)`` -> gated convs ``encoder_layers`` (default 1->32 k7 s1,
      32->32 k3 s2, 32->64 k5 s1, 64->64 k3 s2, 64->6 k3 s1: 28x28 -> 6x7x7 = 294 features)
      -> ``loc`` by a linear layer and ``logvar`` by a linear layer clamped to
      ``logvar_bounds`` by a hard tanh (default [-6, 2]), ``scale = exp(logvar / 2)`` (see
      :class:`~pyro_iwem.models.layers.ClampedLogVarHead`);
    - prior: ``z ~ Normal(0, I)``;
    - decoder: ``z`` -> gated dense layers ``decoder_hidden`` (default one of 300 units) ->
      gated dense to ``H*W``, reshaped to ``(1, H, W)`` -> gated ``decoder_kernel`` x
      ``decoder_kernel`` convs with ``decoder_channels`` channels at full resolution (default
      4 x 64, 3x3, stride 1, "same" padding) -> 1x1 conv to one channel of logits, flattened
      to ``H*W``; ``x | z ~ Bernoulli(logits)``.

    With the defaults and 28x28 images the encoder has 228 604 parameters and the decoder
    719 481 (948 085 in all; ``tests/test_models.py`` writes the sum out layer by layer).

    The decoder dominates the cost, as it runs once per particle: about 1.7e8 multiply-adds
    per latent sample (nearly all in the four full-resolution convolutions) against 3.4e5 for
    the MLP decoder (the encoder, run once per datum, 3.0e7 against 3.5e5), which wants a GPU
    for K = J = 50. A lighter variant is e.g. ``decoder_channels=(32, 32)`` (1.5e7 per sample);
    :class:`ConvVAELight` is this package's earlier CNN.

    Weights are Glorot-uniform and biases zero. The networks accept any leading batch dims
    (they are flattened into one for the convolutions and restored).

    :param int z_dim: latent dimension.
    :param image_shape: ``(H, W)``; ``x`` has ``H*W`` entries in row-major order.
    :param encoder_layers: ``(out_channels, kernel, stride, padding)`` per encoder gated conv.
    :param decoder_hidden: units per gated dense layer between ``z`` and the ``H*W`` one
        (possibly empty).
    :param decoder_channels: output channels per decoder gated conv (stride 1, "same" padding).
    :param int decoder_kernel: odd kernel size of the decoder convs.
    :param logvar_bounds: ``(lo, hi)`` of the encoder's clamped log-variance; ``None`` for the
        MLP models' head instead, ``scale = softplus(.) + min_scale``
        (:class:`~pyro_iwem.models.layers.GaussianHead`).
    :param float min_scale: floor of the guide's standard deviation with ``logvar_bounds=None``
        (unused otherwise: the clamp bounds the scale).
    """

    def __init__(
        self,
        z_dim=40,
        image_shape=(28, 28),
        encoder_layers=TW_ENCODER,
        decoder_hidden=TW_DECODER_HIDDEN,
        decoder_channels=TW_DECODER,
        decoder_kernel=3,
        logvar_bounds=TW_LOGVAR_BOUNDS,
        min_scale=1e-4,
    ):
        super().__init__(z_dim)
        if decoder_kernel % 2 != 1:
            raise ValueError(f"decoder_kernel must be odd, got {decoder_kernel}")
        self.image_shape = tuple(image_shape)
        self.x_dim = math.prod(self.image_shape)
        image = (1,) + self.image_shape

        convs, channels = [], 1
        for out_channels, kernel, stride, padding in encoder_layers:
            convs.append(Gated(nn.Conv2d, channels, out_channels, kernel, stride, padding))
            channels = out_channels
        features = nn.Sequential(nn.Unflatten(1, image), *convs, nn.Flatten())
        with torch.no_grad():
            n_features = features(torch.zeros(1, self.x_dim)).shape[-1]
        if logvar_bounds is None:
            head = GaussianHead(n_features, z_dim, min_scale)
        else:
            head = ClampedLogVarHead(n_features, z_dim, logvar_bounds)
        self.encoder = nn.Sequential(features, head)

        layers, width = [], z_dim
        for units in tuple(decoder_hidden) + (self.x_dim,):
            layers.append(Gated(nn.Linear, width, units))
            width = units
        layers.append(nn.Unflatten(1, image))
        channels = 1
        for out_channels in decoder_channels:
            layers.append(Gated(nn.Conv2d, channels, out_channels, decoder_kernel, 1, decoder_kernel // 2))
            channels = out_channels
        layers += [nn.Conv2d(channels, 1, 1), nn.Flatten()]
        self.decoder = nn.Sequential(*layers)
        glorot_init_(self)

    def encode(self, x):
        return apply_flat(self.encoder, x)

    def decode(self, z):
        return apply_flat(self.decoder, z)


class ConvVAELight(ConvVAE):
    r"""This package's first CNN (``--model cnn-light``): :class:`ConvVAE` with the same
    encoder convolutions and decoder convolutions, but

    - decoder: ``z`` goes to ``H*W`` with one gated dense layer (no hidden dense layer);
    - encoder head: ``scale = softplus(.) + min_scale``, the MLP models'
      :class:`~pyro_iwem.models.layers.GaussianHead`, instead of the clamped log-variance.

    It has fewer parameters (decoder 287 201 against 719 481 for 28x28 images) but about the
    same cost per latent sample, which the full-resolution convolutions dominate. It keeps runs
    made before the paper's network became ``cnn`` loadable.

    Takes :class:`ConvVAE`'s parameters, with the defaults ``decoder_hidden=()`` and
    ``logvar_bounds=None``.
    """

    def __init__(
        self,
        z_dim=40,
        image_shape=(28, 28),
        encoder_layers=TW_ENCODER,
        decoder_hidden=(),
        decoder_channels=TW_DECODER,
        decoder_kernel=3,
        logvar_bounds=None,
        min_scale=1e-4,
    ):
        super().__init__(
            z_dim, image_shape, encoder_layers, decoder_hidden, decoder_channels, decoder_kernel, logvar_bounds,
            min_scale,
        )
