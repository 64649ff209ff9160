"""Global latents (issue 20): L_K, an outer ELBO over the globals β with a per-datum IWAE inside,
against the closed forms of the random-effects model (tests/hierarchical_models.py).

Measured values are printed (run with -s)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro import poutine

from pyro_iwem.infer import IWEM, IWAELoss, ParticleSampler, ReplayGuide, iwae_bound
from pyro_iwem.infer.objectives import effective_sample_size, iwae_objective, outer_bound, snis_objective

from .hierarchical_models import (
    F64, data, exact_guide, kl_normal, local_posterior, log_marginal, model, posterior_mu,
)

TAU = 0.7


def fixed_tau(x, batch_size=None):
    return model(x, TAU, batch_size)


def setup(n=100, seed=0):
    x = data(n, seed)
    mean, sd = posterior_mu(x, TAU)
    return x, mean, sd, log_marginal(x, TAU).item()


def l_k(particles, k=None):
    """L_K of the first ``k`` particles of one draw."""
    log_w = particles.log_w[:k]
    inner = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    return (particles.scale * inner).sum().item() + particles.log_global_w.sum().item()


def test_exact_posterior_gives_log_p_x_on_the_full_batch():
    """q(μ) and q(z_i | x_i, μ) exact: every draw of L_K is log p(x), for the sampler, IWAELoss,
    iwae_bound (its per-datum shares sum to L_K) and IWEM.bound (per datum)."""
    x, mean, sd, exact = setup()
    guide = exact_guide(TAU, mean, sd)
    particles = ParticleSampler(fixed_tau, guide)(10, (x,), {})
    assert particles.global_sites == ("mu",) and particles.log_p.shape == (10, 100)
    assert particles.log_global_p.shape == (1,)
    errors = [
        l_k(particles) - exact,
        -IWAELoss(10).loss(fixed_tau, guide, x) - exact,
        iwae_bound(fixed_tau, guide, x, num_particles=30, chunk_size=7).sum().item() - exact,
    ]
    print(f"\nexact log p(x) = {exact:.6f}; errors {errors}")
    assert max(abs(e) for e in errors) < 1e-10


def test_subsampled_mean_is_within_three_standard_errors_of_log_p_x():
    """B = 20 of N = 100, exact posterior as guide: L_K, N/B outside the log, is unbiased."""
    x, mean, sd, exact = setup()
    pyro.set_rng_seed(1)
    sampler = ParticleSampler(fixed_tau, exact_guide(TAU, mean, sd))
    runs = torch.tensor([l_k(sampler(10, (x,), {"batch_size": 20})) for _ in range(300)], dtype=F64)
    se = runs.std().item() / math.sqrt(len(runs))
    print(f"\nsubsampled: mean {runs.mean().item() / 100:.5f} per datum, exact {exact / 100:.5f}, se {se / 100:.5f}")
    assert abs(runs.mean().item() - exact) < 3 * se


def test_bounds_rise_with_k_towards_log_p_x_minus_kl():
    """An inexact guide (q(μ) shifted and widened, q(z_i | x_i, μ) shifted and widened): on the
    same draws, mean L_1 ≤ L_10 ≤ L_100 ≤ the limit given each β, log p(β) − log q(β) + Σ_i log
    p(x_i | β), whose mean is log p(x) − KL(q(β) ‖ p(β | x))."""
    x, mean, sd, exact = setup()
    pyro.set_rng_seed(2)
    q_mean, q_sd = mean + 0.1, sd * 1.5
    sampler = ParticleSampler(fixed_tau, exact_guide(TAU, q_mean, q_sd, local_widen=1.5, local_shift=0.1))
    rows = []
    for _ in range(40):
        p = sampler(100, (x,), {})
        mu = p.global_latents[0]
        limit = (
            p.log_global_w.item() + dist.Normal(mu, math.sqrt(TAU**2 + 0.25)).log_prob(x).sum().item()
        )
        rows.append([l_k(p, 1), l_k(p, 10), l_k(p, 100), limit])
    l1, l10, l100, limit = torch.tensor(rows, dtype=F64).mean(0).tolist()
    closed = exact - kl_normal(q_mean, q_sd, mean, sd)
    print(f"\nL_1 {l1:.3f} L_10 {l10:.3f} L_100 {l100:.3f} limit {limit:.3f} log p(x) - KL {closed:.3f}")
    assert l1 < l10 < l100 < limit
    assert abs(limit - closed) < 0.5


def test_l_1_equals_trace_elbo_on_the_same_draws():
    """With one particle, L_1 on a replayed guide trace is Pyro's Trace_ELBO on that trace."""
    x, mean, sd, _ = setup(30)
    guide = exact_guide(TAU, mean + 0.2, sd * 2, local_widen=1.3)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        trace = poutine.trace(guide).get_trace(x)
        ours = ParticleSampler(fixed_tau, guide)(1, (x,), {}, transforms=[ReplayGuide(trace)])
        pyros = -Trace_ELBO().loss(fixed_tau, poutine.replay(guide, trace=trace), x)
        print(f"\nL_1 {l_k(ours):.10f}, Trace_ELBO {pyros:.10f}")
        assert l_k(ours) == pytest.approx(pyros, abs=1e-9)


