"""IWEM against the paper's propositions and a model with a closed-form MLE."""

import math

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI

from pyro_iwem import IWEM, Annealing, IWAELoss, OptimalProposalLoss, iwae_bound
from pyro_iwem.infer import ParticleSampler, iwae_objective, log_mean_exp, snis_objective
from pyro_iwem.infer.transforms import DetachModelProposals
from tests.gaussian_models import PPCA, TwoLayerGaussian, normal_chi_square


def test_proposition_1_snis_gradient_equals_iwae_gradient():
    """∇θ Q̂(θ | θ_t) at θ_t equals ∇θ of the IWAE bound on the same samples (two latent sites)."""
    m = TwoLayerGaussian()
    x = torch.randn(8, 3, dtype=torch.float64)
    particles = ParticleSampler(m.model, m.guide)(50, (x,), {}, grad_guide=False)
    theta = [pyro.param(n).unconstrained() for n in ("a", "W", "b", "sigma")]
    grad_q = torch.autograd.grad(snis_objective(particles).sum(), theta, retain_graph=True)
    grad_iwae = torch.autograd.grad(iwae_objective(particles).sum(), theta)
    for gq, gi in zip(grad_q, grad_iwae):
        assert gq.abs().max() > 1e-3  # a gradient that vanished would make the test vacuous
        torch.testing.assert_close(gq, gi, atol=1e-5, rtol=1e-5)


def test_proposition_2_iw_divergence_approaches_chi_square():
    r"""2K · D_IW(q‖p) → χ²(p‖q) for p = N(0, 1), q = N(0.5, 1.5²) (p/q bounded since s > 1).

    D_IW = -E log W̄_K, W̄_K the mean of K weights p/q with E W̄_K = 1, is estimated over
    M = 4000 replicates (a data plate of M one-dimensional "data") as E[(W̄ - 1) - log W̄]:
    the added term has mean zero and cancels the first-order noise, leaving per-replicate
    values ≈ (W̄ - 1)²/2 whose standard error is measured. The expansion
    2K·D_IW = χ² + O(1/K) explains the gap at small K, which must shrink as K grows.
    """
    mu, s, M = 0.5, 1.5, 4000
    chi2 = normal_chi_square(mu, s)

    def p_model():
        with pyro.plate("replicates", M):
            pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))

    def q_guide():
        with pyro.plate("replicates", M):
            pyro.sample("z", dist.Normal(torch.tensor(mu, dtype=torch.float64), s))

    sampler = ParticleSampler(p_model, q_guide)
    errors = {}
    for K in (2, 20, 1000):
        log_w = sampler(K, (), {}, grad_guide=False).log_w
        log_mean_w = log_mean_exp(log_w)
        per_replicate = 2 * K * (log_mean_w.exp() - 1 - log_mean_w)
        estimate, se = per_replicate.mean().item(), per_replicate.std().item() / math.sqrt(M)
        errors[K] = abs(estimate - chi2)
        if K == 1000:
            assert errors[K] < 4 * se + 2.0 / K, (estimate, chi2, se)
    assert errors[1000] < errors[2]


@pytest.mark.parametrize("one_pass", [False, True])
def test_iwem_reaches_the_ppca_maximum_likelihood(one_pass):
    """Trained by IWEM (the paper's step, or the one-pass step), pPCA's exact log-likelihood
    reaches the closed-form MLE's within 0.01 nats/datum."""
    torch.manual_seed(0)
    n, D = 300, 3
    W_true = torch.tensor([[2.0], [1.0], [-1.0]], dtype=torch.float64)
    x = torch.randn(n, 1, dtype=torch.float64) @ W_true.T + 0.5 * torch.randn(n, D, dtype=torch.float64) + 1.0
    m = PPCA(D=D, d=1)
    iwem = IWEM(
        m.model, m.guide, K=20, J=20, optim=pyro.optim.Adam({"lr": 0.03}), annealing=Annealing(0.1, every=20),
        one_pass=one_pass,
    )
    for step in range(1500):
        if step == 1200:  # a smaller step for the last stretch, as a schedule would
            iwem.optim = pyro.optim.Adam({"lr": 0.003})
        iwem.step(x)
    prm = pyro.get_param_store()
    learned = PPCA.log_likelihood(x, prm["W"], prm["mu"], prm["sigma"]).mean()
    best = PPCA.max_log_likelihood(x, d=1).mean()
    start = PPCA.log_likelihood(x, 0.1 * torch.ones(D, 1, dtype=torch.float64), torch.zeros(D), torch.tensor(1.0)).mean()
    assert best - start > 1.0  # the test starts far from the optimum
    assert learned <= best + 1e-9  # nothing beats the MLE
    assert best - learned < 0.01, (learned.item(), best.item())
    assert iwem.alpha == 1.0


