"""The any-model machinery against truths no implementation detail can fake.

* Score-function (VIMCO) gradients against exact gradients of the expected objective,
  computed by enumerating every joint assignment of the K discrete particles.
* Enumerated mixtures against their exact log-likelihood; IWEM and IWAE against Pyro's
  ``TraceEnum_ELBO`` and ``RenyiELBO``.
* Subsampling, sizeless plates, shape checks, global latents, annealing and the
  all-or-nothing contract of a refused step.

The statistical tests follow tests/test_baselines.py: float64, one copy of each parameter
per datum (all copies equal), so one vectorised call over M copies of a datum gives M
independent gradient samples, and tolerances from their measured standard errors.
"""

import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, RenyiELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoNormal
from torch.distributions import constraints

from pyro_iwem import IWEM, Annealing, IWAELoss, OptimalProposalLoss, VAELoss, iwae_bound
from pyro_iwem.infer import ParticleSampler, log_mean_exp
from pyro_iwem.infer.util import ModelError, ModelWarning
from tests.gaussian_models import PPCA, normal_chi_square, one_weight_model

T = torch.float64


def store_snapshot():
    """Every parameter's unconstrained value and ``.grad`` (cloned), by name."""
    out = {}
    for name in pyro.get_param_store():
        u = pyro.get_param_store().get_param(name).unconstrained()
        out[name] = (u.detach().clone(), None if u.grad is None else u.grad.clone())
    return out


def grad_of(name):
    g = pyro.get_param_store().get_param(name).unconstrained().grad
    assert g is not None, f"no gradient for {name}"
    return g.detach().clone()


# ============================================================================ 1, 2: exact gradients


class Mixture3:
    r"""c ~ Categorical(softmax(ρ)), x | c ~ N(μ_c, 1), θ = (ρ, μ); guide q(c | x) = Categorical(softmax(φ)).

    θ and φ have one copy per datum (``(M, 3)``, all rows equal), and every datum is the
    same x: the gradient of row i is datum i's gradient, M independent samples per call.
    The guide (φ) is far from the posterior.
    """

    x0 = 0.8
    rho0 = (0.2, -0.5, 0.3)
    mu0 = (-1.0, 0.5, 2.0)
    phi0 = (0.8, -0.4, -0.2)
    THETA = ("rho", "mu")
    PHI = ("phi",)

    def model(self, x):
        M = x.shape[0]
        rho = pyro.param("rho", torch.tensor(self.rho0, dtype=T).expand(M, 3).clone())
        mu = pyro.param("mu", torch.tensor(self.mu0, dtype=T).expand(M, 3).clone())
        with pyro.plate("data", M):
            c = pyro.sample("c", dist.Categorical(logits=rho))
            loc = (F.one_hot(c, 3).to(T) * mu).sum(-1)
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(self, x):
        M = x.shape[0]
        phi = pyro.param("phi", torch.tensor(self.phi0, dtype=T).expand(M, 3).clone())
        with pyro.plate("data", M):
            pyro.sample("c", dist.Categorical(logits=phi))

    def data(self, M):
        return torch.full((M,), self.x0, dtype=T)

    def exact_gradients(self, objective, K=4):
        r"""−∇ E_{c_1..c_K ~ q}[F(c_1..c_K)] for one datum, by summing over all 3^K assignments.

        ``objective(log_p, log_q)`` maps the ``(3^K, K)`` per-particle log p(x, c_k) and
        log q(c_k) to F per assignment. Returns {name: (3,) gradient of the loss −E[F]}.
        """
        rho = torch.tensor(self.rho0, dtype=T, requires_grad=True)
        mu = torch.tensor(self.mu0, dtype=T, requires_grad=True)
        phi = torch.tensor(self.phi0, dtype=T, requires_grad=True)
        log_p = torch.log_softmax(rho, 0) + dist.Normal(mu, 1.0).log_prob(torch.tensor(self.x0, dtype=T))
        log_q = torch.log_softmax(phi, 0)
        C = torch.tensor(list(itertools.product(range(3), repeat=K)))  # (3^K, K)
        weights = log_q[C].sum(1).exp()
        assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=T))
        expected = (weights * objective(log_p[C], log_q[C])).sum()
        grads = torch.autograd.grad(-expected, (rho, mu, phi))
        return dict(zip(("rho", "mu", "phi"), grads))


def iwae_F(log_p, log_q):
    return torch.logsumexp(log_p - log_q, 1) - math.log(log_p.shape[1])


def elbo_F(log_p, log_q):
    return (log_p - log_q).mean(1)


def optimal_F(log_p, log_q):  # eq. (7): log mean_k |log p_k| p_k / q_k
    return torch.logsumexp(log_p.abs().log() + log_p - log_q, 1) - math.log(log_p.shape[1])


def per_copy_grads(loss, m, x, names):
    """One ``loss_and_grads`` call: each parameter's ``(M, 3)`` gradient (row i: datum i's)."""
    loss.loss_and_grads(m.model, m.guide, x)
    return {name: grad_of(name) for name in names}


