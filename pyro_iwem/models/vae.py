"""Variational autoencoders as Pyro model/guide pairs: the base class and the MLP models."""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_iwem.infer.masked import observe_masked

from .layers import MLP, gaussian_mlp, glorot_init_, init_bernoulli_bias_


class VAE(nn.Module):
    r"""A deep latent variable model with one Gaussian latent layer, as a Pyro model/guide pair.

    Generative model (parameters θ, ``self.decoder``)::

        z ~ Normal(0, I)                   (z_dim,)
        x | z ~ self.likelihood(z)         (D,), independent over the D entries

    Proposal / guide (parameters φ, ``self.encoder``)::

        z | x ~ Normal(loc(x), scale(x))

    Subclasses build ``self.encoder`` (``x -> (loc, scale)``) and ``self.decoder`` and may
    override :meth:`encode` / :meth:`decode`. The default likelihood is Bernoulli with
    logits ``decode(z)`` (binary images); :class:`~pyro_iwem.models.TabularVAE` overrides
    :meth:`likelihood` and :meth:`decoder_mean`.

    ``x`` is a float tensor of shape ``(B, D)`` and ``mask`` an optional bool tensor of the
    same shape, True where observed. The model observes ``x`` through
    :func:`~pyro_iwem.infer.masked.observe_masked` (sites ``x``, or ``x_observed`` /
    ``x_unobserved`` / deterministic ``x`` with a mask). The guide ignores ``mask``: the
    caller fills in the missing entries of ``x`` before calling it.

    ``data_size`` (optional, both programs) is the size of the minibatch that ``x`` is one
    process's share of (a run on several processes, docs/scaling.md): the data plate is then
    ``pyro.plate("data", data_size, subsample=...)``, its log-densities scaled by
    ``data_size / B`` outside the per-datum importance weights, so that every process's loss
    stands for the whole minibatch.

    Both accept an outer vectorised particle plate (``pyro.plate("particles", N, dim=-2)``):
    latents then have shape ``(N, B, z_dim)`` and the decoder sees those leading dims.

    To draw from a wider proposal (the official IWEM code multiplies the guide's variance by
    1.5), wrap the guide in :class:`~pyro_iwem.infer.ProposalInflation`, or pass ``inflation=``
    to IWEM and :func:`~pyro_iwem.infer.iwae_bound`: it works on any guide.

    :param int z_dim: latent dimension.
    """

    def __init__(self, z_dim):
        super().__init__()
        self.z_dim = z_dim

    @property
    def latent_size(self):
        """The number of Gaussian latent coordinates of the model (``z_dim`` here)."""
        return self.z_dim

    # --- networks -------------------------------------------------------------------
    def encode(self, x):
        """``x (..., D) -> (loc, scale)``, each ``(..., z_dim)``."""
        return self.encoder(x)

    def decode(self, z):
        """``z (..., z_dim) -> (..., D)`` decoder output (Bernoulli logits by default)."""
        return self.decoder(z)

    def likelihood(self, z):
        """The element-wise distribution of ``x`` given ``z``, batch shape ``(..., D)``."""
        return dist.Bernoulli(logits=self.decode(z))

    def decoder_mean(self, z):
        """``E[x | z]``, shape ``(..., D)`` (pixel probabilities by default)."""
        return torch.sigmoid(self.decode(z))

    def _prior(self, like, dim):
        return dist.Normal(like.new_zeros(dim), like.new_ones(dim)).to_event(1)

    def _proposal(self, loc, scale):
        return dist.Normal(loc, scale).to_event(1)

    # --- Pyro model and guide ---------------------------------------------------------
    @staticmethod
    def data_plate(x, data_size=None):
        """The data plate over the ``B = x.shape[-2]`` rows of ``x``: of size ``data_size``
        with those ``B`` as its subsample when given, so scaled by ``data_size / B``."""
        batch = x.shape[-2]
        if data_size is None or data_size == batch:
            return pyro.plate("data", batch)
        return pyro.plate("data", data_size, subsample=torch.arange(batch, device=x.device))

    def model(self, x, mask=None, data_size=None):
        pyro.module("decoder", self.decoder)
        with self.data_plate(x, data_size):
            z = pyro.sample("z", self._prior(x, self.z_dim))
            observe_masked("x", self.likelihood(z), x, mask, event_dim=1)

    def guide(self, x, mask=None, data_size=None):
        pyro.module("encoder", self.encoder)
        with self.data_plate(x, data_size):
            pyro.sample("z", self._proposal(*self.encode(x)))

    @torch.no_grad()
    def sample(self, n):
        """Decoder means ``E[x | z]`` for ``n`` prior draws ``z``: a tensor ``(n, D)``."""
        p = next(self.parameters())
        return self.decoder_mean(torch.randn(n, self.z_dim, dtype=p.dtype, device=p.device))


