"""IWEM(global_particles=M), the nested E-step (issue 20): against the random-effects model of
tests/hierarchical_models.py, its log densities written out by hand from the traces' values.

With M draws β_m, log Ŵ_m = log p(β_m) − log q(β_m) + Σ_i log p̂_K(x_i | β_m) and the nested bound
log (1/M) Σ_m Ŵ_m. Measured values are printed (run with -s)."""

import copy
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints, transform_to

from pyro_iwem.infer import IWEM, Annealing, IWAELoss, nested_bound
from pyro_iwem.infer.util import ModelError

from .hierarchical_models import (
    F64, SIGMA, data, exact_guide, log_marginal, ml_tau, model, posterior_mu, trainable_guide,
)

TAU = 0.7
GUIDE_PARAMS = ("q_m", "q_s", "q_a", "q_b", "q_c")
POSITIVE = ("q_s", "q_c", "tau")


def fixed_tau(x, batch_size=None):
    return model(x, TAU, batch_size)


def fresh_iwem(seed, model=model, guide=trainable_guide, **kwargs):
    """An IWEM on an empty param store, with the RNG seeded."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return IWEM(model, guide, **kwargs)


class Recorder:
    """The IWEM's sampler, keeping every draw it returns (the E-step's M, then the P-step's M)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.recorded = []

    def draws(self, *args, **kwargs):
        found = self.sampler.draws(*args, **kwargs)
        self.recorded.extend(found)
        return found

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def recording(iwem):
    iwem.sampler = Recorder(iwem.sampler)
    return iwem.sampler


