"""The baselines (VAE, IWAE, STL, IWAE-DReG, IWAE-as-EM) and the method registry.

Values are checked against Pyro's ``RenyiELBO(alpha=0)`` and against closed-form
likelihoods; φ-gradients against closed-form per-particle expressions and, in
expectation, against each other with tolerances from measured standard errors.

The statistical tests use a 1-D linear-Gaussian model whose guide has one copy of its
parameters per datum: the gradient of each copy is the gradient of that datum's
objective alone, so one vectorised call over M data gives M independent gradient
samples (their mean and variance), with the guide's parameters away from the optimum.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, RenyiELBO
from torch.distributions import constraints

from pyro_iwem import (
    IWEM,
    Annealing,
    DReGLoss,
    IWAEasEM,
    IWAELoss,
    OptimalProposalLoss,
    STLLoss,
    VAELoss,
    build_method,
)
from pyro_iwem.infer import METHODS, OnePassIWEM, snis_objective

COMPLETE_DATA_METHODS = [name for name in METHODS if not name.startswith("miss-")]
from pyro_iwem.infer.losses import ParticleLoss
from pyro_iwem.infer.transforms import StopProposalParams
from pyro_iwem.infer.methods import SVIStep
from tests.gaussian_models import PPCA, TwoLayerGaussian, one_weight_model

T = torch.float64


class Gaussian1D:
    r"""z ~ N(0, 1), x | z ~ N(w z + b, σ²) with θ = (w, b); guide N(a_i x_i + c_i, s_i²) with
    φ = (a, c, s) one copy per datum (all copies start equal), so ∂loss/∂φ_i is datum i's gradient.

    The posterior is N(w (x - b) / (w² + σ²), σ² / (w² + σ²)); the starting guide
    (a, c, s) = (0.2, -0.4, 1.2) is far from it (a* = 0.55, s* = 0.42 at the starting θ).
    """

    sigma = 0.7

    def __init__(self, w=1.5, b=0.3, a=0.2, c=-0.4, s=1.2):
        self.theta0 = {"w": w, "b": b}
        self.phi0 = {"a": a, "c": c, "s": s}

    def model(self, x):
        w = pyro.param("w", torch.tensor(self.theta0["w"], dtype=T))
        b = pyro.param("b", torch.tensor(self.theta0["b"], dtype=T))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=T), 1.0))
            pyro.sample("x", dist.Normal(w * z + b, self.sigma), obs=x)

    def guide(self, x):
        M = x.shape[0]
        a = pyro.param("a", torch.full((M,), self.phi0["a"], dtype=T))
        c = pyro.param("c", torch.full((M,), self.phi0["c"], dtype=T))
        s = pyro.param("s", torch.full((M,), self.phi0["s"], dtype=T), constraint=constraints.positive)
        with pyro.plate("data", M):
            pyro.sample("z", dist.Normal(a * x + c, s))

    def exact_posterior_phi(self):
        w, b = self.theta0["w"], self.theta0["b"]
        v = w**2 + self.sigma**2
        return {"a": w / v, "c": -w * b / v, "s": self.sigma / math.sqrt(v)}

    def log_marginal(self, x):
        w, b = self.theta0["w"], self.theta0["b"]
        return dist.Normal(torch.tensor(b, dtype=T), math.sqrt(w**2 + self.sigma**2)).log_prob(x)

    def data(self, M, seed=101):  # not 0: the global RNG is seeded with 0, and the draws must not share a stream
        """M data drawn from the model's marginal at the starting θ."""
        g = torch.Generator().manual_seed(seed)
        w, b = self.theta0["w"], self.theta0["b"]
        return b + math.sqrt(w**2 + self.sigma**2) * torch.randn(M, generator=g, dtype=T)


PHI = ("a", "c", "s")
THETA_PPCA = ("W", "mu", "sigma")
PHI_PPCA = ("A", "c", "s")


def clear_grads():
    for name in pyro.get_param_store():
        pyro.get_param_store().get_param(name).unconstrained().grad = None


def grad_of(name):
    g = pyro.get_param_store().get_param(name).unconstrained().grad
    assert g is not None, f"no gradient for {name}"
    return g.detach().clone()