def compare_to_exact(sampled, exact, other=None):
    """Asserts each component's Monte-Carlo mean is within 4 SE of ``exact``; returns the
    measured (mean, exact, SE) per name. With ``other`` (the exact gradient of a different
    objective), asserts it is rejected (> 8 SE for some component): the test has power."""
    report, rejected = {}, 0.0
    for name, g in sampled.items():
        M = g.shape[0]
        mean, se = g.mean(0), g.std(0) / math.sqrt(M)
        z = (mean - exact[name]) / se
        report[name] = (mean.tolist(), exact[name].tolist(), se.tolist())
        print(f"{name}: MC {fmt(mean)} exact {fmt(exact[name])} SE {fmt(se)} max|z| {z.abs().max():.2f}")
        assert z.abs().max() < 4, f"{name}: MC {mean.tolist()} vs exact {exact[name].tolist()}, SE {se.tolist()}"
        assert (exact[name].abs() / se).max() > 8, (name, report[name])  # far from zero: not vacuous
        if other is not None:
            rejected = max(rejected, ((mean - other[name]) / se).abs().max().item())
    if other is not None:
        print(f"  the other objective's exact gradient is {rejected:.1f} SE away")
        assert rejected > 8, rejected
    return report


def fmt(t):
    return "[" + ", ".join(f"{v:+.4f}" for v in t.tolist()) + "]"


M_GRAD = 20000


@pytest.mark.parametrize(
    "loss_class, objective, other",
    [(IWAELoss, "iwae", "elbo"), (VAELoss, "elbo", "iwae")],
    ids=["IWAELoss-VIMCO", "VAELoss-leave-one-out-REINFORCE"],
)
def test_score_function_gradients_are_unbiased_against_enumeration(loss_class, objective, other):
    """IWAELoss(K = 4) (VIMCO for φ) and VAELoss(4) (leave-one-out REINFORCE for φ), pathwise with
    c fixed for θ: E[gradient] = −∇E[F] exactly, F = the IWAE bound or the ELBO; the other
    objective's exact gradient is rejected (the test can fail)."""
    objectives = {"iwae": iwae_F, "elbo": elbo_F}
    m = Mixture3()
    x = m.data(M_GRAD)
    exact = m.exact_gradients(objectives[objective])
    sampled = per_copy_grads(loss_class(4), m, x, ("rho", "mu", "phi"))
    compare_to_exact(sampled, exact, other=m.exact_gradients(objectives[other]))


def test_optimal_proposal_gradient_is_unbiased_against_enumeration():
    """OptimalProposalLoss(J = 4): φ only; E[gradient] = −∇φ E[eq. 7] exactly, θ untouched."""
    m = Mixture3()
    x = m.data(M_GRAD)
    exact = m.exact_gradients(optimal_F)
    loss = OptimalProposalLoss(4)
    sampled = per_copy_grads(loss, m, x, ("phi",))
    compare_to_exact(sampled, {"phi": exact["phi"]}, other={"phi": m.exact_gradients(iwae_F)["phi"]})
    for name in Mixture3.THETA:
        assert pyro.get_param_store().get_param(name).unconstrained().grad is None


def test_iwem_m_step_theta_gradient_is_unbiased_against_enumeration():
    """IWEM (α = 1): the M-step moves θ by −lr ∇θ(−Q̂); with SGD at lr 1 the move is the
    gradient, whose expectation is −∇θ E[F_IWAE] (Proposition 1 in expectation)."""
    m = Mixture3()
    x = m.data(M_GRAD)
    iwem = IWEM(m.model, m.guide, K=4, J=4, optim=pyro.optim.SGD({"lr": 1.0}), annealing=None)
    m.model(x), m.guide(x)
    before = {name: pyro.param(name).detach().clone() for name in Mixture3.THETA}
    iwem.step(x)
    moved = {name: before[name] - pyro.param(name).detach() for name in Mixture3.THETA}
    exact = m.exact_gradients(iwae_F)
    compare_to_exact(moved, exact, other=m.exact_gradients(elbo_F))


def test_vimco_phi_gradient_has_lower_variance_than_plain_reinforce():
    """On the same particles: VIMCO's φ-gradient (IWAELoss) against REINFORCE with signal F and
    no baseline, computed here from log w and log q. Both unbiased; VIMCO's variance is smaller."""
    m = Mixture3()
    x = m.data(M_GRAD)
    loss = IWAELoss(4)
    particles = loss.sampler(m.model, m.guide)(4, (x,), {}, grad_guide=True)
    phi = pyro.param("phi").unconstrained()
    F_value = log_mean_exp(particles.log_w)
    score = particles.log_score
    surrogate = F_value + (F_value.detach() * (score - score.detach())).sum(0)
    (reinforce,) = torch.autograd.grad(-surrogate.sum(), phi, retain_graph=True)
    (pathwise,) = torch.autograd.grad(-F_value.sum(), phi, retain_graph=True)  # no score term
    vimco = loss.gradients(particles)[phi]
    exact = m.exact_gradients(iwae_F)
    compare_to_exact({"phi": reinforce}, exact)  # the hand-made estimator is right, too
    compare_to_exact({"phi": vimco}, exact)
    # without its score term the φ-gradient is biased, and the same tolerance rejects it
    z = (pathwise.mean(0) - exact["phi"]) / (pathwise.std(0) / math.sqrt(M_GRAD))
    assert z.abs().max() > 8, z
    ratio = vimco.var(0) / reinforce.var(0)
    print("Var(VIMCO) / Var(REINFORCE) per component:", ratio.tolist())
    assert (ratio < 0.8).all(), ratio


# ============================================================================ 3: Pyro's RenyiELBO