def log_normal(value, loc, scale):
    return -0.5 * ((value - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)


def unconstrained():
    return {n: pyro.param(n).unconstrained() for n in GUIDE_PARAMS + ("tau",)}


def constrained(u):
    """The parameters from their unconstrained tensors, with the graph (exp for the positive ones)."""
    return {n: transform_to(constraints.positive)(t) if n in POSITIVE else t for n, t in u.items()}


def by_hand(draws, x, params, live_guide):
    r"""``(L, P, Q)``, ``(M,)`` each, from the draws' values alone: L_m = log p(μ_m) − log q(μ_m) +
    Σ_i log (1/K) Σ_k w_ik, P_m the same with eq. (7)'s |log p_ik| w_ik inside, and Q_m with the
    snIS objective Σ_k w̄_ik log p_ik (eq. 2) inside. With
    ``live_guide`` the draws are rebuilt as reparameterised functions of the guide's parameters
    (μ = m + s ε, z = a μ + b x + c ε'), otherwise held at their values."""
    p = params
    out_l, out_p, out_q = [], [], []
    for d in draws:
        mu = d.own(d.guide_trace.nodes["mu"]["value"]).detach().reshape(())
        z = d.own(d.guide_trace.nodes["z"]["value"]).detach()
        if live_guide:
            eps = ((mu - p["q_m"]) / p["q_s"]).detach()
            eps_z = ((z - p["q_a"] * mu - p["q_b"] * x) / p["q_c"]).detach()
            mu = p["q_m"] + p["q_s"] * eps
            z = p["q_a"] * mu + p["q_b"] * x + p["q_c"] * eps_z
        one = torch.ones((), dtype=F64)
        outer = log_normal(mu, 0 * one, one) - log_normal(mu, p["q_m"], p["q_s"])
        log_p = log_normal(z, mu, p["tau"]) + log_normal(x, z, SIGMA * one)
        log_w = log_p - log_normal(z, p["q_a"] * mu + p["q_b"] * x, p["q_c"])
        k = log_w.shape[0]
        out_l.append(outer + (torch.logsumexp(log_w, 0) - math.log(k)).sum())
        out_p.append(outer + (torch.logsumexp(log_p.abs().log() + log_w, 0) - math.log(k)).sum())
        out_q.append(outer + (torch.softmax(log_w.detach(), 0) * log_p).sum())
    return torch.stack(out_l), torch.stack(out_p), torch.stack(out_q)


def nested(values):
    return torch.logsumexp(values, 0) - math.log(values.shape[0])


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


def test_one_sgd_step_moves_every_parameter_along_the_nested_bound_by_hand():
    """M = 4, K = J = 6, α = 1, SGD (lr 1e-3), one step on N = 30, the draws recorded: θ (τ) moves
    along the nested bound's gradient on the E-step's draws (guide held fixed); q(μ)'s m and log s
    along its pathwise gradient on the P-step's draws; the local guide's a, b, log c along
    Σ_m W̄_m P_m (eq. 7 at each β_m, W̄ = softmax of the P-step draws' L_J): each to 1e-6 relative."""
    x = data(30)
    lr = 1e-3
    iwem = IWEM(model, trainable_guide, K=6, J=6, annealing=None, global_particles=4, optim=pyro.optim.SGD({"lr": lr}))
    recorder = recording(iwem)
    iwem.evaluate_loss(x)  # creates the parameters (one E-step under no_grad)
    recorder.recorded.clear()
    before = {n: t.detach().clone() for n, t in unconstrained().items()}
    pyro.set_rng_seed(1)
    iwem.step(x)
    e_draws, p_draws = recorder.recorded[:4], recorder.recorded[4:]
    assert len(recorder.recorded) == 8 and e_draws[0].global_sites == ("mu",)
    moved = {n: (t.detach() - before[n]) / lr for n, t in unconstrained().items()}

    start = {n: t.clone().requires_grad_() for n, t in before.items()}  # θ_t, guide held at φ_t
    (tau_grad,) = torch.autograd.grad(nested(by_hand(e_draws, x, constrained(start), live_guide=False)[0]),
                                      start["tau"])  # fmt: skip
    after = {n: t.clone().requires_grad_() for n, t in before.items()}  # φ_t: the M-step moved θ only
    after["tau"] = unconstrained()["tau"].detach()  # the P-step runs at θ_{t+1}
    terms, p_terms, _ = by_hand(p_draws, x, constrained(after), live_guide=True)
    global_grad = torch.autograd.grad(nested(terms), [after["q_m"], after["q_s"]], retain_graph=True)
    weights = torch.softmax(terms.detach(), 0)
    local_grad = torch.autograd.grad((weights * p_terms).sum(), [after[n] for n in ("q_a", "q_b", "q_c")])

    errors = {
        "θ (τ)": relative_error(moved["tau"], tau_grad),
        "q(μ) (m, log s)": relative_error(torch.stack([moved["q_m"], moved["q_s"]]), torch.stack(global_grad)),
        "local (a, b, log c)": relative_error(torch.stack([moved[n] for n in ("q_a", "q_b", "q_c")]),
                                              torch.stack(local_grad)),  # fmt: skip
    }
    print(f"\nrelative errors of the step against the gradients by hand: {errors}; "
          f"∂τ {tau_grad.item():.6f}, ∂(m, log s) {[g.item() for g in global_grad]}, W̄_P {weights.tolist()}")
    assert max(errors.values()) < 1e-6
    assert tau_grad.abs() > 1e-3 and min(g.abs().item() for g in global_grad + local_grad) > 1e-6


def test_m_step_loss_gradient_at_alpha_one_is_the_nested_bounds():
    """The M-step loss of M = 5 draws has minus the nested bound's gradient in τ, by hand, to 1e-6
    relative, and the value −Σ_m W̄_m [log p(β_m) − log q(β_m) + Σ_i Σ_k w̄_ik log p(x_i, z_ik | β_m)]."""
    x = data(40)
    iwem = IWEM(model, trainable_guide, K=8, annealing=None, global_particles=5)
    draws, log_weights, loss = iwem._nested_e_step(1.0, (x,), {})
    weights = torch.softmax(log_weights, 0)
    u = unconstrained()
    (ours,) = torch.autograd.grad(loss, u["tau"])
    terms, _, q_hat = by_hand(draws, x, constrained({n: t.detach() if n != "tau" else t for n, t in u.items()}), False)
    (expected,) = torch.autograd.grad(-nested(terms), u["tau"])
    print(f"\nM-step ∂τ {ours.item():.10f}, −∂τ nested bound by hand {expected.item():.10f}")
    assert relative_error(ours, expected) < 1e-6
    torch.testing.assert_close(weights, torch.softmax(terms.detach(), 0), rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(-(weights * q_hat.detach()).sum().item(), rel=1e-10)


def test_bound_is_nested_bound_on_the_same_seed_and_the_draws_by_hand():
    """On one seed, IWEM's first step (M = 5, K = 7) and nested_bound (M = 5, K = 7 in one chunk) draw
    the same β_m and particles: IWEM.bound is nested_bound(...).bound / N, its global ESS the same,
    and both are the nested bound by hand from the recorded E-step draws."""
    x = data(25)
    pyro.set_rng_seed(3)
    iwem = IWEM(model, trainable_guide, K=7, J=7, annealing=None, global_particles=5)
    recorder = recording(iwem)
    iwem.step(x)
    by_hand_bound = nested(by_hand(recorder.recorded[:5], x, constrained({n: t.detach() for n, t in
                                                                        _initial_params(x).items()}), False)[0])  # fmt: skip
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    reference = nested_bound(model, trainable_guide, x, global_particles=5, num_particles=7, chunk_size=7)
    print(f"\nIWEM.bound {iwem.bound:.12f}, nested_bound / N {reference.bound.item() / 25:.12f}, by hand / N "
          f"{by_hand_bound.item() / 25:.12f}; global ESS {iwem.global_ess:.6f} vs {reference.global_ess:.6f}")
    assert iwem.bound == pytest.approx(reference.bound.item() / 25, rel=1e-12)
    assert iwem.bound == pytest.approx(by_hand_bound.item() / 25, rel=1e-10)
    assert iwem.global_ess == pytest.approx(reference.global_ess, rel=1e-10) and 1 <= iwem.global_ess <= 5
    assert 1 <= iwem.ess <= 7


def _initial_params(x):
    """The parameters' unconstrained values before any step (the step above moved them)."""
    with pyro.get_param_store().scope():
        pyro.clear_param_store()
        with torch.no_grad():
            trainable_guide(x)
            model(x)
        return {n: t.detach().clone() for n, t in unconstrained().items()}


def test_bound_is_above_the_m_1_bound_of_the_same_first_draw_in_expectation():
    """q(μ) = N(0, 1) at its initial value, far from the posterior N(0.56, 0.13²): on 12 seeds the
    first step's bound with M = 6 against M = 1's, whose one draw is the M = 6 step's first: the
    nested bound is higher on average (Jensen gives it only in expectation)."""
    x = data(40)
    differences = []
    for seed in range(12):
        bounds, first = [], []
        for m in (1, 6):
            iwem = fresh_iwem(seed, K=5, J=5, annealing=None, global_particles=m)
            recorder = recording(iwem)
            iwem.step(x)
            bounds.append(iwem.bound)
            first.append(recorder.recorded[0].own(recorder.recorded[0].global_latents[0]).item())
        assert first[0] == first[1]  # the same first β
        differences.append(bounds[1] - bounds[0])
    mean = sum(differences) / len(differences)
    print(f"\nnested (M = 6) − L_K (M = 1) per datum, same first draw: mean {mean:.4f}, "
          f"min {min(differences):.4f}, max {max(differences):.4f}")
    assert mean > 0


def test_exact_posterior_bound_is_log_p_x_per_datum():
    """q(μ) and q(z_i | x_i, μ) exact (no parameters: the steps move nothing): every Ŵ_m is p(x), so
    IWEM.bound is log p(x)/N to 1e-8, the global ESS is M and the per-datum ESS is K."""
    x = data(60)
    mean, sd = posterior_mu(x, TAU)
    exact = log_marginal(x, TAU).item() / 60
    iwem = IWEM(fixed_tau, exact_guide(TAU, mean, sd), K=5, J=5, annealing=None, global_particles=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no θ, no φ
        for _ in range(3):
            iwem.step(x)
            print(f"\nbound {iwem.bound:.12f}, log p(x)/N {exact:.12f}; ESS {iwem.ess}, global ESS {iwem.global_ess}")
            assert abs(iwem.bound - exact) < 1e-8
            assert iwem.global_ess == pytest.approx(4.0, abs=1e-8) and iwem.ess == pytest.approx(5.0, abs=1e-8)


def test_evaluate_loss_is_the_steps_loss_on_the_same_seed():
    """evaluate_loss draws what step draws: on one seed both give the M-step loss of the same M draws."""
    x = data(20)
    values = []
    for evaluate in (True, False):  # α = 0.5: the annealed E-step, with its L ELBO draws
        iwem = fresh_iwem(4, K=4, J=4, annealing=Annealing(start=0.5), global_particles=3)
        values.append(iwem.evaluate_loss(x) if evaluate else iwem.step(x))
    print(f"\nevaluate_loss {values[0]:.12f}, step {values[1]:.12f}")
    assert values[0] == pytest.approx(values[1], rel=1e-12)


def test_subsampled_data_plate_is_refused_before_any_parameter_moves():
    """M = 3 on a minibatch of 10 of 40: refused with refuse_subsampled_nested's error on the E-step's
    first draw; no parameter nor optimiser state moves, the step is not counted; M = 1 takes it."""
    x = data(40)
    iwem = IWEM(model, trainable_guide, K=4, J=4, annealing=None, global_particles=3,
                optim=pyro.optim.Adam({"lr": 0.1}))  # fmt: skip
    iwem.step(x)  # the parameters and their optimiser state exist
    before = {n: t.detach().clone() for n, t in unconstrained().items()}
    state = copy.deepcopy(iwem.optim.get_state())
    with pytest.raises(ValueError, match="global_particles=3 .*couples the whole data set.*subsampled, scale 4"):
        iwem.step(x, batch_size=10)
    assert all(torch.equal(before[n], t) for n, t in unconstrained().items()) and iwem.num_steps == 1
    assert str(iwem.optim.get_state()) == str(state)
    iwem_1 = IWEM(model, trainable_guide, K=4, J=4, annealing=None)  # M = 1 takes minibatches
    iwem_1.step(x, batch_size=10)


def test_a_global_without_rsample_is_refused_naming_it_and_nothing_moves():
    """A Bernoulli switch b (global, no rsample) with a trained q(b): M = 3 is refused, naming 'b';
    θ, moved by the M-step before the P-step's draws show the score, is put back."""
    x = data(20, mu=0.6)

    def switch_model(x):
        tau = pyro.param("tau", torch.tensor(1.0, dtype=F64), constraint=constraints.positive)
        b = pyro.sample("b", dist.Bernoulli(torch.tensor(0.3, dtype=F64)))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(2 * b - 1, tau))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x)

    def switch_guide(x):
        logit = pyro.param("logit", torch.tensor(-0.5, dtype=F64))
        b = pyro.sample("b", dist.Bernoulli(logits=logit))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(2 * b - 1 + 0.5 * x, 0.5))

    iwem = IWEM(switch_model, switch_guide, K=3, J=3, annealing=None, global_particles=3,
                optim=pyro.optim.Adam({"lr": 0.1}))  # fmt: skip
    iwem.evaluate_loss(x)  # the value alone is fine: no gradient needs the score
    names = ("tau", "logit")
    before = [pyro.param(n).unconstrained().detach().clone() for n in names]
    with pytest.raises(ModelError, match=r"IWEM\(global_particles=3\) needs reparameterised globals: 'b' has no rsample"):
        iwem.step(x)
    assert all(torch.equal(b, pyro.param(n).unconstrained()) for b, n in zip(before, names))
    with pytest.raises(ModelError, match=r"IWAELoss\(global_particles=3\).*'b' has no rsample"):
        IWAELoss(3, global_particles=3).loss_and_grads(switch_model, switch_guide, x)