def test_step_updates_theta_in_m_step_and_phi_in_p_step():
    """The M-step changes only θ and the P-step only φ: the P-step's gradient never reaches θ."""
    m = TwoLayerGaussian()
    x = torch.randn(8, 3, dtype=torch.float64)
    iwem = IWEM(m.model, m.guide, K=5, J=5, optim=pyro.optim.SGD({"lr": 0.01}))
    iwem.evaluate_loss(x)  # creates the params
    store = pyro.get_param_store()
    before = {k: v.detach().clone() for k, v in store.items()}
    particles, _ = iwem._e_step(iwem.alpha, (x,), {})
    assert {k for k in store if k in particles.model_trace.nodes} == {"a", "W", "b", "sigma"}
    iwem.step(x)
    for name in store:
        assert not torch.equal(before[name], store[name].detach()), name


def test_p_step_gradient_is_the_optimal_proposal_gradient():
    """With SGD and lr 1, the P-step moves φ by exactly -∇φ of eq. (7)'s loss on its particles."""
    m = TwoLayerGaussian()
    x = torch.randn(8, 3, dtype=torch.float64)
    loss_fn = OptimalProposalLoss(num_particles=7)
    sampler = loss_fn.sampler(m.model, m.guide)
    particles = sampler(7, (x,), {}, grad_guide=True)
    phi = pyro.param("A1").unconstrained()
    theta = pyro.param("W").unconstrained()
    loss = loss_fn.scaled(particles, loss_fn.objectives(particles)[1])
    expected = -(particles.log_p.abs().log() + particles.log_w).logsumexp(0) + math.log(7)
    torch.testing.assert_close(loss, expected.sum())
    before_theta = theta.detach().clone()
    (grad,) = torch.autograd.grad(loss, phi, retain_graph=True)
    pyro.infer.util.zero_grads([phi])
    from pyro_iwem.infer.grads import accumulate_grads

    from pyro_iwem.infer.grads import gradients

    accumulate_grads(gradients(loss, {phi, *[pyro.param(n).unconstrained() for n in ("A2", "s")]}))
    torch.testing.assert_close(phi.grad, grad)
    assert theta.grad is None and torch.equal(theta.detach(), before_theta)


def test_optimal_proposal_loss_with_svi_steps_the_guide_only():
    m = TwoLayerGaussian()
    x = torch.randn(16, 3, dtype=torch.float64)
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 0.05}), OptimalProposalLoss(num_particles=10))
    losses = [svi.step(x) for _ in range(60)]
    store = pyro.get_param_store()
    m2 = TwoLayerGaussian()
    for name in ("a", "W", "b"):
        torch.testing.assert_close(store[name], m2.init[name])
    assert not torch.equal(store["A1"], m2.init["A1"])
    assert sum(losses[-10:]) < sum(losses[:10])
    assert isinstance(svi.evaluate_loss(x), float)


def test_ablations_change_exactly_what_they_should():
    """annealing=None is α ≡ 1 (the snIS E-step); proposal="iwae" is IWAE's P-step."""
    m = TwoLayerGaussian()
    x = torch.randn(8, 3, dtype=torch.float64)
    assert IWEM(m.model, m.guide, annealing=None).alpha == 1.0
    assert IWEM(m.model, m.guide).alpha == 0.0
    assert isinstance(IWEM(m.model, m.guide, proposal="iwae").proposal_loss, IWAELoss)
    assert isinstance(IWEM(m.model, m.guide).proposal_loss, OptimalProposalLoss)

    def run(**kw):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        iwem = IWEM(m.model, m.guide, K=6, J=6, optim=pyro.optim.SGD({"lr": 0.01}), **kw)
        iwem.step(x)
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    theta, phi = ("a", "W", "b", "sigma"), ("A1", "A2", "s")
    base = run(annealing=None)
    # α = 1 through the controller draws the same particles and takes the same steps
    same = run(annealing=Annealing(start=1.0))
    for k in base:
        torch.testing.assert_close(base[k], same[k])
    # the IWAE P-step leaves the M-step as it was and changes the proposal update
    woo = run(annealing=None, proposal="iwae")
    for k in theta:
        torch.testing.assert_close(base[k], woo[k])
    assert any(not torch.allclose(base[k], woo[k]) for k in phi)
    # annealing changes the M-step (α = 0 is the ELBO's θ-gradient)
    annealed = run()
    assert any(not torch.allclose(base[k], annealed[k]) for k in theta)


def test_annealed_e_step_at_alpha_zero_is_the_elbo_theta_objective():
    m = TwoLayerGaussian()
    x = torch.randn(8, 3, dtype=torch.float64)
    sampler = ParticleSampler(m.model, m.guide)
    p = sampler(5, (x,), {}, grad_guide=False)
    torch.testing.assert_close(snis_objective(p, 4, alpha=0.0), p.log_p[4:].mean(0))
    torch.testing.assert_close(snis_objective(p, 4, alpha=0.25), 0.25 * snis_objective(p, 4) + 0.75 * p.log_p[4])


