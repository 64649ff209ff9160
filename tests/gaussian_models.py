"""Linear-Gaussian models whose likelihoods and posteriors are known in closed form."""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


class PPCA:
    r"""Probabilistic PCA: z ~ N(0, I_d), x | z ~ N(W z + mu, sigma^2 I_D); guide q(z|x) linear Gaussian.

    The marginal is x ~ N(mu, W W^T + sigma^2 I) and the MLE is known (Tipping & Bishop 1999).
    With d = 1 the exact posterior lies in the guide family.
    """

    def __init__(self, D=3, d=1, dtype=torch.float64):
        self.D, self.d, self.dtype = D, d, dtype

    def model(self, x):
        W = pyro.param("W", 0.1 * torch.ones(self.D, self.d, dtype=self.dtype))
        mu = pyro.param("mu", torch.zeros(self.D, dtype=self.dtype))
        sigma = pyro.param("sigma", torch.ones((), dtype=self.dtype), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.d, dtype=self.dtype), 1.0).to_event(1))
            loc = z @ W.T + mu
            pyro.sample("x", dist.Normal(loc, sigma).to_event(1), obs=x)

    def guide(self, x):
        A = pyro.param("A", torch.zeros(self.d, self.D, dtype=self.dtype))
        c = pyro.param("c", torch.zeros(self.d, dtype=self.dtype))
        s = pyro.param("s", torch.ones(self.d, dtype=self.dtype), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ A.T + c, s).to_event(1))

    @staticmethod
    def log_likelihood(x, W, mu, sigma):
        """Exact per-datum log p(x) under the marginal N(mu, W W^T + sigma^2 I)."""
        cov = W @ W.T + sigma**2 * torch.eye(W.shape[0], dtype=W.dtype)
        return dist.MultivariateNormal(mu, covariance_matrix=cov).log_prob(x)

    @staticmethod
    def max_log_likelihood(x, d):
        """Per-datum log-likelihood at the closed-form MLE."""
        mu = x.mean(0)
        S = (x - mu).T @ (x - mu) / x.shape[0]
        evals, evecs = torch.linalg.eigh(S)
        evals, evecs = evals.flip(0), evecs.flip(1)
        sigma2 = evals[d:].mean()
        W = evecs[:, :d] * (evals[:d] - sigma2).sqrt()
        return PPCA.log_likelihood(x, W, mu, sigma2.sqrt())

    def exact_guide_params(self, W, mu, sigma):
        """Guide parameters equal to the exact posterior N(M^-1 W^T (x - mu), sigma^2 M^-1)."""
        M = W.T @ W + sigma**2 * torch.eye(self.d, dtype=self.dtype)
        A = torch.linalg.solve(M, W.T)
        return A, -A @ mu, (sigma**2 * torch.linalg.inv(M)).diagonal().sqrt()


class TwoLayerGaussian:
    """z1 ~ N(0, I), z2 | z1 ~ N(a z1, I), x | z2 ~ N(W z2 + b, sigma^2 I): two latent sites."""

    def __init__(self, D=3, d=2, dtype=torch.float64):
        self.D, self.d, self.dtype = D, d, dtype
        g = torch.Generator().manual_seed(1)
        self.init = {
            "a": torch.randn(self.d, generator=g, dtype=dtype),
            "W": torch.randn(D, d, generator=g, dtype=dtype),
            "b": torch.randn(D, generator=g, dtype=dtype),
            "A1": 0.3 * torch.randn(d, D, generator=g, dtype=dtype),
            "A2": 0.3 * torch.randn(d, D, generator=g, dtype=dtype),
        }

    def model(self, x):
        a = pyro.param("a", self.init["a"].clone())
        W = pyro.param("W", self.init["W"].clone())
        b = pyro.param("b", self.init["b"].clone())
        sigma = pyro.param("sigma", torch.tensor(0.7, dtype=self.dtype), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(self.d, dtype=self.dtype), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(a * z1, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z2 @ W.T + b, sigma).to_event(1), obs=x)

    def guide(self, x):
        A1 = pyro.param("A1", self.init["A1"].clone())
        A2 = pyro.param("A2", self.init["A2"].clone())
        s = pyro.param("s", torch.ones(self.d, dtype=self.dtype), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(x @ A1.T, s).to_event(1))
            pyro.sample("z2", dist.Normal(x @ A2.T, s).to_event(1))


def one_weight_model(x):
    r"""The smallest model with a θ: :math:`z_i \sim N(0, 1)`, :math:`x_i \mid z_i \sim N(w z_i, 0.7^2)`,
    one parameter ``w`` (1.5 at first), float64; ``x`` a 1-d tensor, one datum per entry."""
    w = pyro.param("w", torch.tensor(1.5, dtype=torch.float64))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
        pyro.sample("x", dist.Normal(w * z, 0.7), obs=x)


def normal_chi_square(mu, s):
    r""":math:`\chi^2(p \| q) = \int p^2 / q - 1` for p = N(0, 1), q = N(mu, s^2), s^2 > 1/2."""
    return s**2 / math.sqrt(2 * s**2 - 1) * math.exp(mu**2 / (2 * s**2 - 1)) - 1
