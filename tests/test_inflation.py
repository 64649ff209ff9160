"""Proposal inflation (the official code's variance × 1.5), IWEM's inflated steps and the
|log p| offset of the optimal P-step, against closed forms and hand computations."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import scipy.stats
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDiagonalNormal

from pyro_iwem import IWEM, OptimalProposalLoss, iwae_bound
from pyro_iwem.infer import ParticleSampler, ProposalInflation, inflate, optimal_proposal_objective
from pyro_iwem.infer.proposal import proposal_loss
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
    with pytest.raises(ValueError, match=r"positive and finite, got \[1.5, 0.0\]"):
        ProposalInflation(torch.tensor([1.5, 0.0]), dim=-2)
    with pytest.raises(ValueError, match="positive and finite"):
        ProposalInflation([1.5, math.nan], dim=-2)
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


@pytest.mark.parametrize("family", ["Normal", "MultivariateNormal", "LowRankMultivariateNormal"])
def test_per_particle_factors_in_a_plate_for_every_supported_family(family):
    """A guide over a 2-d latent per datum, drawn in one vectorised pass with factors (1.5, 1, 2):
    each particle's log q is the density of N(loc, c Σ) with its own c (scipy)."""
    B, factors = 3, [C, 1.0, 2.0]
    loc = torch.randn(B, 2, dtype=F64)
    cov_factor, cov_diag = torch.tensor([[1.0], [0.5]], dtype=F64), torch.tensor([0.3, 0.7], dtype=F64)
    cov = cov_factor @ cov_factor.T + torch.diag(cov_diag)
    proposals = {
        "Normal": lambda: dist.Normal(loc, cov.diagonal().sqrt()).to_event(1),
        "MultivariateNormal": lambda: dist.MultivariateNormal(loc, covariance_matrix=cov),
        "LowRankMultivariateNormal": lambda: dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag),
    }
    sigma = torch.diag(cov.diagonal()) if family == "Normal" else cov

    def model():
        with pyro.plate("data", B):
            pyro.sample("z", dist.MultivariateNormal(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)))

    def guide():
        with pyro.plate("data", B):
            pyro.sample("z", proposals[family]())

    particles = ParticleSampler(model, guide, max_plate_nesting=1)(3, (), {}, inflation=factors)
    z = particles.guide_trace.nodes["z"]["value"]
    for k, factor in enumerate(factors):
        expected = mvn_logpdf(z[k].numpy(), loc.numpy(), (factor * sigma).expand(B, 2, 2).numpy())
        torch.testing.assert_close(particles.log_q[k], expected)


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


# --------------------------------------------------------------------- IWEM's steps


class Spy:
    """Records the particles and the ``inflation`` of every call of a sampler."""

    def __init__(self, sampler):
        self.sampler, self.calls = sampler, []

    def __call__(self, num_particles, *args, **kwargs):
        particles = self.sampler(num_particles, *args, **kwargs)
        self.calls.append((kwargs.get("inflation"), particles))
        return particles

    draws = ParticleSampler.draws  # one draw of β: a call of the spy

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def ppca_by_hand(x, z, factor):
    """log p(x, z) and log q_c(z | x) of PPCA from the params, by hand (numpy/scipy)."""
    W, mu, sigma = (pyro.param(n).detach().numpy() for n in ("W", "mu", "sigma"))
    A, c, s = (pyro.param(n).detach().numpy() for n in ("A", "c", "s"))
    z, x = z.detach().numpy(), x.numpy()
    log_prior = scipy.stats.norm.logpdf(z).sum(-1)
    log_lik = scipy.stats.norm.logpdf(x, z @ W.T + mu, sigma).sum(-1)
    log_q = scipy.stats.norm.logpdf(z, x @ A.T + c, s * math.sqrt(factor)).sum(-1)
    return torch.as_tensor(log_prior + log_lik), torch.as_tensor(log_q)