def gamma_model(x):
    """z ~ Gamma(2, rate) per datum (positive: AutoNormal's Delta site carries a Jacobian), x | z ~ N(z, 0.5²)."""
    rate = pyro.param("rate", torch.tensor(1.5, dtype=T), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Gamma(torch.tensor(2.0, dtype=T), rate))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


@pytest.mark.parametrize("K", [1, 6])
def test_iwae_loss_with_autonormal_equals_renyi_elbo_on_the_same_draws(K):
    """AutoNormal's Delta site carries log|det J|, its auxiliary site the Normal density: IWAELoss
    counts both in log q, as RenyiELBO(α = 0) does. Same seed: same value and same gradients."""
    x = torch.tensor([0.5, 1.2, 2.0, 3.1, 0.9], dtype=T)
    guide = AutoNormal(gamma_model, init_scale=0.3)
    guide(x)  # sets the guide up (its prototype run draws random numbers) before the seeded draws
    renyi = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    ours = IWAELoss(K, max_plate_nesting=1)
    names = ["rate", "AutoNormal.locs.z", "AutoNormal.scales.z"]

    def run(fn):
        for name in names:
            pyro.get_param_store().get_param(name).unconstrained().grad = None
        pyro.set_rng_seed(11)
        value = fn(gamma_model, guide, x)
        return value, {name: grad_of(name) for name in names}

    pyro.set_rng_seed(11)
    expected_value = renyi.loss(gamma_model, guide, x)
    pyro.set_rng_seed(11)
    assert ours.loss(gamma_model, guide, x) == pytest.approx(expected_value, rel=1e-5)
    expected, expected_grads = run(renyi.loss_and_grads)
    value, grads = run(ours.loss_and_grads)
    print(f"K={K}: RenyiELBO {expected:.10f}  IWAELoss {value:.10f}")
    assert value == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(expected_value, rel=1e-12)  # loss and loss_and_grads: one draw
    for name in names:
        assert expected_grads[name].abs().max() > 1e-3, name
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-8)
    # without the Jacobian the values would differ by far more than the tolerance
    pyro.set_rng_seed(11)
    particles = ours.sampler(gamma_model, guide)(K, (x,), {}, grad_guide=False)
    z = particles.guide_trace.nodes["z"]["value"]
    jacobian = z.log().sum().item()  # log|d exp(u)/du| summed: what a Jacobian-free log q misses
    assert abs(jacobian) > 100 * 1e-5 * abs(expected)


# ============================================================================ 4: enumerated mixture


class Mixture1D:
    """A 1-D Gaussian mixture with learnable weights (simplex) and locs; unit scales."""

    def __init__(self, weights, locs):
        self.weights0 = torch.tensor(weights, dtype=T)
        self.locs0 = torch.tensor(locs, dtype=T)

    def params(self):
        w = pyro.param("weights", self.weights0.clone(), constraint=constraints.simplex)
        locs = pyro.param("locs", self.locs0.clone())
        return w, locs

    def model(self, x):
        w, locs = self.params()
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[c], 1.0), obs=x)

    @staticmethod
    def log_likelihood(x, w, locs):
        """Exact per-datum log p(x) = log Σ_c w_c N(x; μ_c, 1)."""
        return torch.logsumexp(w.log() + dist.Normal(locs, 1.0).log_prob(x.unsqueeze(-1)), -1)

    def current_log_likelihood(self, x):
        store = pyro.get_param_store()
        return self.log_likelihood(x, store["weights"].detach(), store["locs"].detach()).mean().item()


def empty_guide(x):
    pass