@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_bad_global_particles_are_refused(value):
    """One check (objectives.check_num_global_particles) for IWEM, IWAELoss and nested_bound."""
    message = r"global_particles must be a positive integer \(draws of the globals\)"
    for build in (
        lambda: IWEM(model, trainable_guide, global_particles=value),
        lambda: IWAELoss(3, global_particles=value),
        lambda: nested_bound(model, trainable_guide, data(5), global_particles=value),
    ):
        with pytest.raises(ValueError, match=message):
            build()


def test_without_globals_m_draws_are_the_m_1_step_bit_for_bit():
    """No global latent: one draw suffices (every draw would give the same bound), so M = 4 is M = 1."""
    x = data(20)

    def local_model(x):
        w = pyro.param("w", torch.tensor(0.5, dtype=F64))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(w, 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x)

    def local_guide(x):
        a = pyro.param("a", torch.tensor(0.1, dtype=F64))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(a * x, 0.7))

    runs = []
    for m in (1, 4):
        iwem = fresh_iwem(5, local_model, local_guide, K=4, J=4, annealing=None, global_particles=m,
                          optim=pyro.optim.Adam({"lr": 0.05}))  # fmt: skip
        runs.append([iwem.step(x) for _ in range(3)] + [iwem.bound, iwem.ess, pyro.param("w").item(),
                                                        pyro.param("a").item()])  # fmt: skip
        assert math.isnan(iwem.global_ess)
    assert runs[0] == runs[1]