class MLPVAE(VAE):
    r"""The paper's MLP model for binary images (Tucker et al. 2018's settings):

    - encoder: ``x (784) -> 300 tanh -> 300 tanh -> (loc, scale)`` of a Normal over ``z (40)``,
      ``scale = softplus(.) + min_scale``, or ``exp(logvar / 2)`` of a linear log-variance with
      ``encoder_scale="exp"`` (the official code's; see :class:`~pyro_iwem.models.layers.GaussianHead`);
    - prior: ``z ~ Normal(0, I)``;
    - decoder: ``z -> 300 tanh -> 300 tanh -> 784`` logits, ``x | z ~ Bernoulli(logits)``.

    Weights are Glorot-uniform and biases zero; if ``train_mean`` (a ``(x_dim,)`` tensor of
    training pixel means) is given, the decoder's output bias starts at its clipped logit.

    :param int x_dim: data dimension D.
    :param int z_dim: latent dimension.
    :param hidden: hidden layer sizes of the encoder; the decoder uses them reversed.
    :param activation: hidden activation, a module class.
    :param train_mean: optional ``(x_dim,)`` tensor for the decoder's output bias.
    :param float min_scale: floor of the guide's standard deviation (``encoder_scale="softplus"``).
    :param str encoder_scale: the encoder head's ``link``, ``"softplus"`` (default) or ``"exp"``.
    """

    def __init__(
        self,
        x_dim=784,
        z_dim=40,
        hidden=(300, 300),
        activation=nn.Tanh,
        train_mean=None,
        min_scale=1e-4,
        encoder_scale="softplus",
    ):
        super().__init__(z_dim)
        self.x_dim = x_dim
        self.encoder = gaussian_mlp(x_dim, hidden, z_dim, activation, min_scale, encoder_scale)
        self.decoder = MLP(z_dim, tuple(reversed(hidden)), x_dim, activation)
        glorot_init_(self)
        if train_mean is not None:
            init_bernoulli_bias_(self.decoder[-1], train_mean)


class MLPVAE2(VAE):
    r"""The two-stochastic-layer MLP model of Burda et al. (2015), for binary images.

    Generative model (θ, ``self.decoder``)::

        z2 ~ Normal(0, I)                                   (50,)
        z1 | z2 ~ Normal(loc(z2), scale(z2))  via 50-50 tanh  (100,)
        x | z1 ~ Bernoulli(logits(z1))         via 100-100 tanh (784,)

    Guide (φ, ``self.encoder``)::

        z1 | x ~ Normal(.)   via 100-100 tanh
        z2 | z1 ~ Normal(.)  via 50-50 tanh

    Sites ``"z1"`` and ``"z2"``. Scales are ``softplus(.) + min_scale``; ``encoder_scale="exp"``
    makes both guide scales ``exp(logvar / 2)`` of a linear log-variance (the model's
    ``p(z1 | z2)`` keeps the softplus). ``z_dim`` is the top-level latent dimension ``z2_dim``.
    """

    def __init__(
        self,
        x_dim=784,
        z1_dim=100,
        z2_dim=50,
        hidden1=(100, 100),
        hidden2=(50, 50),
        activation=nn.Tanh,
        train_mean=None,
        min_scale=1e-4,
        encoder_scale="softplus",
    ):
        super().__init__(z2_dim)
        self.x_dim, self.z1_dim, self.z2_dim = x_dim, z1_dim, z2_dim
        self.encoder = nn.ModuleDict(
            {
                "z1": gaussian_mlp(x_dim, hidden1, z1_dim, activation, min_scale, encoder_scale),
                "z2": gaussian_mlp(z1_dim, hidden2, z2_dim, activation, min_scale, encoder_scale),
            }
        )
        self.decoder = nn.ModuleDict(
            {
                "z1": gaussian_mlp(z2_dim, tuple(reversed(hidden2)), z1_dim, activation, min_scale),
                "x": MLP(z1_dim, tuple(reversed(hidden1)), x_dim, activation),
            }
        )
        glorot_init_(self)
        if train_mean is not None:
            init_bernoulli_bias_(self.decoder["x"][-1], train_mean)

    @property
    def latent_size(self):
        """The number of Gaussian latent coordinates, ``z1_dim + z2_dim``."""
        return self.z1_dim + self.z2_dim

    def decode(self, z1):
        """``z1 (..., z1_dim) -> (..., D)`` Bernoulli logits."""
        return self.decoder["x"](z1)

    def model(self, x, mask=None, data_size=None):
        pyro.module("decoder", self.decoder)
        with self.data_plate(x, data_size):
            z2 = pyro.sample("z2", self._prior(x, self.z2_dim))
            z1 = pyro.sample("z1", dist.Normal(*self.decoder["z1"](z2)).to_event(1))
            observe_masked("x", self.likelihood(z1), x, mask, event_dim=1)

    def guide(self, x, mask=None, data_size=None):
        pyro.module("encoder", self.encoder)
        with self.data_plate(x, data_size):
            z1 = pyro.sample("z1", self._proposal(*self.encoder["z1"](x)))
            pyro.sample("z2", self._proposal(*self.encoder["z2"](z1)))

    @torch.no_grad()
    def sample(self, n):
        """Decoder means ``E[x | z1]`` for ``n`` ancestral prior draws ``z2 -> z1``: ``(n, D)``."""
        p = next(self.parameters())
        z2 = torch.randn(n, self.z2_dim, dtype=p.dtype, device=p.device)
        z1 = torch.distributions.Normal(*self.decoder["z1"](z2)).sample()
        return self.decoder_mean(z1)