def per_datum_phi_grads(loss, m, x):
    """One ``loss_and_grads`` call on a fresh store: the per-datum φ-gradients (M independent samples)."""
    pyro.clear_param_store()
    loss.loss_and_grads(m.model, m.guide, x)
    return {name: grad_of(name) for name in PHI}


def set_exact_ppca(m):
    """PPCA parameters with the guide at the exact posterior (d = 1 lies in the guide family)."""
    W = torch.tensor([[1.0], [0.5], [-2.0]], dtype=T)
    mu, sigma = torch.tensor([0.1, 0.2, 0.3], dtype=T), torch.tensor(0.6, dtype=T)
    A, c, s = m.exact_guide_params(W, mu, sigma)
    for name, value in {"W": W, "mu": mu, "sigma": sigma, "A": A, "c": c, "s": s}.items():
        pyro.param(name, value, constraint=constraints.positive if name in ("sigma", "s") else constraints.real)
    return W, mu, sigma


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("K", [1, 5, 20])
def test_iwae_value_equals_renyi_elbo_on_the_same_seed(K):
    """Seeded alike, IWAE (and STL, DReG, which report the same bound) equal Pyro's RenyiELBO(α=0).

    Both draw the guide's noise as one (K, B, d) tensor in a particle plate at dim -2 (the
    plate nesting is given, so neither runs a guessing pass first): the same samples.
    """
    m = PPCA(D=3, d=1)
    x = torch.randn(6, 3, dtype=T) * 2
    pyro.param("W", torch.tensor([[1.0], [0.5], [-2.0]], dtype=T))  # away from the guide's optimum
    pyro.set_rng_seed(7)
    expected = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1).loss(m.model, m.guide, x)
    for loss in (IWAELoss(K, max_plate_nesting=1), STLLoss(K, max_plate_nesting=1), DReGLoss(K, max_plate_nesting=1)):
        pyro.set_rng_seed(7)
        assert loss.loss(m.model, m.guide, x) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        pyro.set_rng_seed(7)
        clear_grads()
        assert loss.loss_and_grads(m.model, m.guide, x) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # a different seed gives a different value: the equality above is about the samples
    pyro.set_rng_seed(8)
    assert IWAELoss(K, max_plate_nesting=1).loss(m.model, m.guide, x) != pytest.approx(expected, rel=1e-6)


def test_values_are_minus_log_likelihood_with_the_exact_posterior():
    """With q = p(z | x) every weight is p(x): every loss is -Σ log p(x) exactly, for any K."""
    m = PPCA(D=3, d=1)
    W, mu, sigma = set_exact_ppca(m)
    x = torch.randn(6, 3, dtype=T) * 2
    exact = -PPCA.log_likelihood(x, W, mu, sigma).sum().item()
    losses = [VAELoss(1), VAELoss(7), IWAELoss(1), IWAELoss(13), STLLoss(13), DReGLoss(13)]
    for loss in losses:
        assert loss.loss(m.model, m.guide, x) == pytest.approx(exact, abs=1e-9), type(loss).__name__
        clear_grads()
        assert loss.loss_and_grads(m.model, m.guide, x) == pytest.approx(exact, abs=1e-9), type(loss).__name__
    for K in (1, 13):
        renyi = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True)
        assert renyi.loss(m.model, m.guide, x) == pytest.approx(exact, abs=1e-9)
    # the guide is what makes it exact: perturbed, the bound is strictly below log p(x)
    pyro.get_param_store()["c"] = pyro.param("c").detach() + 0.5
    assert IWAELoss(13).loss(m.model, m.guide, x) > exact + 1e-3


def test_iwae_value_matches_renyi_elbo_in_expectation():
    """Independent samples: E[IWAE loss] = E[RenyiELBO(α=0) loss] within 4 standard errors.

    Each call scores 400 data (4 distinct values, 100 copies each) with K = 5; R = 100
    calls of each give the means and their measured standard errors. IWAE with K = 4
    instead of 5 must be resolved by the same tolerance (the check has power).
    """
    m = Gaussian1D()
    x = m.data(4, seed=3).repeat(100)
    K, R = 5, 100

    def calls(fn):
        values = torch.tensor([fn() for _ in range(R)], dtype=T)
        return values.mean().item(), values.std().item() / math.sqrt(R)

    renyi = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    ours, se_ours = calls(lambda: IWAELoss(K).loss(m.model, m.guide, x))
    pyro_mean, se_pyro = calls(lambda: renyi.loss(m.model, m.guide, x))
    fewer, se_fewer = calls(lambda: IWAELoss(K - 1).loss(m.model, m.guide, x))
    tol = 4 * math.hypot(se_ours, se_pyro)
    assert abs(ours - pyro_mean) < tol, (ours, pyro_mean, tol)
    assert abs(fewer - pyro_mean) > 2 * 4 * math.hypot(se_fewer, se_pyro), (fewer, pyro_mean)