def test_one_pass_with_globals_takes_the_nested_two_pass_step():
    """IWEM(one_pass=True, global_particles=3) on a model with globals warns and takes the two-pass
    nested step: the same parameters, bound and global ESS as IWEM(global_particles=3) on one seed."""
    x = data(20)
    results = []
    for one_pass in (True, False):
        iwem = fresh_iwem(6, K=4, J=4, annealing=None, one_pass=one_pass, global_particles=3,
                          optim=pyro.optim.Adam({"lr": 0.01}))  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            iwem.step(x)
            iwem.step(x)
        assert any("two-pass" in str(w.message) for w in caught) == one_pass
        results.append([pyro.param(n).item() for n in ("q_m", "q_s", "tau")] + [iwem.bound, iwem.global_ess])
    assert results[0] == results[1]


def test_state_dict_round_trip_continues_the_same_run():
    """M = 3: a run restored from the param store, state_dict and the seed takes the same next step."""
    x = data(20)
    kwargs = dict(K=4, J=4, annealing=None, global_particles=3, optim=pyro.optim.Adam({"lr": 0.05}))
    first = IWEM(model, trainable_guide, **kwargs)
    for _ in range(3):
        first.step(x)
    params, state = copy.deepcopy(pyro.get_param_store().get_state()), copy.deepcopy(first.state_dict())
    pyro.set_rng_seed(7)
    first.step(x)
    expected = [pyro.param(n).item() for n in GUIDE_PARAMS + ("tau",)]
    pyro.get_param_store().set_state(params)
    second = IWEM(model, trainable_guide, **{**kwargs, "optim": pyro.optim.Adam({"lr": 0.05})})
    second.load_state_dict(state)
    second.sampler.global_names((x,), {})  # the first call's probe, which the first run made already
    pyro.set_rng_seed(7)
    second.step(x)
    assert second.num_steps == 4 and [pyro.param(n).item() for n in GUIDE_PARAMS + ("tau",)] == expected