def gmm_data(n, weights, locs, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.multinomial(torch.tensor(weights, dtype=T), n, replacement=True, generator=g)
    return torch.tensor(locs, dtype=T)[c] + torch.randn(n, generator=g, dtype=T), c


def test_iwae_bound_of_an_enumerated_mixture_is_its_exact_log_likelihood():
    """With the assignment summed out and an empty guide, every weight is p(x_i): exact for any K."""
    m = Mixture1D([0.2, 0.5, 0.3], [-2.0, 0.5, 3.0])
    model = config_enumerate(m.model)
    x, _ = gmm_data(30, [0.3, 0.3, 0.4], [-2.0, 0.0, 2.0], seed=5)
    exact = Mixture1D.log_likelihood(x, m.weights0, m.locs0)
    for K, chunk in ((2, 2), (6, 3)):
        bound = iwae_bound(model, empty_guide, x, num_particles=K, chunk_size=chunk)
        assert bound.shape == (30,) and bound.dtype == T
        torch.testing.assert_close(bound, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("K, chunk, B", [(1, 1, 30), (7, 3, 30), (3, 3, 1)])
def test_enumerated_mixture_with_one_particle_or_one_datum(K, chunk, B):
    """A plate of size 1 under enumeration: one particle (VAELoss's default; a last chunk of one,
    K = 7 by 3) or a minibatch of one datum. The bound is still exact."""
    m = Mixture1D([0.2, 0.5, 0.3], [-2.0, 0.5, 3.0])
    model = config_enumerate(m.model)
    x, _ = gmm_data(B, [0.3, 0.3, 0.4], [-2.0, 0.0, 2.0], seed=5)
    exact = Mixture1D.log_likelihood(x, m.weights0, m.locs0)
    bound = iwae_bound(model, empty_guide, x, num_particles=K, chunk_size=chunk)
    torch.testing.assert_close(bound, exact, atol=1e-6, rtol=0)


def test_iwem_and_iwae_on_an_enumerated_mixture_reach_trace_enum_elbo():
    """IWEM (α ≡ 1, K = J = 2), SVI + IWAELoss(2) and SVI + TraceEnum_ELBO from the same init
    reach the same exact log-likelihood; the empty guide makes IWEM warn its P-step is idle."""
    true_w, true_locs = [0.3, 0.7], [-2.0, 2.0]
    x, _ = gmm_data(200, true_w, true_locs, seed=7)
    m = Mixture1D([0.5, 0.5], [-0.5, 0.5])
    model = config_enumerate(m.model)
    steps = 300

    def train(make_step):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        step = make_step()
        for _ in range(steps):
            step(x)
        return m.current_log_likelihood(x)

    start = Mixture1D.log_likelihood(x, m.weights0, m.locs0).mean().item()
    adam = lambda: pyro.optim.Adam({"lr": 0.05})  # noqa: E731
    reference = train(lambda: SVI(model, empty_guide, adam(), TraceEnum_ELBO(max_plate_nesting=1)).step)
    iwae = train(lambda: SVI(model, empty_guide, adam(), IWAELoss(2)).step)
    with pytest.warns(ModelWarning, match="P-step trains nothing"):
        iwem = train(lambda: IWEM(model, empty_guide, K=2, J=2, optim=adam(), annealing=None).step)
    print(f"log-likelihood per datum: start {start:.8f}, TraceEnum_ELBO {reference:.8f}, ", end="")
    print(f"IWAE {iwae:.8f}, IWEM {iwem:.8f}")
    assert reference - start > 0.5  # training did something
    assert abs(iwae - reference) < 0.01 and abs(iwem - reference) < 0.01
    w = pyro.param("weights").detach()
    assert abs(w[1].item() - 0.7) < 0.1, w


# ============================================================================ 5: a sampled assignment


class AmortisedMixture(Mixture1D):
    """The mixture with the assignment sampled by an amortised guide q(c | x) = Categorical(a x + b)."""

    def guide(self, x):
        a = pyro.param("a", torch.zeros(2, dtype=T))
        b = pyro.param("b", torch.zeros(2, dtype=T))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=a * x.unsqueeze(-1) + b))


@pytest.mark.parametrize("method", ["iwem", "iwae"])
def test_a_sampled_assignment_learns_the_mixture_weights(method):
    """True weights (0.2, 0.8) and locs (-3, 3); from (0.5, 0.5) and (-1, 1), with VIMCO gradients for
    the guide's Categorical, both methods learn the weights (within 0.05) and the locs (within 0.2)."""
    true_w, true_locs = [0.2, 0.8], [-3.0, 3.0]
    x, c = gmm_data(1000, true_w, true_locs, seed=11)
    m = AmortisedMixture([0.5, 0.5], [-1.0, 1.0])
    steps = 400
    optim = pyro.optim.Adam({"lr": 0.05})
    if method == "iwem":
        step = IWEM(m.model, m.guide, K=10, J=10, optim=optim, annealing=Annealing.over(steps)).step
    else:
        step = SVI(m.model, m.guide, optim, IWAELoss(10)).step
    for _ in range(steps):
        step(x)
    w, locs = pyro.param("weights").detach(), pyro.param("locs").detach()
    print(f"{method}: weights {w.tolist()}, locs {locs.tolist()}, assignment fraction {c.double().mean().item():.3f}")
    assert (w - torch.tensor(true_w, dtype=T)).abs().max() < 0.05, w
    assert (locs - torch.tensor(true_locs, dtype=T)).abs().max() < 0.2, locs
    # the guide learned the posterior: q(c = 1 | x) ≈ 1 for x = 3, ≈ 0 for x = -3
    q = torch.softmax(pyro.param("a").detach() * torch.tensor([[-3.0], [3.0]], dtype=T) + pyro.param("b").detach(), -1)
    assert q[0, 1] < 0.05 and q[1, 1] > 0.95, q


# ============================================================================ 6: subsampling


class SubsampledGaussian:
    r"""z ~ N(0, 1), x | z ~ N(z, σ²) over a data plate of N with a subsample of m; a fixed guide
    N(a x + c, s²) (no parameters). ``subsample=`` fixes the indices; otherwise the plate draws
    them, and model and guide record every index tensor they see."""

    sigma, a, c, s = 0.8, 0.5, 0.1, 0.8

    def __init__(self, x, m, subsample=None):
        self.x, self.m, self.subsample = x, m, subsample
        self.seen = []

    def plate(self):
        return pyro.plate("data", self.x.shape[0], subsample_size=self.m, subsample=self.subsample)

    def model(self):
        with self.plate() as idx:
            self.seen.append(idx.clone())
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=T), 1.0))
            pyro.sample("x", dist.Normal(z, self.sigma), obs=self.x[idx])

    def guide(self):
        with self.plate() as idx:
            self.seen.append(idx.clone())
            pyro.sample("z", dist.Normal(self.a * self.x[idx] + self.c, self.s))

    def exact(self, idx):
        return dist.Normal(torch.zeros((), dtype=T), math.sqrt(1 + self.sigma**2)).log_prob(self.x[idx])

    def chi_square(self, idx):
        r""":math:`\chi^2(p(z|x) \| q(z|x))` per datum: the variance of w / p(x) under q."""
        v = self.sigma**2 / (1 + self.sigma**2)
        mean = self.x[idx] / (1 + self.sigma**2)
        shift = (self.a * self.x[idx] + self.c - mean) / math.sqrt(v)
        return torch.tensor([normal_chi_square(d.item(), self.s / math.sqrt(v)) for d in shift], dtype=T)