def test_values_by_hand_from_particles():
    """On one draw: IWAE's value is logsumexp_k log w - log K, VAE's the mean of log w (per datum)."""
    m = Gaussian1D()
    x = m.data(5)
    K = 9
    iwae, vae = IWAELoss(K), VAELoss(K)
    particles = iwae.sampler(m.model, m.guide)(K, (x,), {}, grad_guide=False)
    z = particles.guide_trace.nodes["z"]["value"]
    assert z.shape == (K, 5)
    w, b = m.theta0["w"], m.theta0["b"]
    a, c, s = (m.phi0[n] for n in PHI)
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(w * z + b, m.sigma).log_prob(x)
        - dist.Normal(a * x + c, s).log_prob(z)
    )
    torch.testing.assert_close(iwae.value(particles), torch.logsumexp(log_w, 0) - math.log(K))
    torch.testing.assert_close(vae.value(particles), log_w.mean(0))
    torch.testing.assert_close(vae.scaled(particles, vae.value(particles)), -log_w.mean(0).sum())
    # the two differ (Jensen): a loss that averaged log w in IWAE would fail the first check
    assert (iwae.value(particles) - vae.value(particles)).min() > 1e-3


def test_vae_value_is_minus_mean_log_weight_and_exact_with_the_exact_posterior():
    """VAELoss's value on its own draw is -Σ_i mean_k log w_ik; K = 1 with q = posterior is -Σ log p(x)."""
    m = Gaussian1D()
    x = m.data(6)
    vae = VAELoss(4, max_plate_nesting=1)  # no nesting-guessing pass consumes random numbers
    pyro.set_rng_seed(11)
    value = vae.loss(m.model, m.guide, x)
    pyro.set_rng_seed(11)  # the same draw, through the sampler
    particles = vae.sampler(m.model, m.guide)(4, (x,), {}, grad_guide=False)
    assert value == pytest.approx(-particles.log_w.mean(0).sum().item(), rel=1e-12)
    assert value != pytest.approx(-(torch.logsumexp(particles.log_w, 0) - math.log(4)).sum().item(), rel=1e-6)

    pyro.clear_param_store()
    exact = Gaussian1D(**Gaussian1D().exact_posterior_phi())
    expected = -exact.log_marginal(x).sum().item()
    assert VAELoss(1).loss(exact.model, exact.guide, x) == pytest.approx(expected, abs=1e-10)
    assert VAELoss(1).loss_and_grads(exact.model, exact.guide, x) == pytest.approx(expected, abs=1e-10)


# ----------------------------------------------------------------------------- gradients


def closed_form_phi_grads(m, x, z, estimator):
    """∂loss/∂(a, c, log s) per datum from the sampled z (K, M), by hand.

    Path derivative g_k = ∂_z[log p(x, z) - log q(z)] · ∂z/∂φ with ∂z/∂(a, c, log s) =
    (x, 1, z - m). IWAE: Σ w̄_k (∂_z log p ∂z/∂φ - d/dφ log q(z(φ); φ)) with
    d log q/d(a, c, log s) = (0, 0, -1); STL: Σ w̄_k g_k; DReG: Σ w̄_k² g_k.
    """
    w, b = m.theta0["w"], m.theta0["b"]
    a, c, s = (m.phi0[n] for n in PHI)
    loc = a * x + c
    log_w = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(w * z + b, m.sigma).log_prob(x) - dist.Normal(loc, s).log_prob(z)
    wbar = torch.softmax(log_w, 0)
    dlogp_dz = -z + w * (x - w * z - b) / m.sigma**2
    dlogq_dz = -(z - loc) / s**2
    dz = {"a": x.expand_as(z), "c": torch.ones_like(z), "s": z - loc}
    if estimator == "iwae":
        total_q = {"a": 0.0, "c": 0.0, "s": -1.0}
        return {n: -(wbar * (dlogp_dz * dz[n] - total_q[n])).sum(0) for n in PHI}
    power = {"stl": 1, "dreg": 2}[estimator]
    return {n: -(wbar**power * (dlogp_dz - dlogq_dz) * dz[n]).sum(0) for n in PHI}