def test_training_moves_q_mu_to_the_exact_posterior_mean():
    """N = 50, M = 5, K = J = 10, 300 full-batch steps (ClippedAdam, lr 0.05 decaying to 0.011), the
    last 100 averaged: q(μ)'s mean, from 0, reaches the exact posterior mean at the ML τ (0.561) within
    0.2, its sd falls from 1 below 0.5, and τ reaches the ML τ. (q(μ) stays wider than the posterior,
    sd 0.13: the nested bound's gradient for q(β) is noisier as M grows, and the bound is flat in
    q(β) near the posterior; an untrained global guide would keep N(0, 1).)"""
    x = data(50)
    tau_ml = ml_tau(x)
    mean, sd = posterior_mu(x, tau_ml)
    pyro.set_rng_seed(0)
    iwem = IWEM(model, trainable_guide, K=10, J=10, annealing=None, global_particles=5,
                optim=pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995}))  # fmt: skip
    trace = []
    for i in range(300):
        iwem.step(x)
        if i >= 200:
            trace.append([pyro.param(n).item() for n in ("q_m", "q_s", "tau")] + [iwem.global_ess])
    m, s, tau, global_ess = torch.tensor(trace).mean(0).tolist()
    print(f"\nq(μ) N({m:.4f}, {s:.4f}) vs exact N({mean:.4f}, {sd:.4f}); τ {tau:.4f} vs ML {tau_ml:.4f}; "
          f"last bound {iwem.bound:.5f}, log p(x; τ)/N {log_marginal(x, pyro.param('tau').item()).item() / 50:.5f} "
          f"(one draw: below it only in expectation); global ESS {global_ess:.2f} of 5")
    assert abs(m - mean) < 0.2 and s < 0.5 and abs(tau - tau_ml) < 0.05