def within_mc_error(bound, exact, chi2, K):
    """Per datum: -(4 SE + bias) < bound - log p(x) < 4 SE, with SE = sqrt(χ²/K) and bias ≈ χ²/(2K)."""
    se = (chi2 / K).sqrt()
    gap = bound - exact
    return (gap < 4 * se) & (gap > -(4 * se + chi2 / K))


def test_iwae_bound_on_a_subsampled_plate_is_the_minibatchs_log_likelihood():
    """K = 2000 in chunks of 100 on a subsample of 5 of 50 distinct data: every chunk sees the first
    chunk's minibatch, and each datum's bound is within MC error of its exact log p(x) (never above).
    Pooling chunks drawn on different minibatches (the bug this guards against) fails the same check."""
    x = torch.linspace(-3.0, 3.0, 50, dtype=T)
    m = SubsampledGaussian(x, 5)
    K = 2000
    bound = iwae_bound(m.model, m.guide, num_particles=K, chunk_size=100)
    idx = m.seen[-1]
    runs = m.seen[-2 * (K // 100) :]  # guide and model, once per chunk
    assert all(torch.equal(r, idx) for r in runs)
    assert bound.shape == (5,)
    exact, chi2 = m.exact(idx), m.chi_square(idx)
    print("subsample", idx.tolist(), "bound - exact", (bound - exact).tolist(), "SE", (chi2 / K).sqrt().tolist())
    assert within_mc_error(bound, exact, chi2, K).all()
    assert (chi2 / K).sqrt().max() < 0.05  # the tolerance is tight

    # the old bug: every chunk on a minibatch of its own, their weights pooled per column
    sampler = ParticleSampler(m.model, m.guide)
    with torch.no_grad():
        log_w = torch.cat([sampler(100, (), {}, grad_guide=False).log_w for _ in range(K // 100)])
    pooled = torch.logsumexp(log_w, 0) - math.log(K)
    assert not within_mc_error(pooled, exact, chi2, K).all()


def test_a_fixed_subsample_is_weighted_per_datum_and_scaled_by_n_over_m():
    """subsample= fixes the indices: the bound is those data's log p(x); IWAELoss with the exact
    posterior as guide is -(N / m) Σ log p(x_i) exactly (the scale applies after the per-datum log-mean-exp)."""
    x = torch.linspace(-3.0, 3.0, 50, dtype=T)
    idx = torch.tensor([3, 17, 42, 8])
    m = SubsampledGaussian(x, 4, subsample=idx)
    K = 2000
    bound = iwae_bound(m.model, m.guide, num_particles=K, chunk_size=250)
    assert within_mc_error(bound, m.exact(idx), m.chi_square(idx), K).all()

    exact_guide = SubsampledGaussian(x, 4, subsample=idx)
    v = 1 + exact_guide.sigma**2
    exact_guide.a, exact_guide.c, exact_guide.s = 1 / v, 0.0, exact_guide.sigma / math.sqrt(v)
    expected = -(50 / 4) * exact_guide.exact(idx).sum().item()
    for K in (1, 7):
        assert IWAELoss(K).loss(exact_guide.model, exact_guide.guide) == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(
        iwae_bound(exact_guide.model, exact_guide.guide, num_particles=10), exact_guide.exact(idx), atol=1e-10, rtol=0
    )


# ============================================================================ 7: a sizeless plate


def linear_gaussian(sized):
    """z ~ N(0, 1), x | z ~ N(w z, 0.7²), guide N(a x, s²): the data plate sized, or sizeless (dim=-1)."""

    def plate(x):
        return pyro.plate("data", x.shape[0]) if sized else pyro.plate("data", dim=-1)

    def model(x):
        w = pyro.param("w", torch.tensor(1.5, dtype=T))
        with plate(x):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(w * z, 0.7), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor(0.2, dtype=T))
        s = pyro.param("s", torch.tensor(1.2, dtype=T), constraint=constraints.positive)
        with plate(x):
            pyro.sample("z", dist.Normal(a * x, s))

    return model, guide


def test_a_sizeless_plate_gives_the_values_of_a_sized_one():
    """With sizes from broadcasting, IWAELoss (value and gradients) and IWEM (losses, bounds and
    parameters over three steps) equal the sized plate's on the same seeds, and nothing warns."""
    x = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4, 1.1], dtype=T)
    results = {}
    for sized in (True, False):
        model, guide = linear_gaussian(sized)
        pyro.clear_param_store()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ModelWarning)
            pyro.set_rng_seed(4)
            value = IWAELoss(5).loss_and_grads(model, guide, x)
            grads = {n: grad_of(n) for n in ("w", "a", "s")}
            pyro.clear_param_store()
            pyro.set_rng_seed(4)
            iwem = IWEM(model, guide, K=5, J=5, optim=pyro.optim.Adam({"lr": 0.1}), annealing=Annealing(0.5, every=1))
            losses = [(iwem.step(x), iwem.bound, iwem.p_loss) for _ in range(3)]
            bound = iwae_bound(model, guide, x, num_particles=50)
        params = {n: pyro.param(n).detach().clone() for n in ("w", "a", "s")}
        results[sized] = (value, grads, losses, bound, params)
    (v1, g1, l1, b1, p1), (v2, g2, l2, b2, p2) = results[True], results[False]
    assert v1 == pytest.approx(v2, rel=1e-12)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(l1, dtype=T), torch.tensor(l2, dtype=T), rtol=1e-12, atol=1e-12)
    assert b1.shape == b2.shape == (6,)
    torch.testing.assert_close(b1, b2, rtol=1e-12, atol=1e-12)