@pytest.mark.parametrize("loss_class, estimator", [(IWAELoss, "iwae"), (STLLoss, "stl"), (DReGLoss, "dreg")])
def test_phi_gradients_equal_the_closed_form_on_the_same_particles(loss_class, estimator):
    m = Gaussian1D()
    x = m.data(7)
    K = 6
    loss = loss_class(K)
    particles = loss.sampler(m.model, m.guide)(
        K, (x,), {}, grad_guide=True, transforms=[StopProposalParams(loss_class.__name__)] if loss.stop_proposal_params else []
    )
    loss.grads_from_particles(particles)
    z = particles.guide_trace.nodes["z"]["value"].detach()
    expected = closed_form_phi_grads(m, x, z, estimator)
    for name in PHI:
        torch.testing.assert_close(grad_of(name), expected[name], rtol=1e-10, atol=1e-12)
    # the three estimators really differ on these particles (the checks above discriminate)
    others = {e for e in ("iwae", "stl", "dreg") if e != estimator}
    for other in others:
        alt = closed_form_phi_grads(m, x, z, other)
        assert any((alt[n] - expected[n]).abs().max() > 1e-3 for n in PHI), other


def test_stl_and_dreg_phi_gradients_vanish_at_the_exact_posterior():
    """With q = p(z | x), log w̃ is constant in z: STL and DReG give exactly zero φ-gradients
    (zero variance), whereas IWAE's per-sample φ-gradient is the nonzero score term."""
    m = Gaussian1D(**Gaussian1D().exact_posterior_phi())
    x = m.data(50)
    for loss in (STLLoss(1), STLLoss(10), DReGLoss(10)):
        g = per_datum_phi_grads(loss, m, x)
        for name in PHI:
            assert g[name].abs().max() < 1e-10, (type(loss).__name__, name, g[name].abs().max().item())
    g = per_datum_phi_grads(IWAELoss(10), m, x)
    assert g["s"].abs().max() > 1e-2


def _compare_means(ga, gb, M):
    """Per parameter: (difference of means, combined standard error, |mean of ga| in SEs)."""
    out = {}
    for name in PHI:
        se = math.sqrt(ga[name].var().item() / M + gb[name].var().item() / M)
        diff = (ga[name].mean() - gb[name].mean()).item()
        signal = abs(ga[name].mean().item()) / (ga[name].std().item() / math.sqrt(M))
        out[name] = (diff, se, signal)
    return out


def test_dreg_is_unbiased_for_the_iwae_phi_gradient():
    """K = 10, M = 20000 independent samples each: E[DReG φ-grad] = E[IWAE φ-grad] within
    4 combined standard errors. STL (w̄ instead of w̄²) is biased for K > 1 and must be
    rejected by the same test, far outside the tolerance."""
    m = Gaussian1D()
    M, K = 20000, 10
    x = m.data(M)
    iwae = per_datum_phi_grads(IWAELoss(K), m, x)
    dreg = per_datum_phi_grads(DReGLoss(K), m, x)
    stl = per_datum_phi_grads(STLLoss(K), m, x)
    for name, (diff, se, signal) in _compare_means(iwae, dreg, M).items():
        assert signal > 8, (name, signal)  # the expected gradient is far from zero: not a vacuous match
        assert abs(diff) < 4 * se, f"{name}: IWAE - DReG = {diff:.4g}, {abs(diff) / se:.2f} SE"
    biased = _compare_means(iwae, stl, M)
    assert max(abs(d) / se for d, se, _ in biased.values()) > 10, biased


def test_stl_at_one_particle_is_unbiased_for_the_elbo_phi_gradient():
    """K = 1, M = 20000: E[STL φ-grad] = E[VAE (reparameterised ELBO) φ-grad] within 4 SE."""
    m = Gaussian1D()
    M = 20000
    x = m.data(M)
    vae = per_datum_phi_grads(VAELoss(1), m, x)
    stl = per_datum_phi_grads(STLLoss(1), m, x)
    for name, (diff, se, signal) in _compare_means(vae, stl, M).items():
        assert signal > 8, (name, signal)
        assert abs(diff) < 4 * se, f"{name}: VAE - STL = {diff:.4g}, {abs(diff) / se:.2f} SE"


