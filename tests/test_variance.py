"""estimate_variance against exact truth.

PPCA with d = 1 (tests/gaussian_models.py) has a Gaussian posterior N(m(x), s_p^2) in the guide
family, so the variances of eq. (2) and eq. (3) are known in closed form:

* guide = posterior: every log weight is log p(x), the normalised weights are 1/K and
  Q̂ = log p(x) + mean_k log p(z_k | x) = const - chi^2_K / (2K): Var(Q̂) = 1/(2K) (d/(2K) for d
  latent dimensions); the ELBO's estimate is log p(x) whatever the draw: variance 0;
* guide N(a, t^2) ≠ posterior, K = 1: Q̂ = log p(x, z_1) and the ELBO estimate is log w_1, with
  u = z - a ~ N(0, t^2) and δ = a - m: Var(Q̂) = (2 t^4 + 4 δ^2 t^2) / (4 s_p^4) and
  Var(ELBO) = 2 t^4 c^2 + δ^2 t^2 / s_p^4, c = 1/(2t^2) - 1/(2s_p^2); with K particles the ELBO's
  estimate is a mean of K iid terms: Var / K; so is its θ-dependent part mean_k log p(x, z_k),
  whose variance is Var(log p(x, z_1)) / K (with the exact posterior, 1/(2K) as for Q̂).

Sample variances over R repeats are compared with these within a few standard errors.
"""

import math
import warnings
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_iwem import observe_masked
from pyro_iwem.infer import ImputedInputs, ParticleSampler, VarianceEstimate, estimate_variance, snis_objective
from tests.gaussian_models import PPCA
from tests.model_catalogue import CATALOGUE

T = torch.float64
W = torch.tensor([[1.0], [0.5], [-2.0]], dtype=T)
MU, SIGMA = torch.tensor([0.1, 0.2, 0.3], dtype=T), torch.tensor(0.6, dtype=T)


def ppca(B=20, guide_shift=0.0, guide_scale=1.0, seed=0):
    """PPCA with d = 1 and data x; the guide is the exact posterior moved by ``guide_shift``
    (its mean) and scaled by ``guide_scale`` (its sd). Returns the model, the data, the
    posterior's mean and sd and the guide's mean and sd, per datum."""
    m = PPCA(D=3, d=1)
    x = torch.randn(B, 3, dtype=T, generator=torch.Generator().manual_seed(seed)) * 2
    A, c, s = m.exact_guide_params(W, MU, SIGMA)
    params = {"W": W, "mu": MU, "sigma": SIGMA, "A": A, "c": c + guide_shift, "s": s * guide_scale}
    for name, value in params.items():
        pyro.param(name, value, constraint=constraints.positive if name in ("sigma", "s") else constraints.real)
    post_mean, post_sd = (x @ A.T + c).squeeze(-1), s.squeeze()
    return m, x, (post_mean, post_sd), (post_mean + guide_shift, post_sd * guide_scale)


def assert_ratio_near_one(estimates, truths, sigmas=4.0):
    """The per-datum estimates over their exact values average to 1 within ``sigmas`` standard
    errors (the data's ratios are independent: each datum has its own particles)."""
    ratio = estimates / truths
    se = ratio.std().item() / math.sqrt(len(ratio))
    assert abs(ratio.mean().item() - 1) < sigmas * se, (ratio.mean().item(), se)
    assert se < 0.1  # the check has power


