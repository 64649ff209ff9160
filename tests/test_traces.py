"""The vectorised trace machinery: per-datum reduction, model-proposed sites, subsampling."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyro_iwem import IWEM, observe_masked
from pyro_iwem.infer import ParticleSampler, snis_objective
from pyro_iwem.infer.transforms import ReplayGuide
from tests.gaussian_models import PPCA, TwoLayerGaussian


class replaying(ParticleSampler):
    """A sampler that replays fixed latents instead of drawing new ones."""

    def __init__(self, sampler, guide_trace):
        self.__dict__.update(sampler.__dict__)
        self.guide_trace = guide_trace

    def __call__(self, num_particles, args, kwargs, **kw):
        return super().__call__(num_particles, args, kwargs, transforms=(ReplayGuide(self.guide_trace),), **kw)


def datum_trace(guide_trace, index):
    """The latents of data points ``index`` (particle dim 0, data dim 1) as a replayable trace."""
    trace = poutine.Trace()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            trace.add_node(name, type="sample", is_observed=False, value=site["value"][:, index], infer={})
    return trace


def test_log_densities_match_hand_computation():
    """log p, log q and log w of every particle equal the closed-form Gaussian densities."""
    m = TwoLayerGaussian()
    x = torch.randn(4, 3, dtype=torch.float64)
    p = ParticleSampler(m.model, m.guide)(6, (x,), {})
    z1, z2 = (p.guide_trace.nodes[n]["value"] for n in ("z1", "z2"))
    assert z1.shape == (6, 4, 2)
    prm = pyro.get_param_store()
    N = torch.distributions.Normal
    log_p = (
        N(0.0, 1.0).log_prob(z1).sum(-1)
        + N(prm["a"] * z1, 1.0).log_prob(z2).sum(-1)
        + N(z2 @ prm["W"].T + prm["b"], prm["sigma"]).log_prob(x).sum(-1)
    )
    log_q = N(x @ prm["A1"].T, prm["s"]).log_prob(z1).sum(-1) + N(x @ prm["A2"].T, prm["s"]).log_prob(z2).sum(-1)
    assert p.log_p.shape == p.log_q.shape == (6, 4)
    torch.testing.assert_close(p.log_p, log_p)
    torch.testing.assert_close(p.log_q, log_q)
    torch.testing.assert_close(p.log_w, log_p - log_q)
    assert p.scale == 1.0


def test_nested_plates_and_no_data_plate():
    """Inner plates are summed into their datum; a model without plates is one datum."""

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("features", x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(x.mean(-1, keepdim=True), 1.0))

    x = torch.randn(5, 3)
    p = ParticleSampler(model, guide)(7, (x,), {})
    z = p.guide_trace.nodes["z"]["value"]
    assert z.shape == (7, 5, 1)
    expected = dist.Normal(0.0, 1.0).log_prob(z).squeeze(-1) + dist.Normal(z, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(p.log_p, expected)

    def one_datum_model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def one_datum_guide():
        pyro.sample("z", dist.Normal(0.2, 1.0))

    p = ParticleSampler(one_datum_model, one_datum_guide)(9, (), {})
    assert p.log_w.shape == (9, 1)


def test_model_proposed_sites_cancel_from_weights():
    """Missing entries proposed by the model enter log p but not the weights: w = p(x_o, z) / q(z)."""

    def model(x, mask):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            observe_masked("x", dist.Normal(z.unsqueeze(-1).expand(z.shape + (3,)), 0.5), x, mask, event_dim=1)

    def guide(x, mask):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.1 * x.sum(-1), 0.8))

    x = torch.randn(4, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    p = ParticleSampler(model, guide)(8, (x, mask), {})
    z = p.guide_trace.nodes["z"]["value"]
    x_m = p.model_trace.nodes["x_unobserved"]["value"]
    lik = dist.Normal(z.unsqueeze(-1), 0.5)
    log_prior = dist.Normal(0.0, 1.0).log_prob(z)
    log_q = dist.Normal(0.1 * x.sum(-1), 0.8).log_prob(z)
    log_obs = (lik.log_prob(x) * mask).sum(-1)
    log_missing = (lik.log_prob(x_m) * ~mask).sum(-1)
    torch.testing.assert_close(p.log_w, log_prior + log_obs - log_q)
    torch.testing.assert_close(p.log_p, log_prior + log_obs + log_missing)
    torch.testing.assert_close(p.log_model_proposed, log_missing)


def test_pyro_obs_mask_is_supported():
    """Pyro's own obs_mask= creates x_unobserved, which the model proposes and the weights cancel."""

    def model(x, mask):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x, obs_mask=mask)

    def guide(x, mask):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    x, mask = torch.randn(6), torch.tensor([True, False, True, True, False, True])
    p = ParticleSampler(model, guide)(5, (x, mask), {})
    z = p.guide_trace.nodes["z"]["value"]
    torch.testing.assert_close(p.log_w, dist.Normal(z, 0.5).log_prob(x) * mask)


def test_batch_equals_each_datum_alone():
    """With the same latents, the IWEM loss and θ-gradient of a batch are the sums over its data."""
    m = PPCA(D=3, d=1)
    x = torch.randn(5, 3, dtype=torch.float64)
    iwem = IWEM(m.model, m.guide, K=10, annealing=None)
    fixed = iwem.sampler(10, (x,), {}, grad_guide=False).guide_trace

    def loss_and_grad(x, trace):
        iwem.sampler = replaying(ParticleSampler(m.model, m.guide), trace)
        _, loss = iwem._e_step(1.0, (x,), {})
        W = pyro.param("W").unconstrained()
        return loss, torch.autograd.grad(loss, W)[0]

    batch_loss, batch_grad = loss_and_grad(x, fixed)
    singles = [loss_and_grad(x[i : i + 1], datum_trace(fixed, slice(i, i + 1))) for i in range(5)]
    torch.testing.assert_close(batch_loss, sum(s[0] for s in singles))
    torch.testing.assert_close(batch_grad, sum(s[1] for s in singles))


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_subsampled_loss_is_unbiased(alpha):
    """Averaged over every subsample of size 2 of 4 data, the scaled loss equals the full-data loss.

    Latents are fixed per datum, so the average is exact: a loss that normalised the weights
    after scaling by n/b (or over the batch) would miss it.
    """
    n, b, K = 4, 2, 6

    def model(x, idx):
        W = pyro.param("W", torch.tensor([[1.5], [-0.5]], dtype=torch.float64))
        with pyro.plate("data", n, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T, 0.3).to_event(1), obs=x[idx])

    def guide(x, idx):
        with pyro.plate("data", n, subsample=idx):
            pyro.sample("z", dist.Normal(0.3 * x[idx, :1], 1.0).to_event(1))

    x = torch.randn(n, 2, dtype=torch.float64)
    everyone = torch.arange(n)
    sampler = ParticleSampler(model, guide)
    num = K + (1 if alpha < 1 else 0)
    fixed = sampler(num, (x, everyone), {}, grad_guide=False).guide_trace

    def loss(idx):
        p = sampler(num, (x, idx), {}, transforms=(ReplayGuide(datum_trace(fixed, idx)),))
        assert p.scale == n / len(idx)
        return -(p.scale * snis_objective(p, K, alpha)).sum()

    full = loss(everyone)
    subsets = [torch.tensor(s) for s in itertools.combinations(range(n), b)]
    average = torch.stack([loss(s) for s in subsets]).mean()
    torch.testing.assert_close(average, full)