def test_dreg_phi_gradient_has_lower_variance_than_iwae_at_k50():
    """Tucker et al.'s headline: at K = 50 the DReG φ-gradient's variance is a small fraction of IWAE's."""
    m = Gaussian1D()
    M, K = 4000, 50
    x = m.data(M)
    iwae = per_datum_phi_grads(IWAELoss(K), m, x)
    dreg = per_datum_phi_grads(DReGLoss(K), m, x)
    ratios = {name: (dreg[name].var() / iwae[name].var()).item() for name in PHI}
    assert max(ratios.values()) < 0.1, f"Var(DReG) / Var(IWAE) at K = 50: {ratios}"


def test_theta_gradients_of_stl_and_dreg_equal_iwae_on_the_same_particles():
    """STL and DReG change the φ-estimator only: on the same z their θ-gradients are IWAE's."""
    m = PPCA(D=3, d=1)
    x = torch.randn(8, 3, dtype=T) * 2
    K = 7
    iwae = IWAELoss(K)
    pyro.set_rng_seed(7)  # the same seed draws the same particles (the plate guess draws none)
    particles = iwae.sampler(m.model, m.guide)(K, (x,), {}, grad_guide=True)
    iwae.grads_from_particles(particles)
    expected = {name: grad_of(name) for name in THETA_PPCA}
    phi_iwae = {name: grad_of(name) for name in PHI_PPCA}
    for loss in (STLLoss(K), DReGLoss(K)):
        clear_grads()
        pyro.set_rng_seed(7)
        replayed = loss.sampler(m.model, m.guide)(K, (x,), {}, grad_guide=True, transforms=[StopProposalParams("STLLoss")])
        torch.testing.assert_close(replayed.log_w, particles.log_w, rtol=0, atol=0)
        loss.grads_from_particles(replayed)
        for name in THETA_PPCA:
            assert expected[name].abs().max() > 1e-3
            torch.testing.assert_close(grad_of(name), expected[name], rtol=1e-12, atol=1e-12)
        # their φ-gradients are not IWAE's (else the θ/φ split would be untested)
        assert any((grad_of(n) - phi_iwae[n]).abs().max() > 1e-6 for n in PHI_PPCA), type(loss).__name__


# ----------------------------------------------------------------------------- IWAE as EM


def test_iwae_as_em_theta_gradient_equals_iwae_on_the_same_particles():
    """Proposition 1 through the losses: ∇θ of eq. (2) = IWAELoss's θ-gradient, on one draw."""
    m = PPCA(D=3, d=1)
    x = torch.randn(8, 3, dtype=T) * 2
    K = 9
    iwae = IWAELoss(K)
    particles = iwae.sampler(m.model, m.guide)(K, (x,), {}, grad_guide=True)
    theta = [pyro.param(n).unconstrained() for n in THETA_PPCA]
    grads = torch.autograd.grad(-snis_objective(particles).sum(), theta, retain_graph=True)
    # the ELBO's θ-gradient (uniform weights) is different: the weights matter
    elbo = torch.autograd.grad(-particles.log_p.mean(0).sum(), theta, retain_graph=True)
    assert any((e - g).abs().max() > 1e-3 for e, g in zip(elbo, grads))
    iwae.grads_from_particles(particles)
    for name, g in zip(THETA_PPCA, grads):
        assert g.abs().max() > 1e-3
        torch.testing.assert_close(g, grad_of(name), rtol=1e-10, atol=1e-12)


def test_iwae_as_em_step_moves_theta_as_an_iwae_svi_step():
    """From identical states and seeds, one IWAEasEM.step and one SVI(IWAELoss) step with SGD
    give the same θ (the E-step draws the same z's as IWAE); φ differs, since IWAE-as-EM's
    P-step draws fresh particles at θ_{t+1}."""
    m = PPCA(D=3, d=1)
    x = torch.randn(8, 3, dtype=T) * 2
    K = 6

    def after_one_step(make):
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        make().step(x)
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    class NoStep:  # only creates the parameters: the initial state
        def step(self, x):
            m.model(x), m.guide(x)

    initial = after_one_step(NoStep)
    em = after_one_step(lambda: IWAEasEM(m.model, m.guide, K=K, optim=pyro.optim.SGD({"lr": 0.05})))
    svi = after_one_step(lambda: SVI(m.model, m.guide, pyro.optim.SGD({"lr": 0.05}), IWAELoss(K)))
    for name in THETA_PPCA:
        assert (em[name] - initial[name]).abs().max() > 1e-3, name
        torch.testing.assert_close(em[name], svi[name], rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(em[n], svi[n]) for n in PHI_PPCA)