# ------------------------------------------------------------------ the outer plate of M draws
def replayed_alone(sampler, draws, x, num_particles):
    """Each of ``draws`` (one outer plate) drawn again by a call of ``sampler`` on its own β and
    locals (:class:`ReplayGuide`): what one call per draw gives on the same values."""
    from pyro import poutine
    from pyro.poutine.util import site_is_subsample

    from pyro_iwem.infer.transforms import ReplayGuide

    alone = []
    for d in draws:
        trace = poutine.Trace()
        for name, site in d.guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
                value = d.own(site["value"])
                value = value.reshape(()) if name in d.global_sites else value
                trace.add_node(name, type="sample", is_observed=False, value=value, infer={})
        alone.append(sampler(num_particles, (x,), {}, grad_guide=False, transforms=[ReplayGuide(trace)]))
    return alone


def test_outer_plate_draws_every_beta_in_one_pass_and_each_draw_is_its_own_call():
    """sampler.draws(M = 5, K = 3): guide and model run once for the five draws (an outer plate left
    of the particle plate: μ is (5, 1, 1), z (5, 3, N)), the five μ differ, and each draw's log
    weights and log p(β) − log q(β) equal, to 1e-12, one call of the sampler replaying that draw's
    own μ and z (the one-call-per-draw implementation), and the draws by hand."""
    from pyro_iwem.infer import ParticleSampler

    x = data(12)
    calls = []

    def counted_guide(x, batch_size=None):
        calls.append(1)
        return trainable_guide(x, batch_size)

    pyro.clear_param_store()
    pyro.set_rng_seed(21)
    sampler = ParticleSampler(fixed_tau, counted_guide)
    sampler(2, (x,), {}, grad_guide=False)  # the probe's run and a first draw
    calls.clear()
    draws = sampler.draws(5, 3, (x,), {}, grad_guide=False)
    assert len(calls) == 1 and len(draws) == 5
    mu, z = (draws[0].guide_trace.nodes[n]["value"] for n in ("mu", "z"))
    assert mu.shape == (5, 1, 1) and z.shape == (5, 3, 12) and len(set(mu.flatten().tolist())) == 5
    assert [d.log_w.shape for d in draws] == [(3, 12)] * 5 and [d.outer_index for d in draws] == list(range(5))
    alone = replayed_alone(sampler, draws, x, 3)
    for d, a in zip(draws, alone):
        torch.testing.assert_close(d.log_w, a.log_w, rtol=0, atol=1e-12)
        torch.testing.assert_close(d.log_global_w, a.log_global_w, rtol=0, atol=1e-12)
    params = {n: pyro.param(n).detach() for n in GUIDE_PARAMS} | {"tau": torch.tensor(TAU, dtype=F64)}
    from pyro_iwem.infer.objectives import iwae_objective, nested_terms

    torch.testing.assert_close(nested_terms(draws, iwae_objective), by_hand(draws, x, params, False)[0],
                               rtol=0, atol=1e-10)  # fmt: skip