def test_per_datum_ess_stays_near_k_as_n_grows():
    """K = 100, a local guide 1.3× wider than the exact conditional: the per-datum ESS given β does
    not fall with N (the whole-batch weight's did: 49 → 19 → 3.3 at N = 10 → 100 → 1000)."""
    ess = {}
    for n in (10, 100, 1000):
        x, mean, sd, _ = setup(n)
        pyro.set_rng_seed(3)
        p = ParticleSampler(fixed_tau, exact_guide(TAU, mean, sd, local_widen=1.3))(100, (x,), {})
        ess[n] = effective_sample_size(p.log_w).mean().item()
    print(f"\nper-datum ESS of 100: {ess}")
    assert min(ess.values()) > 70 and max(ess.values()) - min(ess.values()) < 5


def test_m_step_gradient_is_autograd_of_l_k_on_the_same_draws():
    """Proposition 1 at the drawn β: with the weights detached, θ's gradient of
    log p(β) + (N/B) Σ_i Σ_k w̄_ik log p(x_i, z_ik | β; θ) is θ's gradient of L_K (q does not depend on θ)."""
    x = data(40)
    pyro.clear_param_store()
    pyro.set_rng_seed(4)
    guide = exact_guide(TAU, 0.3, 0.3, local_widen=1.4, local_shift=0.1)
    iwem = IWEM(model, guide, K=20, annealing=None)
    particles = iwem.sampler(20, (x,), {"batch_size": 10}, grad_guide=False)
    tau = pyro.param("tau").unconstrained()
    (m_step,) = torch.autograd.grad(iwem._e_loss(particles, 1.0), tau, retain_graph=True)
    (bound,) = torch.autograd.grad(-outer_bound(particles, iwae_objective(particles)), tau)
    print(f"\nM-step {m_step.item():.12f}, ∂L_K {bound.item():.12f}")
    torch.testing.assert_close(m_step, bound, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_class", ["IWAELoss", "STLLoss", "DReGLoss"])
def test_global_guide_gradient_is_unbiased_for_the_closed_form(loss_class):
    """With the exact local conditional, L_K = log p(x) − KL(q(μ) ‖ p(μ | x)) for every K: the mean
    of the loss's gradient for q(μ)'s location and log scale over many draws is ∇KL (IWAE's
    pathwise gradient, and STL's and DReG's, whose log q(μ) has its parameters stopped)."""
    import pyro_iwem.infer as infer

    x, mean, sd, _ = setup(50)
    pyro.clear_param_store()
    m0, s0 = mean + 0.3, sd * 1.5

    def guide(x, batch_size=None):
        m = pyro.param("gm", torch.tensor(m0, dtype=F64))
        log_s = pyro.param("gls", torch.tensor(math.log(s0), dtype=F64))
        mu = pyro.sample("mu", dist.Normal(m, log_s.exp()))
        with pyro.plate("data", x.shape[0]):
            loc, scale = local_posterior(mu, x, TAU)
            pyro.sample("z", dist.Normal(loc, scale))

    loss = getattr(infer, loss_class)(5)
    sampler = loss.sampler(fixed_tau, guide)
    pyro.set_rng_seed(5)
    total = torch.zeros(2, dtype=F64)
    n = 400
    for _ in range(n):
        p = sampler(5, (x,), {}, transforms=loss.transforms())
        grads = loss.gradients(p)
        total += torch.stack([grads[pyro.param("gm").unconstrained()], grads[pyro.param("gls").unconstrained()]])
    mean_grad = (total / n).tolist()
    # -L = KL + const; ∂KL/∂m = (m - m*)/s*², ∂KL/∂log s = -1 + s²/s*²
    expected = [(m0 - mean) / sd**2, -1 + s0**2 / sd**2]
    print(f"\n{loss_class}: mean gradient {mean_grad}, ∇KL {expected}")
    assert mean_grad == pytest.approx(expected, rel=0.05)


def test_p_step_fits_the_local_guide_by_eq_7_and_q_beta_by_l_k():
    """OptimalProposalLoss with a global: the local guide's parameters take eq. (7)'s gradient
    per datum at the drawn β, q(μ)'s parameters the gradient of L_K, both on the same draws."""
    from pyro_iwem.infer import OptimalProposalLoss
    from pyro_iwem.infer.objectives import optimal_proposal_objective
    from tests.hierarchical_models import trainable_guide

    x = data(30)
    pyro.clear_param_store()
    pyro.set_rng_seed(6)
    loss = OptimalProposalLoss(8)
    particles = loss.sampler(fixed_tau, trainable_guide)(8, (x,), {})
    names = {n: pyro.param(n).unconstrained() for n in ("q_m", "q_s", "q_a", "q_b", "q_c")}
    eq7 = -(particles.scale * optimal_proposal_objective(particles)).sum()
    bound = -outer_bound(particles, iwae_objective(particles))
    local = torch.autograd.grad(eq7, [names[n] for n in ("q_a", "q_b", "q_c")], retain_graph=True)
    glob = torch.autograd.grad(bound, [names[n] for n in ("q_m", "q_s")], retain_graph=True)
    grads = loss.gradients(particles)
    for name, g in zip(("q_a", "q_b", "q_c", "q_m", "q_s"), local + glob):
        torch.testing.assert_close(grads[names[name]], g, rtol=1e-12, atol=1e-12)
    print(f"\nP-step gradients: {{{', '.join(f'{n}: {grads[t].item():.4f}' for n, t in names.items())}}}")


@pytest.mark.parametrize("batch_size", [None, 10], ids=["full", "subsampled"])
@pytest.mark.parametrize("method", ["iwem", "iwae"])
def test_training_reaches_the_exact_posterior_of_mu_and_the_ml_tau(method, batch_size):
    """N = 50, K = J = 10, 400 steps (ClippedAdam, lr 0.05 decaying to 0.007), the last 100 averaged:
    q(μ)'s mean and sd reach the exact posterior's at the maximum-likelihood τ, and τ reaches it."""
    from pyro.infer import SVI

    from tests.hierarchical_models import ml_tau, trainable_guide

    x = data(50)
    tau_ml = ml_tau(x)
    mean, sd = posterior_mu(x, tau_ml)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995})
    if method == "iwem":
        step = IWEM(model, trainable_guide, K=10, J=10, optim=optim, annealing=None).step
    else:
        step = SVI(model, trainable_guide, optim, IWAELoss(10)).step
    trace = []
    for i in range(400):
        step(x, batch_size=batch_size)
        if i >= 300:
            trace.append([pyro.param(n).item() for n in ("q_m", "q_s", "tau")])
    m, s, tau = torch.tensor(trace).mean(0).tolist()
    print(f"\n{method} {batch_size}: q(μ) N({m:.4f}, {s:.4f}) vs N({mean:.4f}, {sd:.4f}); τ {tau:.4f} vs ML {tau_ml:.4f}")
    assert abs(m - mean) < 0.04 and abs(s / sd - 1) < 0.15 and abs(tau - tau_ml) < 0.03