def test_iwae_as_em_is_iwem_with_alpha_one_and_the_iwae_p_step():
    m = PPCA()
    em = IWAEasEM(m.model, m.guide, K=7)
    assert em.alpha == 1.0 and em.K == 7 and em.J == 7
    assert type(em.proposal_loss) is IWAELoss
    assert IWAEasEM(m.model, m.guide, K=7, J=3).J == 3
    assert build_method("iwae-em", m.model, m.guide, K=7, J=None).J == 7


# ----------------------------------------------------------------------------- errors


def bernoulli_model(x):
    mu = pyro.param("mu", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        k = pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(k + mu, 1.0), obs=x)


def bernoulli_guide(x):
    p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("k", dist.Bernoulli(p))


@pytest.mark.parametrize("loss_class", [STLLoss, DReGLoss])
def test_stl_and_dreg_refuse_a_non_reparameterisable_guide_naming_the_site(loss_class):
    svi = SVI(bernoulli_model, bernoulli_guide, pyro.optim.Adam({"lr": 0.01}), loss_class(num_particles=3))
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(ValueError, match=f"guide site 'k'.*not reparameterisable.*{loss_class.__name__}"):
        svi.step(torch.zeros(4))
    assert all(torch.equal(v, pyro.param(k).detach()) for k, v in before.items())
    # the value alone needs no reparameterisation
    assert math.isfinite(svi.evaluate_loss(torch.zeros(4)))


@pytest.mark.parametrize("name", [n for n in COMPLETE_DATA_METHODS if n not in ("stl", "dreg")])
def test_every_other_method_steps_a_non_reparameterisable_guide(name):
    """Score-function gradients: the Bernoulli guide's parameter moves, the model's too."""
    method = build_method(name, bernoulli_model, bernoulli_guide, K=3, J=3, optim=pyro.optim.Adam({"lr": 0.1}))
    x = torch.full((4,), 1.0)
    method.step(x)
    assert pyro.param("p").item() != pytest.approx(0.3, abs=1e-6)
    assert pyro.param("mu").item() != 0.0


# ----------------------------------------------------------------------------- registry


def test_methods_registry_names():
    assert set(COMPLETE_DATA_METHODS) == {
        "vae", "iwae", "iwae-em", "stl", "dreg", "iwem", "iwem-woo", "iwem-woa", "iwem-one-pass"
    }
    assert set(METHODS) - set(COMPLETE_DATA_METHODS) == {"miss-iwae", "miss-iwem", "miss-iwem-woa"}


@pytest.mark.parametrize("name", COMPLETE_DATA_METHODS)
def test_build_method_builds_and_steps_every_method(name):
    m = PPCA(D=3, d=1)
    x = torch.randn(8, 3, dtype=T) * 2
    L = 2 if name in ("iwem", "iwem-woo") else 1  # the others have no ELBO term of L particles, and refuse L != 1
    method = build_method(name, m.model, m.guide, K=4, J=3, L=L, optim=pyro.optim.SGD({"lr": 0.01}))
    loss = method.step(x)
    assert isinstance(loss, float) and math.isfinite(loss)
    store = pyro.get_param_store()
    initial = {"W": 0.1 * torch.ones(3, 1, dtype=T), "A": torch.zeros(1, 3, dtype=T), "s": torch.ones(1, dtype=T)}
    for pname, value in initial.items():  # one step moved θ and φ
        assert not torch.allclose(store[pname].detach(), value), (name, pname)
    method.end_epoch()
    assert isinstance(method.state_dict(), dict)
    assert hasattr(method, "ess")

    svi_losses = {"vae": VAELoss, "iwae": IWAELoss, "stl": STLLoss, "dreg": DReGLoss}
    if name in svi_losses:
        assert isinstance(method, SVIStep)
        assert type(method.loss_and_grads.__self__) is svi_losses[name]
        assert method.loss_and_grads.__self__.num_particles == 4
        assert method.alpha is None
    else:
        assert isinstance(method, IWEM) and method.K == 4
        expected = {
            "iwae-em": (IWAEasEM, 1.0, IWAELoss),
            "iwem": (IWEM, 0.0, OptimalProposalLoss),
            "iwem-woo": (IWEM, 0.0, IWAELoss),
            "iwem-woa": (IWEM, 1.0, OptimalProposalLoss),
            "iwem-one-pass": (OnePassIWEM, 0.0, OptimalProposalLoss),
        }[name]
        assert method.one_pass == (name == "iwem-one-pass")
        assert type(method) is expected[0]
        assert type(method.proposal_loss) is expected[2]
        assert method.J == 3
        if name != "iwae-em":
            assert method.L == L
            # α before the first step: rebuild (the step above may have advanced the controller)
            fresh = build_method(name, m.model, m.guide, K=4, J=3)
            assert fresh.alpha == expected[1]
        else:
            assert method.alpha == 1.0