def test_outer_plate_keeps_an_enumerated_local_per_draw_and_datum():
    """A global μ beside an enumerated local switch c_i (summed out per datum): under the outer plate
    of M = 4 draws each draw's log weights equal one call replaying its own μ and z, to 1e-12."""
    from pyro_iwem.infer import ParticleSampler

    x = data(10)

    def switch_model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=F64), 1.0))
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.3, dtype=F64)), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(mu + c, TAU))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x)

    pyro.clear_param_store()
    pyro.set_rng_seed(22)
    sampler = ParticleSampler(switch_model, trainable_guide)
    draws = sampler.draws(4, 3, (x,), {}, grad_guide=False)
    assert len(draws) == 4 and draws[0].log_p.shape == (3, 10)
    for d, a in zip(draws, replayed_alone(sampler, draws, x, 3)):
        torch.testing.assert_close(d.log_w, a.log_w, rtol=0, atol=1e-12)
        torch.testing.assert_close(d.log_global_w, a.log_global_w, rtol=0, atol=1e-12)


def test_a_module_that_cannot_batch_its_globals_takes_one_call_per_draw_with_one_warning():
    """examples/hierarchical.py's PyroModule regression (nn.Linear with PyroSample weights) fails
    under the outer plate: IWAELoss(global_particles=3) warns once, naming the error, and takes the
    three draws one call each; the loss is finite and the next step does not warn again."""
    import importlib.util
    import pathlib

    from pyro.infer.autoguide import AutoNormal

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "hierarchical.py"
    spec = importlib.util.spec_from_file_location("hierarchical_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    pyro.clear_param_store()
    pyro.set_rng_seed(23)
    x = torch.randn(40, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(40)
    net = example.BayesianRegression(3)
    guide = AutoNormal(net)
    loss = IWAELoss(2, global_particles=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = loss.loss_and_grads(net, guide, x, y)
        second = loss.loss_and_grads(net, guide, x, y)
    plate = [str(w.message) for w in caught if "in one outer plate" in str(w.message)]
    assert len(plate) == 1 and "t() expects a tensor" in plate[0], plate
    assert math.isfinite(first) and math.isfinite(second) and 1.0 <= loss.global_ess <= 3.0


def scalar_mu_model(x, batch_size=None):
    """The random-effects model with μ reshaped to a scalar: it runs with one draw of μ and fails
    under the outer plate of several (μ is then ``(M, 1, 1)``)."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=F64), 1.0)).reshape(())
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as i:
        z = pyro.sample("z", dist.Normal(mu, TAU))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x[i])


@pytest.mark.parametrize("program", ["plate", "one call per draw", "particles one at a time"])
def test_chunked_nested_bound_draws_every_chunk_given_the_same_betas(program):
    """nested_bound(M = 3, K = 12, chunk_size = 5) with the exact posterior as guide is log p(x) to
    1e-10 only if every chunk's particles are drawn given the same three μ (another μ in a chunk
    breaks the identity p(x_i, z | μ) / q(z | x_i, μ) = p(x_i | μ)): under the outer plate, for a
    model that fails under it (one warning, then one call per draw), and one particle at a time."""
    x = data(15)
    mean, sd = posterior_mu(x, TAU)
    guide = exact_guide(TAU, mean, sd)
    chosen = scalar_mu_model if program == "one call per draw" else fixed_tau
    pyro.set_rng_seed(24)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = nested_bound(chosen, guide, x, global_particles=3, num_particles=12, chunk_size=5,
                             vectorize_particles=program != "particles one at a time")  # fmt: skip
    fell_back = [w for w in caught if "in one outer plate" in str(w.message)]
    assert len(fell_back) == (program == "one call per draw")
    exact = log_marginal(x, TAU).item()
    assert found.terms.shape == (3,) and (found.terms - exact).abs().max().item() < 1e-10
    assert abs(found.bound.item() - exact) < 1e-10