class _Regression(pyro.nn.PyroModule):
    """A PyroModule Bayesian linear regression: nn.Linear with PyroSample weights, a global noise scale."""

    def __init__(self, d=3):
        super().__init__()
        self.linear = pyro.nn.PyroModule[torch.nn.Linear](d, 1).double()
        self.linear.weight = pyro.nn.PyroSample(dist.Normal(torch.zeros(1, d, dtype=F64), 1.0).to_event(2))
        self.linear.bias = pyro.nn.PyroSample(dist.Normal(torch.zeros(1, dtype=F64), 10.0).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.LogNormal(torch.zeros((), dtype=F64), 1.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def _regression_data(n=50):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    return x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3 + 0.5 * torch.randn(n, generator=g, dtype=F64)


@pytest.mark.parametrize("autoguide", ["AutoNormal", "AutoDiagonalNormal"])
def test_pyro_module_regression_runs_vectorised_and_its_bound_is_the_elbo(autoguide):
    """Every latent is global (the weights of a PyroModule): the particle plate does not reach them, so
    the vectorised draw runs; L_K at K = 10 is the ELBO: on a replayed guide trace it equals Pyro's
    Trace_ELBO, and the only warning says every latent is global."""
    import warnings

    from pyro.infer import autoguide as autoguides

    pyro.clear_param_store()
    pyro.set_rng_seed(8)
    x, y = _regression_data()
    model = _Regression()
    guide = getattr(autoguides, autoguide)(model)
    guide(x, y)  # initialise
    trace = poutine.trace(guide).get_trace(x, y)
    loss = IWAELoss(10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        particles = loss.sampler(model, guide)(10, (x, y), {}, transforms=[ReplayGuide(trace)])
        ours = outer_bound(particles, iwae_objective(particles)).item()
    pyros = -Trace_ELBO().loss(model, poutine.replay(guide, trace=trace), x, y)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    print(f"\n{autoguide}: L_10 {ours:.10f}, Trace_ELBO {pyros:.10f}; warnings {len(messages)}")
    assert ours == pytest.approx(pyros, abs=1e-8)
    assert particles.log_p.shape == (10, 50)
    assert len(messages) == 1 and "every latent of the model is global" in messages[0]


def test_a_joint_autoguide_over_per_datum_latents_keeps_a_specific_warning():
    """AutoDiagonalNormal on the random-effects model: one vector for μ and every z_i, which cannot be
    drawn once nor split per datum; the warning names its site and says it is a joint autoguide."""
    from pyro.infer.autoguide import AutoDiagonalNormal

    pyro.clear_param_store()
    x = data(20)
    guide = AutoDiagonalNormal(fixed_tau)
    with pytest.warns(UserWarning, match="_AutoDiagonalNormal_latent'.*joint autoguide") as caught:
        particles = IWAELoss(5).sampler(fixed_tau, guide)(5, (x,), {})
    assert particles.log_p.shape == (5, 1) and not particles.global_sites
    assert not any("'mu'" in str(w.message) for w in caught)


def test_a_discrete_global_gets_an_unbiased_score_function_gradient():
    """A Bernoulli switch b (global, no rsample) sets the random effects' mean, 2b − 1; q(b) =
    Bernoulli(logits ℓ) and the exact local conditional, so L_K = E_q[log p(b) − log q(b) + Σ_i log
    p(x_i | b)] sums exactly over b ∈ {0, 1}: the mean of the REINFORCE gradient (with the loss's
    running baseline) over many draws is the exact gradient, within 4 standard errors."""
    x = data(20, mu=0.6)
    pyro.clear_param_store()
    v = TAU**2 + 0.25

    def switch_model(x):
        b = pyro.sample("b", dist.Bernoulli(torch.tensor(0.3, dtype=F64)))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(2 * b - 1, TAU))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def switch_guide(x):
        logit = pyro.param("logit", torch.tensor(-0.5, dtype=F64))
        b = pyro.sample("b", dist.Bernoulli(logits=logit))
        with pyro.plate("data", x.shape[0]):
            loc, scale = local_posterior(2 * b - 1, x, TAU)
            pyro.sample("z", dist.Normal(loc, scale))

    loss = IWAELoss(3)
    sampler = loss.sampler(switch_model, switch_guide)
    pyro.set_rng_seed(9)
    draws = []
    for _ in range(1000):
        particles = sampler(3, (x,), {})
        draws.append(loss.gradients(particles)[pyro.param("logit").unconstrained()].item())
    logit = pyro.param("logit").unconstrained()
    draws = torch.tensor(draws, dtype=F64)
    exact_logit = logit.detach().clone().requires_grad_()
    total = 0.0
    for b in (0.0, 1.0):
        q = dist.Bernoulli(logits=exact_logit)
        b_ = torch.tensor(b, dtype=F64)
        f = dist.Bernoulli(torch.tensor(0.3, dtype=F64)).log_prob(b_) - q.log_prob(b_)
        f = f + dist.Normal(2 * b - 1, math.sqrt(v)).log_prob(x).sum()
        total = total + q.log_prob(b_).exp() * f
    (exact,) = torch.autograd.grad(-total, exact_logit)
    se = draws.std().item() / math.sqrt(len(draws))
    print(f"\nREINFORCE mean {draws.mean().item():.4f} ± {se:.4f}, exact {exact.item():.4f}")
    assert abs(draws.mean().item() - exact.item()) < 4 * se and se < 0.1 * abs(exact.item())


def test_the_nested_bound_is_above_l_k_on_the_same_draws_and_approaches_log_p_x():
    """global_particles = M: log mean_m exp(L_K(β_m)) ≥ mean_m L_K(β_m) on every set of draws (Jensen),
    and its mean over repeats rises towards log p(x) as M grows (q(μ) 1.5× too wide and shifted;
    800 draws of β for each M)."""
    from pyro_iwem.infer import nested_bound

    x, mean, sd, exact = setup()
    guide = exact_guide(TAU, mean + 0.1, sd * 1.5, local_widen=1.3)
    pyro.set_rng_seed(10)
    means = {}
    for m in (1, 10, 100):
        repeats = 800 // m  # the same number of draws of β for every M
        runs = [nested_bound(fixed_tau, guide, x, global_particles=m, num_particles=50, chunk_size=50)
                for _ in range(repeats)]  # fmt: skip
        assert all(r.bound >= r.terms.mean() - 1e-12 for r in runs)
        means[m] = sum(r.bound.item() for r in runs) / len(runs)
    print(f"\nnested bound by M: {means}; log p(x) {exact:.4f}; global ESS at M = 100: {runs[-1].global_ess:.1f}")
    assert means[1] < means[10] < means[100] and exact - means[100] < 0.3
    with pytest.raises(ValueError, match="couples the whole data set.*subsampled"):
        iwae_bound(fixed_tau, guide, x, num_particles=5, global_particles=3, batch_size=20)


@pytest.mark.parametrize("name", ["global_latent_outside_data_plate", "global_latent_dirichlet_obs"])
def test_catalogue_globals_match_trace_elbo_at_k_1(name):
    """The catalogue's patterns with a latent outside the data plate: per-datum weights (no coupling
    warning), and at K = 1 the value on a replayed guide trace is Pyro's Trace_ELBO on it."""
    import warnings

    from .model_catalogue import CATALOGUE

    pattern = next(p for p in CATALOGUE if p.name == name)
    pyro.clear_param_store()
    pyro.set_rng_seed(11)
    model, guide = pattern.build()
    trace = poutine.trace(guide).get_trace(*pattern.args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        particles = IWAELoss(1).sampler(model, guide)(1, pattern.args, {}, transforms=[ReplayGuide(trace)])
    assert not [w for w in caught if "couples the data" in str(w.message)]
    assert particles.log_p.shape == (1, pattern.args[0].shape[0])
    ours = outer_bound(particles, iwae_objective(particles)).item()
    pyros = -Trace_ELBO().loss(model, poutine.replay(guide, trace=trace), *pattern.args)
    print(f"\n{name}: L_1 {ours:.10f}, Trace_ELBO {pyros:.10f}")
    assert ours == pytest.approx(pyros, abs=1e-5)


@pytest.mark.parametrize("loss_class", ["STLLoss", "DReGLoss"])
def test_stl_and_dreg_local_gradients_vanish_at_the_exact_posterior(loss_class):
    """STL and DReG on the inner part: given β their local estimator is the usual one, so with the
    exact conditional q(z_i | x_i, μ) every per-datum log weight with the local proposal's
    parameters stopped is log p(x_i | μ), constant in z: the local parameter's gradient is 0 at
    every draw (q(μ)'s take L_K's pathwise gradient, as IWAELoss's: the test above)."""
    import pyro_iwem.infer as infer

    x, mean, sd, _ = setup(30)
    pyro.clear_param_store()

    def guide(x, batch_size=None):
        m = pyro.param("gm", torch.tensor(mean, dtype=F64))
        s = pyro.param("gs", torch.tensor(sd, dtype=F64))
        w = pyro.param("gw", torch.tensor(1.0, dtype=F64))  # the local scale's factor, exact at 1
        mu = pyro.sample("mu", dist.Normal(m, s))
        with pyro.plate("data", x.shape[0]):
            loc, scale = local_posterior(mu, x, TAU)
            pyro.sample("z", dist.Normal(loc, w * scale))

    loss = getattr(infer, loss_class)(4)
    sampler = loss.sampler(fixed_tau, guide)
    pyro.set_rng_seed(12)
    largest = 0.0
    for _ in range(5):
        grads = loss.gradients(sampler(4, (x,), {}, transforms=loss.transforms()))
        assert pyro.param("gm").unconstrained() in grads  # q(μ)'s, from L_K
        largest = max(largest, grads[pyro.param("gw").unconstrained()].abs().item())
    print(f"\n{loss_class}: the local parameter's largest gradient at the exact posterior {largest:.2e}")
    assert largest < 1e-9


def test_one_pass_iwem_takes_the_two_pass_step_with_globals():
    """IWEM(one_pass=True) on the random-effects model: one warning naming 'mu', then Algorithm 2's
    step, which is IWEM's on the same seed."""
    from tests.hierarchical_models import trainable_guide

    x = data(20)
    results = []
    for one_pass in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(13)
        iwem = IWEM(model, trainable_guide, K=5, J=5, annealing=None, one_pass=one_pass,
                    optim=pyro.optim.Adam({"lr": 0.01}))  # fmt: skip
        if one_pass:
            with pytest.warns(UserWarning, match="one_pass=True.*two-pass.*'mu'"):
                iwem.step(x)
        else:
            iwem.step(x)
        iwem.step(x)
        results.append([pyro.param(n).item() for n in ("q_m", "q_s", "tau")])
    assert results[0] == results[1]


def test_iwae_loss_with_global_particles_is_the_nested_bound():
    """IWAELoss(global_particles=M): at the exact posterior every draw's L_K is log p(x), so the nested
    loss is −log p(x) and the M draws' ESS is M; its gradient steps the guide; a minibatch is refused."""
    from tests.hierarchical_models import trainable_guide

    x, mean, sd, exact = setup(30)
    loss = IWAELoss(3, global_particles=4)
    assert loss.loss(fixed_tau, exact_guide(TAU, mean, sd), x) == pytest.approx(-exact, abs=1e-10)
    assert loss.global_ess == pytest.approx(4.0, abs=1e-9)
    pyro.clear_param_store()
    pyro.set_rng_seed(14)
    value = loss.loss_and_grads(fixed_tau, trainable_guide, x)
    assert math.isfinite(value) and pyro.param("q_m").unconstrained().grad is not None
    assert 1.0 <= loss.global_ess <= 4.0
    with pytest.raises(ValueError, match="couples the whole data set"):
        loss.loss_and_grads(fixed_tau, trainable_guide, x, batch_size=10)


def test_enumerated_markov_chains_beside_autonormal_globals_are_per_datum():
    """A capture-recapture model (Pyro's CJS pattern): survival φ and detection ρ are global Beta latents
    (AutoNormal: a Delta site and its own auxiliary 'φ_unconstrained', both global), each animal's
    alive state z_t enumerated along a pyro.markov chain inside the animals plate. Nothing couples the
    animals: no warning, one column per animal, and L_1 on a replayed guide trace is TraceEnum_ELBO's."""
    import warnings

    from pyro.infer import TraceEnum_ELBO
    from pyro.infer.autoguide import AutoNormal

    steps, animals = 5, 8
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(steps, animals, generator=g, dtype=F64) < 0.5).to(F64)

    def cjs(y):
        phi = pyro.sample("phi", dist.Beta(torch.tensor(2.0, dtype=F64), 2.0))
        rho = pyro.sample("rho", dist.Beta(torch.tensor(2.0, dtype=F64), 2.0))
        z = torch.ones((), dtype=F64)
        with pyro.plate("animals", y.shape[1], dim=-1):
            for t in pyro.markov(range(1, steps)):
                z = pyro.sample(f"z_{t}", dist.Bernoulli(phi * z), infer={"enumerate": "parallel"})
                pyro.sample(f"y_{t}", dist.Bernoulli(rho * z), obs=y[t])

    pyro.clear_param_store()
    pyro.set_rng_seed(15)
    guide = AutoNormal(poutine.block(cjs, expose=["phi", "rho"]))
    guide(y)
    trace = poutine.trace(guide).get_trace(y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        particles = IWAELoss(1).sampler(cjs, guide)(1, (y,), {}, transforms=[ReplayGuide(trace)])
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert particles.log_p.shape == (1, animals) and "phi" in particles.global_sites
    ours = outer_bound(particles, iwae_objective(particles)).item()
    pyros = -TraceEnum_ELBO(max_plate_nesting=1).loss(cjs, poutine.replay(guide, trace=trace), y)
    print(f"\nCJS: L_1 {ours:.10f}, TraceEnum_ELBO {pyros:.10f}")
    assert ours == pytest.approx(pyros, abs=1e-9)


def test_particles_one_at_a_time_share_one_draw_of_the_globals():
    """vectorize_particles=False: the first run's globals are replayed in the others (one β per call),
    so the exact posterior as guide still gives L_K = log p(x) on the full batch."""
    x, mean, sd, exact = setup(20)
    pyro.set_rng_seed(16)
    particles = ParticleSampler(fixed_tau, exact_guide(TAU, mean, sd), vectorize_particles=False)(4, (x,), {})
    assert particles.log_p.shape == (4, 20) and particles.global_sites == ("mu",)
    assert abs(l_k(particles) - exact) < 1e-10


def test_autonormal_on_a_model_with_a_constrained_global_and_locals_is_per_datum():
    """AutoNormal over a LogNormal global scale and per-datum latents: its 's_unconstrained' is global,
    nothing couples, and IWEM steps with a per-datum ESS."""
    import warnings

    from pyro.infer.autoguide import AutoNormal

    def scale_model(x):
        s = pyro.sample("s", dist.LogNormal(torch.zeros((), dtype=F64), 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=F64), s))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    pyro.clear_param_store()
    pyro.set_rng_seed(17)
    x = data(15)
    iwem = IWEM(scale_model, AutoNormal(scale_model), K=8, J=8, annealing=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        iwem.step(x)
    assert not [str(w.message) for w in caught if "couples" in str(w.message)]
    assert iwem.sampler.global_latents.names == ("s",) and 1.0 <= iwem.ess <= 8.0 and math.isfinite(iwem.bound)


def test_imputer_chunks_share_one_draw_of_the_globals():
    """Imputer.mean in chunks on a model with a global: every chunk is drawn given the first chunk's β
    (its guide draws μ once per call), so chunked and one-pass means agree at the same β."""
    from pyro_iwem.infer import Imputer

    x = data(12)
    mask = torch.ones(12, dtype=torch.bool)
    mask[::3] = False

    def masked_model(x, mask):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=F64), 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, TAU))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x, obs_mask=mask)

    def masked_guide(x, mask):
        pyro.sample("mu", dist.Normal(torch.tensor(0.4, dtype=F64), 0.2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x * mask, 0.7))

    imputer = Imputer(masked_model, masked_guide)
    pyro.set_rng_seed(18)
    _, _, _, _, _, (_, replay) = imputer._draw(4, (x, mask), {})
    assert replay and "mu" in replay[0].trace.nodes
    mu = replay[0].trace.nodes["mu"]["value"]
    for _ in range(3):  # later chunks replay it
        log_w, *_, (_, again) = imputer._draw(4, (x, mask), {}, (None, replay))
        assert again is replay
    filled = imputer.mean(x, mask, num_particles=40, chunk_size=7)
    assert torch.isfinite(filled).all() and torch.equal(filled[mask], x[mask]) and mu.shape == ()