@pytest.mark.parametrize("K", [1, 5, 20])
@pytest.mark.parametrize("chunk_size, vectorize", [(None, True), (1, True), (7, True), (None, False)])
def test_exact_posterior_q_hat_variance_is_d_over_2K_and_elbo_variance_is_zero(K, chunk_size, vectorize):
    m, x, *_ = ppca()
    R = 200 if vectorize else 50
    v = estimate_variance(m.model, m.guide, x, num_particles=K, num_repeats=R, chunk_size=chunk_size,
                          vectorize_particles=vectorize)
    assert isinstance(v, VarianceEstimate)
    assert all(values.shape == (len(x),) and values.dtype == T for values in v)
    truth = 1 / (2 * K)
    # Q̂ = const - chi^2_K / (2K): the sample variance of R values has relative variance
    # 2/(R-1) + (excess kurtosis 12/K)/R per datum; the data are independent
    se = truth * math.sqrt(2 / (R - 1) + 12 / (K * R)) / math.sqrt(len(x))
    assert abs(v.q_hat.mean().item() - truth) < 4 * se, (v.q_hat.mean().item(), truth, se)
    torch.testing.assert_close(v.joint, v.q_hat, rtol=1e-9, atol=0)  # the weights are all 1/K
    assert v.elbo.max().item() < 1e-20  # every log weight is log p(x)


@pytest.mark.parametrize("K", [1, 10])
def test_inexact_guide_variances_in_closed_form(K):
    (m, x, (post_mean, post_sd), (q_mean, q_sd)) = ppca(B=40, guide_shift=0.7, guide_scale=1.3)
    v = estimate_variance(m.model, m.guide, x, num_particles=K, num_repeats=400)
    delta, t2, s2 = q_mean - post_mean, q_sd**2, post_sd**2
    c = 1 / (2 * t2) - 1 / (2 * s2)
    elbo_1 = 2 * t2**2 * c**2 + delta**2 * t2 / s2**2
    joint_1 = (2 * t2**2 + 4 * delta**2 * t2) / (4 * s2**2)
    assert_ratio_near_one(v.elbo, elbo_1 / K)
    assert_ratio_near_one(v.joint, joint_1 / K)
    if K == 1:  # one particle: the normalised weight is 1 and Q̂ is log p(x, z_1)
        torch.testing.assert_close(v.q_hat, v.joint, rtol=1e-9, atol=0)
    else:  # the weights move mass to particles near the posterior mode: less variance than K = 1 here
        assert v.q_hat.mean() < joint_1.mean()


def test_variance_decreases_with_K():
    m, x, *_ = ppca(B=20, guide_shift=0.7, guide_scale=1.3)
    q_hat = [estimate_variance(m.model, m.guide, x, num_particles=K, num_repeats=200).q_hat.mean().item()
             for K in (2, 8, 32)]
    assert q_hat[0] > q_hat[1] > q_hat[2]
    assert q_hat[2] < q_hat[0] / 4  # roughly 1/K


