"""Proposal inflation (the official code's variance × 1.5) against closed forms."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDiagonalNormal

from pyro_iwem import iwae_bound
from pyro_iwem.infer import ParticleSampler, ProposalInflation, inflate
from pyro_iwem.infer.util import ModelError
from tests.gaussian_models import PPCA

C = 1.5
F64 = torch.float64


def mvn_logpdf(value, loc, cov):
    return torch.as_tensor(
        np.array([scipy.stats.multivariate_normal(l, c).logpdf(v) for v, l, c in zip(value, loc, cov)])
    )


# --------------------------------------------------------------------- inflate: closed forms


def test_inflate_normal_multiplies_the_scale_by_root_c():
    loc, scale = torch.randn(4, 3, dtype=F64), torch.rand(4, 3, dtype=F64) + 0.1
    widened = inflate(dist.Normal(loc, scale).to_event(1), C)
    assert isinstance(widened, dist.Independent) and widened.event_shape == (3,) and widened.batch_shape == (4,)
    torch.testing.assert_close(widened.base_dist.scale, scale * math.sqrt(C))
    torch.testing.assert_close(widened.base_dist.loc, loc)
    value = torch.randn(4, 3, dtype=F64)
    expected = scipy.stats.norm.logpdf(value.numpy(), loc.numpy(), scale.numpy() * math.sqrt(C)).sum(-1)
    torch.testing.assert_close(widened.log_prob(value), torch.as_tensor(expected))


def test_inflate_multivariate_normals_multiply_the_covariance_by_c():
    loc = torch.randn(2, 3, dtype=F64)
    L = torch.tril(torch.randn(2, 3, 3, dtype=F64), -1) + torch.diag_embed(torch.rand(2, 3, dtype=F64) + 0.5)
    value = torch.randn(2, 3, dtype=F64)
    mvn = inflate(dist.MultivariateNormal(loc, scale_tril=L), C)
    cov = C * L @ L.transpose(-1, -2)
    torch.testing.assert_close(mvn.covariance_matrix, cov)
    torch.testing.assert_close(mvn.log_prob(value), mvn_logpdf(value.numpy(), loc.numpy(), cov.numpy()))

    factor, diag = torch.randn(2, 3, 2, dtype=F64), torch.rand(2, 3, dtype=F64) + 0.2
    low_rank = inflate(dist.LowRankMultivariateNormal(loc, factor, diag), C)
    cov = C * (factor @ factor.transpose(-1, -2) + torch.diag_embed(diag))
    torch.testing.assert_close(low_rank.covariance_matrix, cov)
    torch.testing.assert_close(low_rank.log_prob(value), mvn_logpdf(value.numpy(), loc.numpy(), cov.numpy()))


def test_inflate_keeps_masks_and_expansions_and_takes_a_factor_per_batch_element():
    loc, scale = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    mask = torch.tensor([True, False, True])
    masked = inflate(dist.Normal(loc, scale).mask(mask), C)
    assert isinstance(masked, dist.MaskedDistribution)
    assert masked.log_prob(torch.ones(3, dtype=F64))[1] == 0
    torch.testing.assert_close(masked.base_dist.scale, scale * math.sqrt(C))
    expanded = inflate(dist.ExpandedDistribution(dist.Normal(loc, scale), (5, 3)), C)
    assert expanded.batch_shape == (5, 3)
    torch.testing.assert_close(expanded.variance, torch.full((5, 3), C, dtype=F64))
    # one factor per row of a (2, 3) batch: a (2, 1) tensor, right-aligned
    rows = inflate(dist.Normal(torch.zeros(2, 3), 1.0), torch.tensor([[C], [1.0]]))
    torch.testing.assert_close(rows.variance, torch.tensor([[C] * 3, [1.0] * 3]))
    same = dist.Normal(loc, scale)
    assert inflate(same, 1) is same


# --------------------------------------------------------------------- the messenger


def test_messenger_widens_each_particle_by_its_own_factor():
    """Particles 0 and 1 of a particle plate drawn with variance × 1.5 and × 1: the draws' spread
    and the traced log density are those of N(loc, c σ²), particle by particle."""
    n, sigma = 20000, 2.0

    def guide():
        with pyro.plate("data", n, dim=-1):
            return pyro.sample("z", dist.Normal(torch.tensor(1.0, dtype=F64), sigma))

    def run():
        with ProposalInflation(torch.tensor([C, 1.0]), dim=-2), pyro.plate("particles", 2, dim=-2):
            return guide()

    trace = poutine.trace(run).get_trace()
    z = trace.nodes["z"]["value"]
    assert z.shape == (2, n)
    for row, factor in enumerate((C, 1.0)):
        expected = sigma * math.sqrt(factor)
        assert abs(z[row].std().item() / expected - 1) < 0.03, (row, z[row].std().item(), expected)
        log_q = trace.nodes["z"]["fn"].log_prob(z)[row]
        torch.testing.assert_close(log_q, torch.as_tensor(scipy.stats.norm.logpdf(z[row].numpy(), 1.0, expected)))


def unsupported_model(x):
    with pyro.plate("data", x.shape[0]):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        pyro.sample("x", dist.Poisson(rate), obs=x)


def unsupported_guide(x):
    a = pyro.param("a", torch.tensor(2.0), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("rate", dist.Gamma(a, 1.0))


def test_an_unsupported_distribution_is_an_error_naming_the_site():
    with pytest.raises(ModelError, match=r"guide site 'rate' has a Gamma proposal, which cannot be inflated"):
        with ProposalInflation(C):
            unsupported_guide(torch.ones(3))
    sampler = ParticleSampler(unsupported_model, unsupported_guide)
    with pytest.raises(ModelError, match="guide site 'rate'"):
        sampler(4, (torch.ones(3),), {}, inflation=C)
    assert sampler(4, (torch.ones(3),), {}).log_q.shape == (4, 3)  # un-inflated it is fine


def test_bad_factors_are_refused():
    for factor in (0, -1.0, math.inf, True, "1.5"):
        with pytest.raises(ValueError, match="positive finite"):
            ProposalInflation(factor)
    with pytest.raises(ValueError, match="1-d"):
        ProposalInflation(torch.ones(2, 2), dim=-2)
    with pytest.raises(ValueError, match="dim"):
        ProposalInflation(torch.ones(2))
    m = PPCA()
    with pytest.raises(ValueError, match="3 factors for 4 particles"):
        ParticleSampler(m.model, m.guide)(4, (torch.zeros(2, 3, dtype=F64),), {}, inflation=[C, C, 1.0])


def test_autoguide_latents_are_widened_through_their_auxiliary_site():
    """AutoDiagonalNormal: the auxiliary Normal is widened, the Delta latent follows it, and
    log q is the widened auxiliary density (the Delta's Jacobian is zero for an unconstrained z)."""
    m = PPCA(D=3, d=2)
    x = torch.randn(5, 3, dtype=F64)
    guide = AutoDiagonalNormal(m.model)
    guide(x)  # creates the params
    particles = ParticleSampler(m.model, guide, data_plate=False)(6, (x,), {}, inflation=C, grad_guide=False)
    aux_name = "_AutoDiagonalNormal_latent"
    aux = particles.guide_trace.nodes[aux_name]["value"]
    loc, scale = guide._loc_scale()
    expected = scipy.stats.norm.logpdf(aux.numpy(), loc.detach().numpy(), scale.detach().numpy() * math.sqrt(C)).sum(-1)
    torch.testing.assert_close(particles.log_q[:, 0], torch.as_tensor(expected).reshape(6))
    assert isinstance(particles.guide_trace.nodes["z"]["fn"], dist.Delta)


@pytest.mark.parametrize("vectorize", [True, False])
def test_sampler_log_q_is_the_density_of_the_distribution_sampled(vectorize):
    """Per-particle factors, vectorised or one particle at a time: log q by hand from the draws."""
    m = PPCA(D=3, d=2)
    x = torch.randn(4, 3, dtype=F64)
    factors = [C, C, 1.0, 2.0]
    particles = ParticleSampler(m.model, m.guide, vectorize_particles=vectorize)(4, (x,), {}, inflation=factors)
    z = particles.guide_trace.nodes["z"]["value"] if vectorize else None
    if z is None:  # one trace per particle: the sampler keeps the first; the latents hold every draw
        z = torch.stack(particles.latents).reshape(4, 4, 2)
    loc = x @ pyro.param("A").T + pyro.param("c")
    s = pyro.param("s").detach()
    for k, factor in enumerate(factors):
        expected = scipy.stats.norm.logpdf(z[k].detach().numpy(), loc.detach().numpy(), s.numpy() * math.sqrt(factor))
        torch.testing.assert_close(particles.log_q[k].detach(), torch.as_tensor(expected.sum(-1)))


# --------------------------------------------------------------------- the inflated IWAE bound


def exact_ppca():
    """PPCA (D = 3, d = 1) with the guide at the exact posterior N(m(x), s²): log p(x) in closed form."""
    m = PPCA(D=3, d=1)
    W = torch.tensor([[1.0], [0.5], [-2.0]], dtype=F64)
    mu, sigma = torch.tensor([0.1, 0.2, 0.3], dtype=F64), torch.tensor(0.6, dtype=F64)
    A, c, s = m.exact_guide_params(W, mu, sigma)
    for name, value in {"W": W, "mu": mu, "sigma": sigma, "A": A, "c": c, "s": s}.items():
        pyro.param(name, value)
    return m, lambda x: PPCA.log_likelihood(x, W, mu, sigma)


def test_inflated_bound_with_one_sample_is_log_p_less_the_closed_form_kl():
    r"""K = 1: E[log p(x, z) - log q_c(z)] = log p(x) - KL(q_c ‖ p(z | x)) with the guide at the
    exact posterior N(m, s²) and q_c = N(m, c s²): KL = (c - 1 - log c) / 2 per latent dim."""
    m, log_p = exact_ppca()
    x = torch.randn(1, 3, dtype=F64).expand(20000, 3)  # 20 000 independent one-sample bounds of one datum
    bounds = iwae_bound(m.model, m.guide, x, num_particles=1, inflation=C)
    kl = (C - 1 - math.log(C)) / 2
    se = bounds.std().item() / math.sqrt(len(bounds))
    assert abs(bounds.mean().item() - (log_p(x[:1]).item() - kl)) < 4 * se, (bounds.mean().item(), log_p(x[:1]), kl, se)
    # un-inflated, every weight is p(x): the bound is exact
    torch.testing.assert_close(iwae_bound(m.model, m.guide, x[:5], num_particles=3), log_p(x[:5]))


def test_inflated_bound_stays_below_log_p_and_approaches_it():
    r"""With q_c ≠ p(z | x) the bound is below log p(x) in expectation, by about χ²/(2K)
    (χ² = 0.06 here): clearly at K = 10, within its noise of log p(x) at K = 5000."""
    m, log_p = exact_ppca()
    x = torch.randn(1, 3, dtype=F64)
    exact = log_p(x).item()
    gap, se = {}, {}
    for K, n in ((10, 4000), (5000, 400)):
        bounds = iwae_bound(m.model, m.guide, x.expand(n, 3), num_particles=K, inflation=C)
        gap[K], se[K] = exact - bounds.mean().item(), bounds.std().item() / math.sqrt(n)
    assert gap[10] > 4 * se[10], (gap, se)
    assert abs(gap[5000]) < 4 * se[5000] + 1e-4 and gap[5000] < gap[10] / 5, (gap, se)