# ============================================================================ 8: checks, warnings, bound, annealing


def test_a_guide_latent_of_the_wrong_shape_is_refused_naming_the_site():
    """The model's z is (B, 2), the guide's (B, 1): broadcasting would hide it; it is a ModelError."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=T), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(1, dtype=T))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    x = torch.tensor([0.3, -1.2, 2.0], dtype=T)
    for run in (
        lambda: IWAELoss(4).loss_and_grads(model, guide, x),
        lambda: IWEM(model, guide, K=4, J=4).step(x),
        lambda: iwae_bound(model, guide, x, num_particles=4),
    ):
        with pytest.raises(ModelError, match=r"site 'z'.*shape \((4, )?3, 1\).*event shape \(2,\)"):
            run()
    assert pyro.param("loc").grad is None


def global_latent_model(x):
    """g ~ N(0, 1) outside the data plate, x_i | g ~ N(g, 1): the data are not independent."""
    g = pyro.sample("g", dist.Normal(torch.zeros((), dtype=T), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(g, 1.0), obs=x)


def global_latent_guide(x):
    """The exact posterior N(Σx / (B + 1), 1 / (B + 1)) when ``loc`` and ``scale`` are left as initialised."""
    B = x.shape[0]
    loc = pyro.param("loc", x.sum() / (B + 1))
    scale = pyro.param("scale", torch.tensor(1 / math.sqrt(B + 1), dtype=T), constraint=constraints.positive)
    pyro.sample("g", dist.Normal(loc, scale))


def test_a_global_latent_warns_once_and_the_bound_is_exact():
    """A model whose only latent is global: one warning naming 'g' per sampler (L_K is then the
    ELBO whatever K); the guide is the exact posterior, so L_K = log p(β) − log q(β) + Σ_i log p(x_i | β)
    is the exact joint log p(x_1..x_B) at every draw, and iwae_bound's per-datum shares sum to it."""
    x = torch.tensor([0.3, -1.2, 2.0, 0.9], dtype=T)
    exact = dist.MultivariateNormal(torch.zeros(4, dtype=T), torch.eye(4, dtype=T) + 1.0).log_prob(x)
    loss = IWAELoss(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            value = loss.loss_and_grads(global_latent_model, global_latent_guide, x)
    named = [w for w in caught if issubclass(w.category, ModelWarning) and "'g'" in str(w.message)]
    assert len(named) == 1, [str(w.message) for w in caught]
    assert "data plate 'data'" in str(named[0].message)
    assert value == pytest.approx(-exact.item(), rel=1e-10)  # the batch's joint, weighted once

    with pytest.warns(ModelWarning, match="'g'"):
        bound = iwae_bound(global_latent_model, global_latent_guide, x, num_particles=20, chunk_size=7)
    assert bound.shape == (4,)
    assert bound.sum().item() == pytest.approx(exact.item(), abs=1e-10)


def test_iwem_bound_is_the_e_steps_log_mean_exp_averaged_over_data():
    """At a fixed seed, IWEM.bound after a step is mean_i log mean_k w_ik of the E-step's K particles
    (θ_t, before the step), recomputed here with a fresh sampler on the same seed."""
    m = PPCA(D=3, d=1)
    x = torch.randn(8, 3, dtype=T) * 2
    K = 7
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    iwem = IWEM(m.model, m.guide, K=K, J=5, optim=pyro.optim.Adam({"lr": 0.1}), annealing=None)
    iwem.step(x)
    pyro.clear_param_store()  # back to θ_t (the initial values)
    pyro.set_rng_seed(3)
    log_w = ParticleSampler(m.model, m.guide)(K, (x,), {}, grad_guide=False).log_w
    assert log_w.shape == (K, 8)
    expected = log_mean_exp(log_w).mean().item()
    assert iwem.bound == pytest.approx(expected, rel=1e-12)
    assert iwem.bound != pytest.approx(log_w.mean().item(), rel=1e-6)  # the ELBO is not it


def test_iwem_bound_is_below_the_log_likelihood_in_expectation_and_exact_at_the_posterior():
    """PPCA: with the exact posterior as guide, IWEM.bound is the mean log p(x) at θ_t exactly; with
    the initial guide (SGD at lr 0, so θ stays put), its mean over 200 steps is below log p(x)."""
    m = PPCA(D=3, d=1)
    x = torch.randn(10, 3, dtype=T) * 2
    W = torch.tensor([[1.0], [0.5], [-2.0]], dtype=T)
    mu, sigma = torch.tensor([0.1, 0.2, 0.3], dtype=T), torch.tensor(0.6, dtype=T)
    A, c, s = m.exact_guide_params(W, mu, sigma)
    for name, value in {"W": W, "mu": mu, "sigma": sigma, "A": A, "c": c, "s": s}.items():
        pyro.param(name, value, constraint=constraints.positive if name in ("sigma", "s") else constraints.real)
    exact = PPCA.log_likelihood(x, W, mu, sigma).mean().item()
    iwem = IWEM(m.model, m.guide, K=5, J=5, optim=pyro.optim.SGD({"lr": 0.1}), annealing=None)
    iwem.step(x)
    assert iwem.bound == pytest.approx(exact, abs=1e-10)

    pyro.clear_param_store()
    pyro.param("W", W)  # the guide's initial (A, c, s) = (0, 0, 1) is the prior: far from this posterior
    m.model(x), m.guide(x)
    exact = PPCA.log_likelihood(x, W, torch.zeros(3, dtype=T), torch.tensor(1.0, dtype=T)).mean().item()
    iwem = IWEM(m.model, m.guide, K=5, J=5, optim=pyro.optim.SGD({"lr": 0.0}), annealing=None)
    bounds = []
    for _ in range(200):
        iwem.step(x)
        bounds.append(iwem.bound)
    bounds = torch.tensor(bounds, dtype=T)
    mean, se = bounds.mean().item(), bounds.std().item() / math.sqrt(len(bounds))
    print(f"PPCA: mean IWEM.bound {mean:.4f} ± {se:.4f}, exact mean log p(x) {exact:.4f}")
    assert mean < exact + 4 * se  # below log p(x) in expectation
    assert mean < exact - 4 * se  # strictly, here (q is not the posterior): the check has power


@pytest.mark.parametrize("num_steps", [1, 7, 100, 250, 300, 3000])
def test_annealing_over_reaches_alpha_one_at_the_last_step_and_not_before(num_steps):
    annealing = Annealing.over(num_steps)
    alphas = [annealing.alpha]
    for _ in range(num_steps):
        annealing.step()
        alphas.append(annealing.alpha)
    assert alphas[0] == 0.0
    assert all(a < 1.0 for a in alphas[:-1]), max(alphas[:-1])
    assert alphas[-1] == 1.0
    assert alphas == sorted(alphas)


def test_iwem_with_annealing_over_300_steps_reaches_alpha_one_at_step_300():
    m = PPCA(D=3, d=1)
    x = torch.randn(4, 3, dtype=T)
    iwem = IWEM(m.model, m.guide, K=2, J=2, annealing=Annealing.over(300))
    for step in range(300):
        assert iwem.alpha < 1.0, step
        iwem.step(x)
    assert iwem.alpha == 1.0 and iwem.num_steps == 300


@pytest.mark.parametrize("num_steps", [49, 98, 205, 1234])
def test_annealing_over_any_length_reaches_alpha_one_at_the_last_step(num_steps):
    test_annealing_over_reaches_alpha_one_at_the_last_step_and_not_before(num_steps)


# ============================================================================ 9: all or nothing


def nan_scale_model(x):
    """The observation scale is a parameter set to NaN: the log density is NaN at the first step."""
    w = pyro.param("w", torch.tensor(1.5, dtype=T))
    sigma = pyro.param("sigma", torch.tensor(math.nan, dtype=T), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=T), 1.0))
        pyro.sample("x", dist.Normal(w * z, sigma, validate_args=False), obs=x)


