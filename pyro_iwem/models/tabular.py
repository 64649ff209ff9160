"""The paper's model for (standardised, continuous) UCI data, after MIWAE."""

import pyro.distributions as dist
from torch import nn

from .layers import MLP, GaussianHead, StudentTHead, gaussian_mlp, glorot_init_
from .vae import VAE

_HEADS = {"gaussian": GaussianHead, "studentt": StudentTHead}


class TabularVAE(VAE):
    r"""A VAE for continuous tabular data with missing entries, in the setting of Mattei &
    Frellsen (2018, MIWAE) used by the IWEM paper for the UCI experiments.

    - encoder: ``x (D) -> n_hidden x [hidden tanh] -> (loc, scale)`` of a Normal over
      ``z (z_dim)``, ``scale = softplus(.) + min_scale``; the caller feeds ``x`` with its
      missing entries filled in (zeros, i.e. the mean of standardised data, as in MIWAE);
    - prior: ``z ~ Normal(0, I)``;
    - decoder: ``z -> n_hidden x [hidden tanh] ->`` per-entry parameters, ``scale =
      softplus(.) + obs_min_scale`` (MIWAE's floor 1e-3 keeps the likelihood bounded) and

      * ``likelihood="gaussian"`` (default): ``x_d | z ~ Normal(loc_d, scale_d)``;
      * ``likelihood="studentt"``: ``x_d | z ~ StudentT(df_d, loc_d, scale_d)``, ``df = 3 +
        softplus(.)``, MIWAE's decoder.

      The IWEM paper does not state its UCI likelihood; Gaussian is the default as the
      plainest choice, and Student-t reproduces MIWAE. Both have ``E[x | z] = loc``.

    Weights are Glorot-uniform and biases zero.

    :param int x_dim: number of features D.
    :param z_dim: latent dimension; ``None`` means ``max(x_dim - 1, 1)`` (MIWAE's UCI rule,
        d = p - 1).
    :param int hidden: units per hidden layer (MIWAE: 128).
    :param int n_hidden: hidden layers in the encoder and in the decoder (MIWAE: 3).
    :param activation: hidden activation, a module class (MIWAE: tanh).
    :param str likelihood: ``"gaussian"`` or ``"studentt"``.
    :param float min_scale: floor of the guide's standard deviation.
    :param float obs_min_scale: floor of the decoder's scale.
    """

    def __init__(
        self,
        x_dim,
        z_dim=None,
        hidden=128,
        n_hidden=3,
        activation=nn.Tanh,
        likelihood="gaussian",
        min_scale=1e-4,
        obs_min_scale=1e-3,
    ):
        if likelihood not in _HEADS:
            raise ValueError(f"likelihood must be one of {sorted(_HEADS)}, got {likelihood!r}")
        if z_dim is None:
            z_dim = max(x_dim - 1, 1)
        super().__init__(z_dim)
        self.x_dim = x_dim
        self.likelihood_name = likelihood
        sizes = (hidden,) * n_hidden
        self.encoder = gaussian_mlp(x_dim, sizes, z_dim, activation, min_scale)
        body = MLP(z_dim, sizes, activation=activation)
        self.decoder = nn.Sequential(body, _HEADS[likelihood](body.out_dim, x_dim, min_scale=obs_min_scale))
        glorot_init_(self)

    def likelihood(self, z):
        """Element-wise Normal or StudentT over the ``x_dim`` features, batch ``(..., x_dim)``."""
        params = self.decode(z)
        if self.likelihood_name == "studentt":
            loc, scale, df = params
            return dist.StudentT(df, loc, scale)
        return dist.Normal(*params)

    def decoder_mean(self, z):
        """``E[x | z] = loc``, shape ``(..., x_dim)`` (used for imputation)."""
        return self.decode(z)[0]
