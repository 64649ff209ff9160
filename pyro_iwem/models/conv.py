"""The paper's convolutional model: a gated-convolution VAE after Tomczak & Welling (2017)."""

import math

import torch
from torch import nn

from .layers import Gated, GaussianHead, apply_flat, glorot_init_
from .vae import VAE

#: Encoder gated convolutions ``(out_channels, kernel_size, stride, padding)`` of Tomczak &
#: Welling's convolutional VAEs (their ``q(z2|x)`` in ``convHVAE_2level``): 28x28 -> 7x7x6.
TW_ENCODER = ((32, 7, 1, 3), (32, 3, 2, 1), (64, 5, 1, 2), (64, 3, 2, 1), (6, 3, 1, 1))
#: Decoder gated 3x3 convolutions (output channels) of the same model, all at full resolution.
TW_DECODER = (64, 64, 64, 64)


class ConvVAE(VAE):
    r"""A VAE with gated convolutional encoder and decoder for binary images, after the
    convolutional VAE of Tomczak & Welling (2017), "VAE with a VampPrior", with one
    40-d Gaussian latent layer and a standard Normal prior (the IWEM paper's CNN).

    A gated layer is ``h = a(x) * sigmoid(g(x))`` (see :class:`~pyro_iwem.models.layers.Gated`).

    - encoder: image ``(1, H, W)`` -> gated convs ``encoder_layers`` (default 1->32 k7 s1,
      32->32 k3 s2, 32->64 k5 s1, 64->64 k3 s2, 64->6 k3 s1: 28x28 -> 6x7x7 = 294 features)
      -> linear ``(loc, scale)``, ``scale = softplus(.) + min_scale`` (Tomczak & Welling use a
      hard-tanh-clipped log-variance; we share the MLP models' head);
    - prior: ``z ~ Normal(0, I)``;
    - decoder: ``z`` -> gated linear to ``H*W``, reshaped to ``(1, H, W)`` -> gated
      ``decoder_kernel`` x ``decoder_kernel`` convs with ``decoder_channels`` channels at full
      resolution (default 4 x 64, 3x3) -> 1x1 conv to one channel of logits, flattened to
      ``H*W``; ``x | z ~ Bernoulli(logits)``.

    The decoder dominates the cost, as it runs once per particle: with the defaults about
    1.7e8 multiply-adds per latent sample against 3.4e5 for the MLP decoder (the encoder,
    run once per datum, 3.0e7 against 3.5e5), which wants a GPU for K = J = 50. A lighter
    variant is e.g. ``decoder_channels=(32, 32)`` (1.5e7 per sample).

    Weights are Glorot-uniform and biases zero. The networks accept any leading batch dims
    (they are flattened into one for the convolutions and restored).

    :param int z_dim: latent dimension.
    :param image_shape: ``(H, W)``; ``x`` has ``H*W`` entries in row-major order.
    :param encoder_layers: ``(out_channels, kernel, stride, padding)`` per encoder gated conv.
    :param decoder_channels: output channels per decoder gated conv (stride 1, "same" padding).
    :param int decoder_kernel: odd kernel size of the decoder convs.
    :param float proposal_scale: multiplies the guide's standard deviation.
    :param float min_scale: floor of the guide's standard deviation.
    """

    def __init__(
        self,
        z_dim=40,
        image_shape=(28, 28),
        encoder_layers=TW_ENCODER,
        decoder_channels=TW_DECODER,
        decoder_kernel=3,
        proposal_scale=1.0,
        min_scale=1e-4,
    ):
        super().__init__(z_dim, proposal_scale)
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
        self.encoder = nn.Sequential(features, GaussianHead(n_features, z_dim, min_scale))

        layers, channels = [Gated(nn.Linear, z_dim, self.x_dim), nn.Unflatten(1, image)], 1
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