def nan_factor_model(x):
    """Valid distributions, and a NaN log factor that depends on a parameter."""
    w = pyro.param("w", torch.tensor(1.5, dtype=T))
    sigma = pyro.param("sigma", torch.tensor(0.7, dtype=T), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=T), 1.0))
        pyro.factor("bad", sigma * torch.where(z > -50.0, math.nan, 0.0))
        pyro.sample("x", dist.Normal(w * z, sigma), obs=x)


def linear_guide(x):
    a = pyro.param("a", torch.tensor(0.2, dtype=T))
    s = pyro.param("s", torch.tensor(1.2, dtype=T), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a * x, s))


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("model", [nan_scale_model, nan_factor_model])
@pytest.mark.parametrize("method", ["iwem", "iwae"])
def test_a_nan_log_density_at_the_first_step_changes_nothing(model, method, validate):
    """Refused (by Pyro's validation, or without it by the sampler's own check, a ModelError) before
    any parameter, gradient or optimiser state is written."""
    x = torch.tensor([0.3, -1.2, 2.0], dtype=T)
    with pyro.validation_enabled(False):
        model(x), linear_guide(x)  # the parameters exist before the step
    before = store_snapshot()
    optim = pyro.optim.Adam({"lr": 0.1})
    if method == "iwem":
        step = IWEM(model, linear_guide, K=4, J=4, optim=optim, annealing=None).step
    else:
        step = SVI(model, linear_guide, optim, IWAELoss(4)).step
    with pyro.validation_enabled(validate), pytest.raises(ValueError, match="(?i)nan") as info:
        step(x)
    if not validate:
        assert info.type is ModelError
    after = store_snapshot()
    assert after.keys() == before.keys() == {"w", "sigma", "a", "s"}
    for name, (value, grad) in before.items():
        assert torch.equal(after[name][0], value) or (value.isnan().all() and after[name][0].isnan().all()), name
        assert grad is None and after[name][1] is None, name
    assert optim.get_state() == {}  # no optimiser state was created either