def test_e_step_weights_the_k_inflated_particles_and_averages_the_l_uninflated_ones():
    m = PPCA(D=3, d=2)
    x = torch.randn(6, 3, dtype=F64)
    K, L, alpha = 4, 3, 0.4
    iwem = IWEM(m.model, m.guide, K=K, L=L, proposal_inflation=C)
    particles, loss = iwem._e_step(alpha, (x,), {})
    z = particles.guide_trace.nodes["z"]["value"]
    log_p, log_q = zip(*(ppca_by_hand(x, z[n], C if n < K else 1.0) for n in range(K + L)))
    log_p, log_q = torch.stack(log_p), torch.stack(log_q)
    torch.testing.assert_close(particles.log_p.detach(), log_p)
    torch.testing.assert_close(particles.log_q, log_q)
    weights = torch.softmax(log_p[:K] - log_q[:K], 0)
    q_hat = (weights * log_p[:K]).sum(0)
    expected = -(alpha * q_hat + (1 - alpha) * log_p[K:].mean(0)).sum()
    torch.testing.assert_close(loss.detach(), expected)


def test_e_step_draws_k_from_the_widened_and_l_from_the_guide_in_one_pass():
    m = PPCA(D=3, d=1)
    x = torch.randn(1, 3, dtype=F64).expand(5000, 3)
    iwem = IWEM(m.model, m.guide, K=2, L=2, proposal_inflation=C)
    particles, _ = iwem._e_step(0.5, (x,), {})
    loc = x @ pyro.param("A").detach().T + pyro.param("c").detach()
    residual = (particles.guide_trace.nodes["z"]["value"] - loc) / pyro.param("s").detach()
    assert abs(residual[:2].std().item() - math.sqrt(C)) < 0.03 and abs(residual[2:].std().item() - 1) < 0.03
    # α = 1: no ELBO samples, the K only
    assert iwem._e_step(1.0, (x,), {})[0].num_particles == 2


@pytest.mark.parametrize("p_step_inflation, offset", [(None, 0.0), (1.0, 0.0), (None, 3.0 * math.log(2 * math.pi))])
def test_step_inflates_both_steps_and_the_p_step_loss_is_eq_7_with_the_offset(p_step_inflation, offset):
    """One step: the E-step draws K widened and L plain particles, the P-step J particles with
    ``p_step_inflation`` (default: the E-step's factor); its loss, by hand on its own draws, is
    -Σ_i [logsumexp_j(log|log p_ij + c| + log p_ij - log q_c,ij) - log J]."""
    m = PPCA(D=3, d=2)
    x = torch.randn(6, 3, dtype=F64)
    K, L, J = 4, 2, 5
    iwem = IWEM(m.model, m.guide, K=K, L=L, J=J, proposal_inflation=C, p_step_inflation=p_step_inflation,
                log_p_offset=offset, optim=pyro.optim.SGD({"lr": 0.0}))
    iwem.sampler = spy = Spy(iwem.sampler)
    iwem.step(x)
    (e_inflation, _), (p_inflation, p_particles) = spy.calls
    assert e_inflation == [C] * K + [1.0] * L  # α = 0 at the first step: L ELBO samples
    factor = C if p_step_inflation is None else p_step_inflation
    assert p_inflation == factor
    z = p_particles.guide_trace.nodes["z"]["value"]
    log_p, log_q = map(torch.stack, zip(*(ppca_by_hand(x, z[j], factor) for j in range(J))))
    expected = -((log_p + offset).abs().log() + log_p - log_q).logsumexp(0).sub(math.log(J)).sum()
    assert iwem.p_loss == pytest.approx(expected.item(), rel=1e-10)