class OneRepeatPerCall(ParticleSampler):
    """Serves a call for r·K particles as r calls of K: the same random stream as a plain loop of
    K-particle draws, whatever the chunking."""

    K = None

    def __call__(self, num_particles, args, kwargs, **options):
        assert num_particles % self.K == 0
        draws = [super(OneRepeatPerCall, self).__call__(self.K, args, kwargs, **options)
                 for _ in range(num_particles // self.K)]
        def cat(field):
            return torch.cat([getattr(p, field) for p in draws])

        return SimpleNamespace(log_w=cat("log_w"), log_p=cat("log_p"), log_model_proposed=cat("log_model_proposed"),
                               subsample=draws[0].subsample)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
def test_chunks_reshape_to_repeats_as_a_plain_loop(chunk_size):
    """With the sampler serving each repeat by its own K-particle draw, the estimate equals a
    plain loop of R draws with snis_objective (eq. 2) and the mean log weight (eq. 3), on one seed."""
    m, x, *_ = ppca(B=5, guide_shift=0.7, guide_scale=1.3)
    K, R = 4, 10
    sampler = OneRepeatPerCall(m.model, m.guide)
    sampler.K = K
    pyro.set_rng_seed(3)
    v = estimate_variance(m.model, m.guide, x, num_particles=K, num_repeats=R, sampler=sampler, chunk_size=chunk_size)
    pyro.set_rng_seed(3)
    plain = ParticleSampler(m.model, m.guide)
    draws = [plain(K, (x,), {}, grad_guide=False) for _ in range(R)]
    q_hat = torch.stack([snis_objective(p) for p in draws])
    elbo = torch.stack([p.log_w.mean(0) for p in draws])
    joint = torch.stack([p.log_p.mean(0) for p in draws])
    torch.testing.assert_close(v.q_hat, q_hat.var(0), rtol=1e-10, atol=0)
    torch.testing.assert_close(v.elbo, elbo.var(0), rtol=1e-10, atol=0)
    torch.testing.assert_close(v.joint, joint.var(0), rtol=1e-10, atol=0)
    assert v.q_hat.min() > 0 and v.elbo.min() > 0


def masked_model(x, mask):
    W = pyro.param("W", 0.5 * torch.ones(x.shape[-1], 2, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        observe_masked("x", dist.Normal(z @ W.T, 1.0), x, mask, event_dim=1)


def masked_guide(x, mask):
    A = pyro.param("q_A", 0.1 * torch.ones(2, x.shape[-1], dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ A.T, 1.0).to_event(1))


class CountingInputs(ImputedInputs):
    calls = 0

    def __call__(self, *args):
        self.calls += 1
        return super().__call__(*args)


@pytest.mark.parametrize("fresh", [True, False])
def test_missing_data_draws_the_completion_per_repeat_or_once(fresh):
    x = torch.randn(6, 4, dtype=T)
    mask = torch.rand(6, 4) > 0.4
    inputs = CountingInputs()
    sampler = ParticleSampler(masked_model, masked_guide, guide_inputs=inputs)
    v = estimate_variance(masked_model, masked_guide, x, mask, num_particles=5, num_repeats=8, sampler=sampler,
                          fresh_guide_inputs=fresh)
    assert v.q_hat.shape == (6,) and torch.isfinite(v.q_hat).all() and (v.q_hat > 0).all()
    assert inputs.calls == (8 if fresh else 1)


def test_missing_entries_enter_q_hat_but_not_the_elbo():
    """Q̂ of eq. (9) sums log p over the sampled missing entries too; the ELBO's terms of eq. (9)
    leave them out: with one particle (weight 1), Q̂ = log p(x_o, x_m, z), the θ-part of the ELBO
    log p(x_o, z), and the difference is log p(x_m | z), which adds variance."""
    x = torch.randn(30, 4, dtype=T)
    mask = torch.ones(30, 4, dtype=torch.bool)
    mask[:, :2] = False
    v = estimate_variance(masked_model, masked_guide, x, mask, num_particles=1, num_repeats=200)
    assert (v.q_hat.mean() > v.joint.mean()) and not torch.allclose(v.q_hat, v.joint)
    complete = estimate_variance(masked_model, masked_guide, x, torch.ones_like(mask), num_particles=1, num_repeats=3)
    torch.testing.assert_close(complete.q_hat, complete.joint, rtol=1e-9, atol=0)


@pytest.mark.parametrize("pattern", [p for p in CATALOGUE if p.valid], ids=lambda p: p.name)
def test_every_valid_catalogue_pattern(pattern):
    """Works on any model the sampler supports: one finite, non-negative variance per datum."""
    model, guide = pattern.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = estimate_variance(model, guide, *pattern.args, num_particles=3, num_repeats=4,
                              vectorize_particles=pattern.vectorize)
    for values in v:
        assert values.dim() == 1 and values.dtype == T and torch.isfinite(values).all() and (values >= 0).all()
        if pattern.datums is not None:
            assert values.shape == (pattern.datums,)


def test_bad_arguments():
    m, x, *_ = ppca(B=2)
    for kwargs in ({"num_repeats": 1}, {"num_particles": 0}, {"chunk_size": 0}, {"memory_budget": 0}):
        with pytest.raises(ValueError, match="num_repeats >= 2"):
            estimate_variance(m.model, m.guide, x, **kwargs)