@pytest.mark.parametrize("model, site, param", [(nan_scale_model, "x", "scale"), (nan_factor_model, "bad", "log_factor")])
def test_a_nan_log_weight_names_its_datum_and_site(model, site, param):
    """The refusal says which datum and particle, which site's log density is NaN, and which of
    its distribution's parameters holds the NaN (issue 21, item 5)."""
    x = torch.tensor([0.3, -1.2, 2.0], dtype=T)
    with pyro.validation_enabled(False):
        model(x), linear_guide(x)
        expected = rf"datum 0 \(particle 0\): model site '{site}' has a NaN log density \(its distribution's {param} holds NaN"
        with pytest.raises(ModelError, match=expected):
            IWEM(model, linear_guide, K=4, J=4, annealing=None).step(x)


def test_a_diverged_fit_is_named_not_a_distribution_argument_error():
    """A parameter that diverged to NaN fails the guide's distribution checks (torch's "Expected
    parameter scale ..."); the refusal names the parameter and the divergence (issue 21, item 5)."""
    x = torch.tensor([0.3, -1.2, 2.0], dtype=T)
    nan_scale_model(x)
    pyro.param("s", torch.tensor(1.2, dtype=T), constraint=constraints.positive)
    pyro.get_param_store()["s"] = torch.tensor(math.nan, dtype=T)
    with pyro.validation_enabled(True), pytest.raises(ModelError, match=r"parameters 'sigma', 's' hold NaN or Inf values: the fit has diverged"):
        IWEM(nan_scale_model, linear_guide, K=4, J=4, annealing=None).step(x)


def test_a_guide_of_the_wrong_shape_in_a_vectorised_draw_mentions_one_particle_models():
    """The shape error of a vectorised draw also says what to do if the model is written for one
    particle (Pyro's amortised LDA meets this one; issue 21, item 5)."""

    def model(x):  # written for one particle: h.view(n, -1) folds the particles into the event
        n = x.shape[0]
        with pyro.plate("data", n):
            h = pyro.sample("h", dist.Normal(torch.zeros(2, dtype=T), 1.0).to_event(1))
            z = pyro.sample("z", dist.Normal(h.view(n, -1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("h", dist.Normal(torch.zeros(2, dtype=T), 1.0).to_event(1))
            pyro.sample("z", dist.Normal(torch.zeros(2, dtype=T), 1.0).to_event(1))

    x = torch.tensor([0.3, -1.2, 2.0], dtype=T)
    with pytest.raises(ModelError, match=r"(?s)make the guide sample the site with the model's shape.*vectorize_particles=False"):
        iwae_bound(model, guide, x, num_particles=4)


@pytest.mark.parametrize("sequential", [False, True])
def test_a_plate_in_the_guide_and_not_the_model_is_refused_by_name(sequential):
    """Pyro's catalogue pattern iplate_in_guide_not_model (and its vectorised twin): refused,
    naming the plate, before any parameter moves (issue 21, item 5)."""

    def model():
        pyro.sample("x", dist.Bernoulli(torch.tensor(0.5, dtype=T)))

    def guide():
        q = pyro.param("q", torch.tensor(0.4, dtype=T), constraint=constraints.unit_interval)
        if sequential:
            for _ in pyro.plate("plate", 10, 5):
                pass
        else:
            with pyro.plate("plate", 10, 5):
                pass
        pyro.sample("x", dist.Bernoulli(q))

    optim = pyro.optim.Adam({"lr": 0.1})
    with pytest.raises(ModelError, match="the guide has the plate 'plate', which the model does not"):
        SVI(model, guide, optim, IWAELoss(4)).step()
    assert optim.get_state() == {}


def test_a_guide_site_outside_the_models_plate_is_named_with_the_plate():
    """The guide samples a per-datum latent outside the model's plate: the error names the plate,
    explains the particle dim in the shapes and carries neither Pyro's trace table (with the
    internal particle plate) nor the one-particle hint (issue 21, item 5)."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=T), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], dtype=T), 1.0).to_event(1))

    x = torch.tensor([0.3, -1.2, 2.0], dtype=T)
    with pytest.raises(ModelError) as info:
        iwae_bound(model, guide, x, num_particles=4)
    message = str(info.value)
    assert "the model samples it inside the plate 'data', and the guide outside it" in message
    assert "leftmost dim is the draw's particles" in message
    assert "_iwem_particles" not in message and "vectorize_particles" not in message


def test_a_nan_p_step_gradient_changes_nothing():
    """The E-step draws without a graph, so a guide whose φ-gradient is infinite (d√a/da at a = 0)
    passes the M-step; the P-step refuses it. All or nothing: θ must not have moved either."""
    model = one_weight_model

    def guide(x):
        a = pyro.param("a", torch.tensor(0.0, dtype=T))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(a.sqrt() * x, 1.0))

    x = torch.tensor([0.3, -1.2, 2.0], dtype=T)
    model(x), guide(x)
    before = store_snapshot()
    iwem = IWEM(model, guide, K=3, J=3, optim=pyro.optim.SGD({"lr": 0.1}), annealing=None)
    with pytest.raises(ModelError, match="no parameter was changed"):
        iwem.step(x)
    for name, (value, _) in before.items():
        assert torch.equal(pyro.param(name).detach(), value), (name, value.item(), pyro.param(name).item())