def test_offset_shifts_log_p_inside_the_absolute_value_on_the_same_draws():
    m = PPCA(D=3, d=2)
    x = torch.randn(6, 3, dtype=F64)
    particles = ParticleSampler(m.model, m.guide)(7, (x,), {}, inflation=C)
    offset = 2.5
    by_hand = ((particles.log_p + offset).abs().log() + particles.log_w).logsumexp(0) - math.log(7)
    torch.testing.assert_close(optimal_proposal_objective(particles, offset), by_hand)
    plain = optimal_proposal_objective(particles)
    torch.testing.assert_close(plain, (particles.log_p.abs().log() + particles.log_w).logsumexp(0) - math.log(7))
    assert not torch.allclose(plain, by_hand)
    # the loss draws its own particles: replay its random numbers
    loss = OptimalProposalLoss(7, log_p_offset=offset)
    pyro.set_rng_seed(5)
    value = loss.loss(m.model, m.guide, x)
    pyro.set_rng_seed(5)
    particles = loss.sampler(m.model, m.guide)(7, (x,), {}, grad_guide=False)
    by_hand = ((particles.log_p + offset).abs().log() + particles.log_w).logsumexp(0) - math.log(7)
    assert value == pytest.approx(-by_hand.sum().item(), rel=1e-12)


def test_bad_options_are_refused_with_the_argument_named():
    m = PPCA()
    for name in ("proposal_inflation", "p_step_inflation"):
        for value in (0, -1.0, math.inf, "1.5"):
            with pytest.raises(ValueError, match=name):
                IWEM(m.model, m.guide, **{name: value})
    with pytest.raises(ValueError, match=r"p_step_inflation \(1.0\) must equal proposal_inflation \(1.5\)"):
        IWEM(m.model, m.guide, one_pass=True, proposal_inflation=C, p_step_inflation=1.0)
    with pytest.raises(ValueError, match=r"got L=2; IWEM\(one_pass=True\) averages"):
        IWEM(m.model, m.guide, one_pass=True, L=2)
    with pytest.raises(ValueError, match="got L=2; with annealing=None"):
        IWEM(m.model, m.guide, annealing=None, L=2)
    with pytest.raises(ValueError, match="log_p_offset.*'iwae' has no"):
        IWEM(m.model, m.guide, proposal="iwae", log_p_offset=1.0)
    with pytest.raises(ValueError, match="log_p_offset"):
        proposal_loss("iwae", 5, log_p_offset=1.0)


@pytest.mark.parametrize("one_pass", [False, True])
def test_a_refused_inflated_step_moves_no_parameter(one_pass):
    m = PPCA(D=3, d=2)
    x = torch.randn(6, 3, dtype=F64)
    iwem = IWEM(m.model, m.guide, K=3, J=3, proposal_inflation=C, one_pass=one_pass)
    iwem.step(x)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    bad = x.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ModelError, match="NaN"):
        iwem.step(bad)
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k]), k
    # a guide the inflation cannot widen: refused at the E-step, before θ moves
    pyro.clear_param_store()
    counts = torch.tensor([1.0, 2.0, 0.0])
    iwem = IWEM(unsupported_model, unsupported_guide, K=3, J=3, proposal_inflation=C, one_pass=one_pass)
    unsupported_guide(counts)
    before = pyro.param("a").detach().clone()
    with pytest.raises(ModelError, match="guide site 'rate'"):
        iwem.step(counts)
    assert torch.equal(pyro.param("a").detach(), before)


def test_one_pass_step_inflates_its_k_particles():
    m = PPCA(D=3, d=2)
    x = torch.randn(6, 3, dtype=F64)
    iwem = IWEM(m.model, m.guide, K=4, one_pass=True, proposal_inflation=C, optim=pyro.optim.SGD({"lr": 0.0}))
    iwem.sampler = spy = Spy(iwem.sampler)
    iwem.step(x)
    ((inflation, particles),) = spy.calls
    assert inflation == C
    z = particles.guide_trace.nodes["z"]["value"]
    log_q = torch.stack([ppca_by_hand(x, z[k], C)[1] for k in range(4)])
    torch.testing.assert_close(particles.log_q.detach(), log_q)