def test_step_reports_diagnostics():
    m = PPCA(D=3, d=1)
    x = torch.randn(40, 3, dtype=torch.float64)
    iwem = IWEM(m.model, m.guide, K=5, J=5)
    loss = iwem.step(x[:10])
    assert math.isfinite(loss) and 1 <= iwem.ess <= 5 and math.isfinite(iwem.p_loss)
    assert iwem.num_steps == 1


# ----------------------------------------------------------------------------- errors


def test_bad_particle_numbers():
    m = PPCA()
    for kw in ({"K": 0}, {"J": 0}, {"L": -1}, {"K": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            IWEM(m.model, m.guide, **kw)
    with pytest.raises(ValueError, match="proposal"):
        IWEM(m.model, m.guide, proposal="best")
    with pytest.raises(TypeError, match="PyroOptim"):
        IWEM(m.model, m.guide, optim=torch.optim.Adam)


def normal_model(x):
    """z ~ N(0, 1), x | z ~ N(z, 1) per datum."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def prior_guide(x):
    """q(z) = N(0, 1): a guide that does not look at the data."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.0, 1.0))


def test_nan_in_observed_data_names_the_site():
    m = PPCA()
    x = torch.randn(4, 3, dtype=torch.float64)
    x[2, 1] = math.nan
    with pytest.raises(ValueError, match="argument 0 .*NaN"):
        IWEM(m.model, m.guide, K=3).step(x)

    # a guide that does not look at the data: the model's check names the site
    with pytest.raises(ValueError, match="observed site 'x'.*NaN"):
        IWEM(normal_model, prior_guide, K=3).step(torch.tensor([0.0, math.inf]))


def test_all_log_weights_minus_infinity_is_an_error():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.factor("zero_density", torch.where(z > 10.0, 0.0, -math.inf) * x[0])  # -inf for datum 0 only
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with torch.no_grad(), pytest.raises(ValueError, match="-inf for datum 0"):
        ParticleSampler(model, prior_guide)(4, (torch.tensor([1.0, 0.0, 0.0]),), {}, grad_guide=False)


def test_non_reparameterisable_guide_site_gets_a_score_function_p_step():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(k, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Bernoulli(p))

    iwem = IWEM(model, guide, K=3, J=3, optim=pyro.optim.Adam({"lr": 0.1}))
    with pytest.warns(UserWarning, match="M-step updates nothing"):
        iwem.step(torch.ones(4))
    assert pyro.param("p").item() != 0.5


def test_guide_missing_a_latent_that_cannot_be_proposed_by_the_model():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            w = pyro.sample("w", dist.ImproperUniform(dist.constraints.real, (), ()))
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    with pytest.raises(ValueError, match="model site 'w'.*guide does not sample"):
        IWEM(model, prior_guide, K=3).step(torch.zeros(4))


def test_guide_site_absent_from_model_is_an_error():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="guide site 'extra'"):
        IWEM(normal_model, guide, K=3).step(torch.zeros(4))


def test_iwae_bound_is_exact_with_the_exact_posterior_and_float64():
    """With q = p(z | x) every weight equals p(x): the bound is log p(x) for any K and chunking."""
    m = PPCA(D=3, d=1)
    W = torch.tensor([[1.0], [0.5], [-2.0]], dtype=torch.float64)
    mu, sigma = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    A, c, s = m.exact_guide_params(W, mu, sigma)
    for name, value in {"W": W, "mu": mu, "sigma": sigma, "A": A, "c": c, "s": s}.items():
        pyro.param(name, value)
    x = torch.randn(6, 3, dtype=torch.float64)
    exact = PPCA.log_likelihood(x, W, mu, sigma)
    bound = iwae_bound(m.model, m.guide, x, num_particles=250, chunk_size=100)
    assert bound.dtype == torch.float64 and bound.shape == (6,)
    torch.testing.assert_close(bound, exact, atol=1e-9, rtol=0)


def test_iwae_bound_chooses_its_chunks_from_a_memory_budget():
    """By default the chunk size comes from the budget: the probe chunk is measured, every later
    chunk fits the budget, and the bound is still exact with the exact posterior."""
    from pyro_iwem.infer import evaluation

    m = PPCA(D=3, d=1)
    W = torch.tensor([[1.0], [0.5], [-2.0]], dtype=torch.float64)
    mu, sigma = torch.zeros(3, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    A, c, s = m.exact_guide_params(W, mu, sigma)
    for name, value in {"W": W, "mu": mu, "sigma": sigma, "A": A, "c": c, "s": s}.items():
        pyro.param(name, value)
    x = torch.randn(5, 3, dtype=torch.float64)
    sampler = ParticleSampler(m.model, m.guide)
    per_particle, _ = evaluation.peak_memory(lambda: sampler(1000, (x,), {}, grad_guide=False))
    budget = int(per_particle / 1000 * 40)  # room for about 40 particles
    sizes = []
    original = ParticleSampler.__call__

    def recording(self, n, *args, **kwargs):
        sizes.append(n)
        return original(self, n, *args, **kwargs)

    ParticleSampler.__call__ = recording
    try:
        bound = iwae_bound(m.model, m.guide, x, num_particles=300, memory_budget=budget)
    finally:
        ParticleSampler.__call__ = original
    assert sizes[0] == evaluation.PROBE_PARTICLES and sum(sizes) == 300
    assert 20 <= max(sizes[1:]) <= 60, sizes
    torch.testing.assert_close(bound, PPCA.log_likelihood(x, W, mu, sigma), atol=1e-9, rtol=0)


def test_peak_memory_counts_the_tensors_alive_at_once():
    from pyro_iwem.infer.evaluation import peak_memory

    def work():
        a = torch.zeros(1000, dtype=torch.float64)  # 8 000 bytes
        b = torch.ones(500, dtype=torch.float64)  # 4 000 bytes, alive with a
        del a
        c = torch.ones(250, dtype=torch.float64)  # 2 000 bytes, after a is freed
        return b.sum() + c.sum()

    peak, result = peak_memory(work)
    assert result.item() == 750.0
    assert 12_000 <= peak < 14_100


def test_iwae_bound_tightens_with_k():
    """E[bound_K] increases with K towards log p(x) (the bound holds in expectation, so 30 draws each)."""
    m = PPCA(D=3, d=1)
    x = torch.randn(20, 3, dtype=torch.float64) * 2
    W = pyro.param("W", torch.tensor([[1.0], [0.5], [-2.0]], dtype=torch.float64))
    mu = pyro.param("mu", torch.zeros(3, dtype=torch.float64))
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=torch.float64))
    exact = PPCA.log_likelihood(x, W, mu, sigma).sum().item()
    stats = {}
    for k in (1, 10, 300):
        draws = torch.stack([iwae_bound(m.model, m.guide, x, num_particles=k).sum() for _ in range(30)])
        stats[k] = (draws.mean().item(), draws.std().item() / math.sqrt(30))
    (m1, s1), (m10, s10), (m300, s300) = stats.values()
    assert m1 + 3 * s1 < m10 and m10 + 3 * s10 < m300 + 3 * s300
    assert m300 < exact + 3 * s300
    assert exact - m300 < 0.2 * (exact - m1)