def test_iwem_woa_ignores_annealing_and_iwem_follows_it():
    """Given the same controller schedule, IWEM's α grows from 0 while IWEM-woa's stays 1."""
    m = PPCA(D=3, d=1)
    x = torch.randn(8, 3, dtype=T)
    methods = {
        name: build_method(name, m.model, m.guide, K=3, J=3, annealing=Annealing(0.25, every=1))
        for name in ("iwem", "iwem-woo", "iwem-woa")
    }
    assert {n: meth.alpha for n, meth in methods.items()} == {"iwem": 0.0, "iwem-woo": 0.0, "iwem-woa": 1.0}
    for meth in methods.values():
        meth.step(x)
        meth.step(x)
    assert {n: meth.alpha for n, meth in methods.items()} == {"iwem": 0.5, "iwem-woo": 0.5, "iwem-woa": 1.0}


def test_build_method_unknown_name_lists_the_choices():
    m = PPCA()
    with pytest.raises(ValueError, match="unknown method 'iwem2'") as info:
        build_method("iwem2", m.model, m.guide)
    for name in METHODS:
        assert name in str(info.value)


def test_stl_and_dreg_refuse_a_guide_that_uses_model_parameters():
    """Stopping q's parameters would also stop θ's score term: a clear error, not a biased θ-gradient."""
    T = torch.float64
    model = one_weight_model

    def guide(x):
        w = pyro.param("w", torch.tensor(1.5, dtype=T))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.3 * w * x, 1.0))

    x = torch.tensor([0.5, -1.0, 2.0], dtype=T)
    for loss in (STLLoss(5), DReGLoss(5)):
        with pytest.raises(ValueError, match="guide uses model parameters"):
            loss.loss_and_grads(model, guide, x)
    assert math.isfinite(IWAELoss(5).loss_and_grads(model, guide, x))


def test_dreg_one_backward_pass_equals_its_two_surrogates():
    """DReG's one-pass gradients (a hook rescaling what reaches each latent) equal the two-surrogate
    form on the same particles, for a guide whose second latent depends on the first (a latent
    reached twice, directly and through another, is rescaled once)."""

    def guide(x):
        A1 = pyro.param("A1", 0.3 * torch.ones(2, 3, dtype=T))
        c = pyro.param("c", torch.tensor([0.5, -0.4], dtype=T))
        s = pyro.param("s", torch.ones(2, dtype=T), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x @ A1.T, s).to_event(1))
            pyro.sample("z2", dist.Normal(c * z1 + 0.1, s).to_event(1))

    m = TwoLayerGaussian()
    x = torch.randn(6, 3, dtype=T)
    loss = DReGLoss(num_particles=5)
    pyro.set_rng_seed(3)
    one_pass = loss.gradients(loss._particles(m.model, guide, (x,), {})[0])
    pyro.set_rng_seed(3)  # the same particles again: each form frees its graph
    two_surrogates = ParticleLoss.gradients(loss, loss._particles(m.model, guide, (x,), {})[0])
    assert set(one_pass) == set(two_surrogates) and len(one_pass) >= 7
    for p, g in one_pass.items():
        torch.testing.assert_close(g, two_surrogates[p])
