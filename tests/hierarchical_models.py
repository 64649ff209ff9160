"""The random-effects model of issue 20, whose likelihood is known in closed form.

μ ~ N(0, 1) global; z_i | μ ~ N(μ, τ²), x_i | z_i ~ N(z_i, σ²) with σ = 0.5, i = 1..N; τ a
parameter. Given μ the data are independent, x_i | μ ~ N(μ, τ² + σ²), so the marginal is
the multivariate normal N(0, (τ² + σ²) I + 11ᵀ), the posterior of μ is normal, and so is
z_i | μ, x_i. Float64 throughout.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

F64 = torch.float64
SIGMA = 0.5


def data(n, seed=0, tau=0.7, mu=0.4):
    g = torch.Generator().manual_seed(seed)
    z = mu + tau * torch.randn(n, generator=g, dtype=F64)
    return z + SIGMA * torch.randn(n, generator=g, dtype=F64)


def model(x, tau=None, batch_size=None):
    """The random-effects model; ``tau`` a number, or the parameter ``tau`` when ``None``."""
    if tau is None:
        tau = pyro.param("tau", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=F64), 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as i:
        z = pyro.sample("z", dist.Normal(mu, tau))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x[i])


def log_marginal(x, tau):
    """log p(x) in closed form: N(0, (τ² + σ²) I + 11ᵀ)."""
    n = x.shape[0]
    cov = (tau**2 + SIGMA**2) * torch.eye(n, dtype=F64) + torch.ones(n, n, dtype=F64)
    return dist.MultivariateNormal(torch.zeros(n, dtype=F64), cov).log_prob(x)


def posterior_mu(x, tau):
    """The exact posterior of μ, ``(mean, sd)``."""
    v = tau**2 + SIGMA**2
    precision = 1.0 + x.shape[0] / v
    return (x.sum() / v / precision).item(), precision**-0.5


def local_posterior(mu, x, tau):
    """z_i | μ, x_i: ``(mean, sd)``."""
    precision = 1 / tau**2 + 1 / SIGMA**2
    return (mu / tau**2 + x / SIGMA**2) / precision, precision**-0.5


def ml_tau(x):
    """The maximum-likelihood τ, by a fine grid refined by golden-section search on log p(x; τ)."""
    lo, hi = 1e-3, 3.0
    for _ in range(80):
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if log_marginal(x, a) > log_marginal(x, b):
            hi = b
        else:
            lo = a
    return 0.5 * (lo + hi)


def exact_guide(tau, mean, sd, local_widen=1.0, local_shift=0.0):
    """A guide q(μ) = N(mean, sd), q(z_i | x_i, μ) the exact conditional (widened by
    ``local_widen`` and shifted by ``local_shift`` for an inexact one)."""

    def guide(x, tau_=None, batch_size=None):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(mean, dtype=F64), sd))
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as i:
            loc, scale = local_posterior(mu, x[i], tau)
            pyro.sample("z", dist.Normal(loc + local_shift, scale * local_widen))

    return guide


def kl_normal(m1, s1, m2, s2):
    """KL(N(m1, s1²) ‖ N(m2, s2²))."""
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def trainable_guide(x, batch_size=None):
    """q(μ) = N(m, s); q(z_i | x_i, μ) = N(a μ + b x_i, c): the family holds the exact posterior."""
    m = pyro.param("q_m", torch.tensor(0.0, dtype=F64))
    s = pyro.param("q_s", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
    a = pyro.param("q_a", torch.tensor(0.5, dtype=F64))
    b = pyro.param("q_b", torch.tensor(0.5, dtype=F64))
    c = pyro.param("q_c", torch.tensor(0.5, dtype=F64), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(m, s))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as i:
        pyro.sample("z", dist.Normal(a * mu + b * x[i], c))