def test_one_pass_step_is_q_hat_for_theta_and_eq_7_for_phi_on_one_draw():
    """With SGD and lr 1, one one-pass step moves θ by -∇θ(-Q̂_α) and φ by -∇φ(-L_opt), both on
    the same K particles at θ_t (α = 0.3: the ELBO term averages the same particles)."""
    m = TwoLayerGaussian()
    x = torch.randn(8, 3, dtype=torch.float64)
    iwem = IWEM(m.model, m.guide, K=6, optim=pyro.optim.SGD({"lr": 1.0}), one_pass=True,
                annealing=Annealing(start=0.3, stop=0.3))
    pyro.set_rng_seed(5)
    particles = iwem.sampler(6, (x,), {}, grad_guide=True, transforms=(DetachModelProposals(),))
    theta = [pyro.param(n).unconstrained() for n in ("a", "W", "b")]
    phi = [pyro.param(n).unconstrained() for n in ("A1", "A2")]
    q_hat = snis_objective(particles, 6, 0.3).sum()
    l_opt = ((particles.log_p.abs().log() + particles.log_w).logsumexp(0) - math.log(6)).sum()
    expected = [p.detach() + g for p, g in zip(theta, torch.autograd.grad(q_hat, theta, retain_graph=True))]
    expected += [p.detach() + g for p, g in zip(phi, torch.autograd.grad(l_opt, phi))]
    pyro.set_rng_seed(5)
    iwem.step(x)
    for p, e in zip(theta + phi, expected):
        torch.testing.assert_close(p.detach(), e)


def test_one_pass_refuses_a_guide_that_uses_model_parameters():
    def model(x):
        w = pyro.param("w", torch.tensor(1.5))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w * z, 0.7), obs=x)

    def guide(x):
        w = pyro.param("w", torch.tensor(1.5))
        a = pyro.param("a", torch.tensor(0.1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(a * w * x, 1.0))

    iwem = IWEM(model, guide, K=4, one_pass=True)
    with pytest.raises(ValueError, match=r"one_pass=True\) needs a guide"):
        iwem.step(torch.ones(3))
    assert pyro.param("w").item() == 1.5 and pyro.param("a").item() == pytest.approx(0.1)
